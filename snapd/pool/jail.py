"""The daemon's side of jailing its workers (the worker's own side is vmm.jail, called in the zygote's fork).

Each worker is leased, before its fork: a uid and gid of its own from ``--uid-range`` (root mode), and a cgroup
made for it with its VM's limits. The lease is given back once the process is reaped, never before, so no two
live workers ever share a uid. The daemon is the workers' subreaper (vmm.jail forks each one into its own pid
namespace and the forking parent leaves), so it reads each exit status itself: a worker killed by SIGSYS broke
its seccomp allow-list, one killed by SIGKILL with an OOM kill in its cgroup went over its memory limit.

Modes: "root" (uids from the range, cgroups), "user" (snapd serve run by an ordinary user: a user namespace
per worker gives the same namespaces, root directory and seccomp filter, but no uid of its own and no cgroup),
"off" (a development switch: nothing of this; the daemon logs a warning).
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
    cgroup: cgroups.CgroupGroup | None
    pid: int = 0
    exit_reason: str = ""

    def fork_fields(self) -> dict:
        """The zygote's fork message: what the child takes on before it becomes a worker."""
        return {"uid": self.uid, "gid": self.gid,
                "cgroup_dirs": [path for _h, path in self.cgroup.dirs] if self.cgroup else []}


class WorkerJail:
    def __init__(self, mode: str, state_dir: str, uid_range: tuple[int, int] = DEFAULT_UID_RANGE,
                 memory_mib: int | None = None, overhead_mib: int = cgroups.VMM_OVERHEAD_MIB):
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
        # Workers are forked into their own pid namespaces by a parent that leaves at once: make them ours.
        check(lib.jail_prctl(lib.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
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
        return Lease(uid, uid, group)

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
        self.closed = True


def _wait_status(result) -> int:
    """waitid's result as a waitpid status word (os.WIFSIGNALED and friends read it)."""
    if result.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        return result.si_status & 0x7F
    return (result.si_status & 0xFF) << 8
