"""The daemon's side of jailing its workers (the worker's own side is vmm.jail, called in the zygote's fork).

Each worker is leased, before its fork: a uid and gid of its own from ``--uid-range`` (root mode), and a cgroup
made for it with its VM's limits. The lease is given back once the process is reaped, never before, so no two
live workers ever share a uid. The daemon is the workers' subreaper (vmm.jail forks each one into its own pid
namespace and the forking parent leaves), so it reads each exit status itself: a worker killed by SIGSYS broke
its seccomp allow-list, one killed by SIGKILL with an OOM kill in its cgroup went over its memory limit.

Modes: "root" (uids from the range, cgroups), "user" (snapd serve run by an ordinary user: a user namespace
per worker gives the same namespaces, root directory and seccomp filter, but no uid of its own and no cgroup),
"off" (a development switch: nothing of this; the daemon logs a warning).

A daemon that is not root checks at start, before any worker, that its workers can work at all
(``check_unprivileged``): /dev/kvm opens, a worker can be jailed (user namespaces may be disabled on the host), and
a jailed worker can make a userfaultfd that catches kernel-mode faults (KVM's accesses to guest memory). If not,
it refuses to start with one line naming the fix, instead of forking workers that fail one after another.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import select
import signal
import threading
import time

from vmm.errors import JailError
from vmm.jail import cgroups
from vmm.jail.native import check, lib

log = logging.getLogger("snapd")
DEFAULT_UID_RANGE = (200000, 299999)


def parse_uid_range(text: str) -> tuple[int, int]:
    """'FIRST-LAST' (inclusive), none of them 0."""
    try:
        first, last = (int(part) for part in text.split("-", 1))
    except ValueError:
        raise ValueError(f"--uid-range wants FIRST-LAST, not {text!r}") from None
    if not 0 < first <= last < 2**32 - 1:
        raise ValueError(f"--uid-range {text!r}: want 0 < FIRST <= LAST < 4294967295")
    return first, last


@dataclasses.dataclass
class Lease:
    """What one worker was given: its ids, its cgroup, and, once known, its pid and exit."""
    uid: int | None
    gid: int | None
    cgroup: cgroups.CgroupGroup | None  # its own: memory and pids (and cpu with cpu_per_clone)
    pid: int = 0
    exit_reason: str = ""
    shared_dirs: tuple[str, ...] = ()  # groups it joins that are not its own (the workers' cpu group)

    def fork_fields(self) -> dict:
        """The zygote's fork message: what the child takes on before it becomes a worker."""
        own = [path for _h, path in self.cgroup.dirs] if self.cgroup else []
        return {"uid": self.uid, "gid": self.gid, "cgroup_dirs": own + list(self.shared_dirs)}


class WorkerJail:
    def __init__(self, mode: str, state_dir: str, uid_range: tuple[int, int] = DEFAULT_UID_RANGE,
                 memory_mib: int | None = None, overhead_mib: int = cgroups.VMM_OVERHEAD_MIB,
                 cpu_per_clone: bool = True):
        if mode == "root" and os.geteuid() != 0:
            mode = "user"
        self.mode = mode
        self.root = os.path.join(state_dir, "jail-root")  # a tmpfs is mounted on it in each worker's namespace
        self.memory_mib = memory_mib
        self.overhead_mib = overhead_mib
        self.lock = threading.Lock()
        self.free_uids = range(uid_range[0], uid_range[1] + 1)
        self.used_uids: set[int] = set()
        self.next_uid = uid_range[0]
        self.layout = None
        self.cpu_per_clone = cpu_per_clone
        self.shared_cpu: cgroups.CgroupGroup | None = None  # every worker's cpu group, without cpu_per_clone
        self.cgroup_parent = "snapd/" + hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:16]
        self.reaper: Reaper | None = None
        if mode == "off":
            log.warning("--jail off: clone workers run as root, unconfined (a development switch)")
            return
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if mode == "root":
            self.layout = cgroups.detect_layout()
            if self.layout.missing:
                log.warning("cgroup controllers missing (%s): their per-clone limits are not applied",
                            ", ".join(self.layout.missing))
            cgroups.remove_tree(self.cgroup_parent, kill=True, layout=self.layout)  # a previous daemon's
            if not cpu_per_clone:
                # One cpu group for all workers (memory and pids stay per worker): the scheduler is then fair per
                # thread among them, as without cgroups (bench.clones latency-ab --ab cpu-cgroups compares).
                cpu_layout = cgroups.detect_layout(controllers=("cpu",))
                self.layout = cgroups.detect_layout(controllers=("memory", "pids"))
                if cpu_layout.hierarchies:
                    self.shared_cpu = cgroups.CgroupGroup.create(self.cgroup_parent, "workers",
                                                                 cgroups.CgroupLimits(), cpu_layout)
        # Workers are forked into their own pid namespaces by a parent that leaves at once: make them ours.
        check(lib.jail_prctl(lib.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
        if mode == "user":
            check_unprivileged(self.root)  # before any thread of ours: it forks
        self.reaper = Reaper()

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def zygote_settings(self) -> dict:
        """What the zygote needs to jail each child (JSON on its command line)."""
        return {"mode": self.mode, "root": self.root} if self.enabled else {"mode": "off"}

    def lease(self, vcpu_count: int, mem_size_mib: int) -> Lease:
        if self.mode != "root":
            return Lease(None, None, None)
        uid = self._take_uid()
        try:
            limits = cgroups.CgroupLimits.for_vm(mem_size_mib, vcpu_count, overhead_mib=self.overhead_mib)
            if self.memory_mib is not None:
                limits = dataclasses.replace(limits, memory_bytes=self.memory_mib * cgroups.MiB)
            group = cgroups.CgroupGroup.create(self.cgroup_parent, f"w{uid}", limits, self.layout)
        except BaseException:
            self._give_uid(uid)
            raise
        shared = tuple(path for _h, path in self.shared_cpu.dirs) if self.shared_cpu is not None else ()
        return Lease(uid, uid, group, shared_dirs=shared)

    def watch(self, lease: Lease, pid: int, on_exit) -> None:
        """Reap ``pid`` when it exits, give its lease back, then ``on_exit(reason)``."""
        lease.pid = pid
        if self.reaper is None:
            return

        def exited(status: int | None) -> None:
            lease.exit_reason = self.describe(lease, status)
            self.release(lease)
            on_exit(lease.exit_reason)

        self.reaper.watch(pid, exited)

    def release(self, lease: Lease) -> None:
        """Give back what a worker that never started (or has been reaped) held."""
        if lease.cgroup is not None:
            try:
                lease.cgroup.remove()
            except JailError as exc:
                log.warning("cgroup %s of a worker is left: %s", lease.cgroup.relpath, exc)
            lease.cgroup = None
        if lease.uid is not None:
            self._give_uid(lease.uid)
            lease.uid = None

    def describe(self, lease: Lease, status: int | None) -> str:
        """Why a worker's process ended, from its wait status and its cgroup."""
        if status is None:
            return "the clone's VMM process exited"
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGSYS:
                return ("the clone's VMM was killed by SIGSYS: it made a system call outside its seccomp "
                        "allow-list")
            if sig == signal.SIGKILL and self._oom_killed(lease):
                limit = lease.cgroup.limits.memory_bytes or 0
                return f"the clone's VMM was killed for going over its memory limit ({limit >> 20} MiB)"
            return f"the clone's VMM was killed by {signal.Signals(sig).name}"
        return f"the clone's VMM process exited with status {os.WEXITSTATUS(status)}"

    @staticmethod
    def _oom_killed(lease: Lease) -> bool:
        try:
            return lease.cgroup is not None and lease.cgroup.oom_killed() > 0
        except JailError:  # the group is gone already (the daemon is stopping): no OOM to tell of
            return False

    def _take_uid(self) -> int:
        with self.lock:
            for _ in range(len(self.free_uids)):
                uid = self.next_uid
                self.next_uid = uid + 1 if uid + 1 in self.free_uids else self.free_uids.start
                if uid not in self.used_uids:
                    self.used_uids.add(uid)
                    return uid
        raise JailError("uid range", errno.EAGAIN, f"all {len(self.free_uids)} uids of --uid-range are in use")

    def _give_uid(self, uid: int) -> None:
        with self.lock:
            self.used_uids.discard(uid)

    def close(self) -> None:
        if self.reaper is not None:
            self.reaper.close()
        if self.mode == "root":
            try:
                cgroups.remove_tree(self.cgroup_parent, kill=True, layout=self.layout)
            except JailError as exc:
                log.warning("cgroups of this daemon are left: %s", exc)


class JailUnavailableError(OSError):
    """A daemon that is not root cannot run jailed workers here; the message (one line) names the fix. An OSError,
    so `snapd serve` prints it as ``snapd: error: MESSAGE`` and exits 2."""

    def __init__(self, message: str):
        super().__init__(errno.EPERM, message)


UFFD_SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"
PROBE_TIMEOUT = 20.0


def check_unprivileged(root: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Before any worker of a daemon that is not root: /dev/kvm opens; a child of ours, from the same credentials,
    enters the jail a worker enters (vmm.jail.enter, the "worker" filter) and there makes a userfaultfd that
    catches kernel-mode faults as a worker does (snapd.uffd.create: from /dev/userfaultfd opened before the jail,
    or the syscall, which without CAP_SYS_PTRACE needs vm.unprivileged_userfaultfd=1). Without such a uffd KVM's
    own accesses to a clone's lazily paged memory cannot be served. Raises JailUnavailableError.
    The caller must be a subreaper (the jailed child comes back to it) and should have no other thread yet."""
    from snapd import uffd
    from vmm.jail import JailSpec, enter

    uid = os.geteuid()
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        raise JailUnavailableError(f"snapd serve as uid {uid} cannot open /dev/kvm ({exc.strerror}): give this user "
                                   f"read and write access to it (e.g. the kvm group), or run snapd serve as root") from None
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the probe: what zygote.confine does in a worker, then what the worker does with userfaultfd
        os.close(read_end)
        status = 1
        try:
            keep = (write_end,) + ((uffd.device_fd(),) if uffd.use_device() else ())
            enter(JailSpec(root=root, seccomp="worker", keep_fds=keep, hostname="snapd-probe"),
                  on_forked=lambda child: os.write(write_end, f"pid {child}\n".encode()))
            try:
                fd = uffd.create()
                uffd.api(fd, 0)
                os.close(fd)
                os.write(write_end, b"ok\n")
                status = 0
            except uffd.UffdError as exc:
                os.write(write_end, f"uffd {exc.errno} {exc.call}\n".encode())
        except BaseException as exc:  # noqa: BLE001 (reported to the parent, one line)
            text = str(exc).replace("\n", " ")
            os.write(write_end, f"jail {getattr(exc, 'errno', 0) or 0} {text}\n".encode())
        os._exit(status)
    os.close(write_end)
    try:
        lines, statuses = _read_probe(read_end, pid, timeout)
    finally:
        os.close(read_end)
    _check_probe(lines, statuses, uid)


def _read_probe(fd: int, pid: int, timeout: float) -> tuple[list[str], list[int]]:
    """The probe's report lines, and the wait statuses of its processes, both reaped (the jailed one comes back to
    us, its subreaper)."""
    data, jailed_pid, statuses = b"", 0, []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise JailUnavailableError(f"a jailed test process did not report within {timeout:.0f} s")
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
            for line in data.decode(errors="replace").splitlines():
                if line.startswith("pid "):
                    jailed_pid = int(line.split()[1])
    finally:
        for child in (pid, jailed_pid):
            if child:
                try:
                    os.kill(child, signal.SIGKILL)  # nothing if it is gone already (a zombie takes no signal)
                except ProcessLookupError:
                    pass
                try:
                    statuses.append(os.waitpid(child, 0)[1])
                except ChildProcessError:
                    pass
    return [line for line in data.decode(errors="replace").splitlines() if not line.startswith("pid ")], statuses


def _check_probe(lines: list[str], statuses: list[int], uid: int) -> None:
    if not lines:
        signals = [signal.Signals(os.WTERMSIG(s)).name for s in statuses if os.WIFSIGNALED(s)]
        lines = [f"jail 0 the jailed test process died without a word{' (killed by ' + signals[-1] + ')' if signals else ''}"]
    word, _, rest = lines[-1].partition(" ")
    err_text, _, detail = rest.partition(" ")
    err = int(err_text) if err_text.isdigit() else 0
    if word == "ok":
        return
    if word == "uffd":
        raise JailUnavailableError(
            f"snapd serve as uid {uid}: a jailed worker cannot catch KVM's kernel-mode page faults ({detail}: "
            f"{os.strerror(err)}): {_userfaultfd_state()}; give this user read and write access to /dev/userfaultfd "
            f"(as to /dev/kvm), or set sysctl vm.unprivileged_userfaultfd=1, or run snapd serve as root")
    if "CLONE_NEWUSER" in detail or "uid_map" in detail or "gid_map" in detail or "setgroups" in detail:
        raise JailUnavailableError(
            f"snapd serve as uid {uid} cannot jail its workers: no user namespace of its own ({detail}); allow "
            f"unprivileged user namespaces (user.max_user_namespaces, kernel.unprivileged_userns_clone, "
            f"kernel.apparmor_restrict_unprivileged_userns), or run snapd serve as root")
    hint = ("; a host that restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns) "
            "gives them no capability: allow them, or run snapd serve as root") if err == errno.EPERM else ""
    raise JailUnavailableError(f"snapd serve as uid {uid} cannot jail its workers: {detail or 'unknown error'}{hint}")


def _userfaultfd_state() -> str:
    """Why no uffd of that kind could be had, in the words of the two ways to one."""
    try:
        os.close(os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC))
        device = "/dev/userfaultfd opens"
    except OSError as exc:
        device = f"/dev/userfaultfd cannot be opened ({exc.strerror})"
    try:
        with open(UFFD_SYSCTL) as f:
            sysctl = f"vm.unprivileged_userfaultfd is {f.read().strip()}"
    except OSError:
        sysctl = "vm.unprivileged_userfaultfd is not there"
    return f"{device} and {sysctl}"


class Reaper:
    """One thread that reaps jailed workers (our children through the subreaper) as their pidfds report exit."""

    def __init__(self):
        self.epoll = select.epoll()
        self.lock = threading.Lock()
        self.watched: dict[int, tuple[int, object]] = {}  # pidfd -> (pid, callback)
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="snapd-reaper", daemon=True)
        self.thread.start()

    def watch(self, pid: int, on_exit) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            on_exit(None)
            return
        with self.lock:
            self.watched[pidfd] = (pid, on_exit)
            self.epoll.register(pidfd, select.EPOLLIN)

    def _loop(self) -> None:
        while not self.closed:
            try:
                events = self.epoll.poll(0.5)
            except (OSError, ValueError):
                return
            for pidfd, _ in events:
                with self.lock:
                    _pid, on_exit = self.watched.get(pidfd, (0, None))
                if on_exit is None:
                    continue
                try:
                    result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
                except ChildProcessError:
                    result = None  # not ours: it exited before the parent that forked it did; no status
                with self.lock:
                    self.watched.pop(pidfd, None)
                    self.epoll.unregister(pidfd)
                os.close(pidfd)
                status = None if result is None else _wait_status(result)
                try:
                    on_exit(status)
                except Exception:  # noqa: BLE001 (a callback's bug must not stop the reaping of the others)
                    log.exception("worker exit handling failed")

    def close(self) -> None:
        """Stop reaping (the daemon is stopping: the workers it killed go to init once it exits)."""
        self.closed = True
        self.thread.join(2)
        with self.lock:
            for pidfd in self.watched:
                os.close(pidfd)
            self.watched.clear()
            self.epoll.close()


def _wait_status(result) -> int:
    """waitid's result as a waitpid status word (os.WIFSIGNALED and friends read it)."""
    if result.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        return result.si_status & 0x7F
    return (result.si_status & 0xFF) << 8
