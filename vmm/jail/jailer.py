"""`vmm jail`: the single-VM path's jailer, the role Firecracker's jailer plays for `firecracker --api-sock`.

    vmm jail --id ID --uid U --gid G --chroot-base DIR [--cgroup controller.file=value]... -- --api-sock /api.sock

``run(JailerConfig(...))`` starts `vmm ARGS` inside the layers a snapd clone worker gets (vmm.jail): its own
namespaces (mount, pid, net, ipc, uts, cgroup), the jail directory ``DIR/vmm/ID/root`` as its whole file system
(pivot_root: every path the API is given resolves inside it), uid U and gid G with no capabilities and
no_new_privs, an empty environment, the seccomp role "vmm", and a cgroup ``vmm/ID`` holding the --cgroup values.

Processes (the supervisor stays outside every layer, so it never counts against the VM's cgroup):
- the supervisor: the process the orchestrator started. It prepares what the jail cannot reach (modules imported,
  /dev/kvm and /dev/userfaultfd opened, the cgroup made), forks, then waits for the VMM, forwards SIGTERM,
  SIGINT and SIGHUP to it (SIGKILL if it has not exited ``STOP_GRACE`` seconds later), removes the cgroup and
  exits with the VMM's status (128 + N if a signal N killed it);
- a short-lived child that joins the cgroup and calls ``vmm.jail.enter``, which forks into the new pid namespace
  and leaves (the supervisor, a subreaper, inherits the VMM);
- the VMM: pid 1 of its namespace, jailed, running `vmm ARGS` (parsed before the jail: vmm.cli.run_parsed). It
  holds the read end of a pipe whose only writer is the supervisor: should the supervisor die (even by SIGKILL)
  the VMM stops too.
Nothing is exec'd: the VMM is a fork of the supervisor, warmed before the jail (nothing can be imported after
pivot_root), and the environment strings exec left on the stack are zeroed before the jail is entered.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import select
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass

from vmm.errors import JailError, VmmError

ID_PATTERN = re.compile(r"[A-Za-z0-9-]{1,64}")
CGROUP_PARENT = "vmm"
EXEC_NAME = "vmm"              # the directory level Firecracker names after its exec file: DIR/vmm/ID/root
STOP_GRACE = 10.0              # seconds between a forwarded SIGTERM and a SIGKILL
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
MAX_ID = 2**32 - 2             # (uid_t)-1 means "unchanged" to setresuid


class JailerUsageError(ValueError):
    """Bad input to `vmm jail`: one line, exit status 2."""


@dataclass(frozen=True)
class JailerConfig:
    id: str
    uid: int
    gid: int
    chroot_base: str
    cgroups: tuple[tuple[str, str], ...] = ()   # (controller.file, value), from vmm.jail.cgroups.parse_setting
    vmm_args: tuple[str, ...] = ()              # what `vmm` runs inside (e.g. --api-sock /api.sock)

    def __post_init__(self):
        if not isinstance(self.id, str) or not ID_PATTERN.fullmatch(self.id):
            raise JailerUsageError(f"--id {self.id!r}: 1 to 64 of A-Z, a-z, 0-9 and '-'")
        for name in ("uid", "gid"):
            value = getattr(self, name)
            if type(value) is not int or not 0 < value <= MAX_ID:
                raise JailerUsageError(f"--{name} {value!r}: an integer from 1 to {MAX_ID} (never 0: root)")
        if not os.path.isdir(self.chroot_base):
            raise JailerUsageError(f"--chroot-base {self.chroot_base}: no such directory")
        from vmm.jail.cgroups import parse_setting
        for file, value in self.cgroups:
            try:
                parse_setting(f"{file}={value}")
            except ValueError as exc:
                raise JailerUsageError(str(exc)) from None
        if not self.vmm_args:
            raise JailerUsageError("no vmm arguments: give them after --, e.g. -- --api-sock /api.sock")
        if self.vmm_args[0] == "jail":
            raise JailerUsageError("the arguments after -- are for the jailed vmm, not another `vmm jail`")

    @property
    def jail_dir(self) -> str:
        return os.path.join(os.path.abspath(self.chroot_base), EXEC_NAME, self.id)

    @property
    def jail_root(self) -> str:
        return os.path.join(self.jail_dir, "root")

    @property
    def cgroup_path(self) -> str:
        return f"{CGROUP_PARENT}/{self.id}"


def parse_cgroup_option(text: str) -> tuple[str, str]:
    from vmm.jail.cgroups import parse_setting
    try:
        return parse_setting(text)
    except ValueError as exc:
        raise JailerUsageError(str(exc)) from None


def warm_up() -> list[int]:
    """Everything the jailed VMM would otherwise fetch from the file system, done while the host's is still
    there: every module the API server, the VMM and a restore import (nothing can be imported after
    pivot_root), the version (read from the installed metadata), the host's memory size, /dev/kvm (its CPUID
    read once) and, where it exists, /dev/userfaultfd. Returns the descriptors the jail must keep."""
    import email.feedparser  # noqa: F401  (http.server parses headers with it, on the first request)
    import encodings.idna  # noqa: F401
    import json  # noqa: F401
    import socketserver  # noqa: F401

    import snapd.uffd_handshake  # noqa: F401
    import vmm.api.commands  # noqa: F401
    import vmm.api.server  # noqa: F401
    import vmm.cli  # noqa: F401
    import vmm.diff_snapshot  # noqa: F401
    import vmm.linux_boot  # noqa: F401
    import vmm.loader  # noqa: F401
    import vmm.run  # noqa: F401
    import vmm.snapshot  # noqa: F401
    import vmm.uffd_backend  # noqa: F401
    from snapd import uffd
    from snapd.snapfile import SnapshotFormatError, decode_state
    from vmm.api.controller import vmm_version
    from vmm.config import host_memory_bytes
    from vmm.machine import shared_kvm
    from vmm.persist import MicrovmState
    from vmm.vcpu_runner import install_kick_handler

    vmm_version()
    host_memory_bytes()
    kvm = shared_kvm()
    kvm.supported_cpuid()
    install_kick_handler()
    try:
        decode_state(b"", MicrovmState)  # builds and caches the state decoder
    except SnapshotFormatError:
        pass
    return [kvm.fd] + ([uffd.device_fd()] if uffd.use_device() else [])


def wipe_initial_environment() -> None:
    """clearenv() and os.environ.clear() (vmm.jail.enter) forget the environment, but its strings stay where
    exec put them, on the first stack: what /proc/PID/environ shows, and what a VMM reading its own memory would
    find (an orchestrator's credentials, say). Zero them (this process was not exec'd into the jail)."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()  # fields[0] is field 3 (state) of proc(5)
    start, end = int(fields[50 - 3]), int(fields[51 - 3])  # env_start, env_end
    if 0 < start < end:
        ctypes.memset(start, 0, end - start)


def prepare_root(config: JailerConfig) -> str:
    """DIR/vmm/ID/root, made if missing (an existing one is used as it is: the orchestrator may have put the
    guest's files there first), owned by uid:gid so the VMM can create its socket and snapshots in it."""
    root = config.jail_root
    try:
        os.makedirs(root, mode=0o755, exist_ok=True)
        info = os.lstat(root)
        if not stat.S_ISDIR(info.st_mode):
            raise JailError("jail root", errno.ENOTDIR, f"{root} is not a directory")
        if os.path.realpath(root) != root:
            raise JailError("jail root", errno.ELOOP, f"{root} goes through a symbolic link")
        os.chown(root, config.uid, config.gid)
    except OSError as exc:
        raise JailError("jail root", exc.errno or errno.EIO, f"{root}: {exc.strerror}") from None
    return root


def make_cgroup(config: JailerConfig):
    """The group vmm/ID in every hierarchy of memory, pids, cpu (and cpuset if a --cgroup names it), with the
    --cgroup values written. A leftover group of that name with no process in it (a supervisor killed before it
    cleaned up) is removed first; one with processes means that jail is running."""
    from vmm.jail import cgroups
    controllers = cgroups.CONTROLLERS + (("cpuset",) if any(f.startswith("cpuset.") for f, _ in config.cgroups)
                                         else ())
    layout = cgroups.detect_layout(controllers=controllers)
    for h in layout.hierarchies:
        leftover = os.path.join(h.mount, CGROUP_PARENT, config.id)
        if os.path.isdir(leftover):
            with open(os.path.join(leftover, "cgroup.procs")) as f:
                if f.read().split():
                    raise JailError("cgroup", errno.EBUSY, f"{leftover} holds processes: is a jail with id "
                                    f"{config.id} running?")
            cgroups.remove_tree(config.cgroup_path, layout=layout)
    for ctrl in layout.missing:
        if any(f.startswith(ctrl + ".") for f, _ in config.cgroups):
            raise JailError("cgroup", errno.ENOENT, f"no {ctrl} controller is mounted on this host")
    group = cgroups.CgroupGroup.create(CGROUP_PARENT, config.id, cgroups.CgroupLimits(), layout)
    try:
        cgroups.write_settings(group, config.cgroups)
    except BaseException:
        group.remove(timeout=0.5)
        raise
    return group


def run(config: JailerConfig) -> int:
    """Start `vmm ARGS` in its jail, wait for it, and return its exit status (see the module docstring)."""
    if os.geteuid() != 0:
        raise JailError("vmm jail", errno.EPERM, "must run as root (it makes cgroups, mounts and switches uid)")
    if threading.active_count() != 1:
        raise JailError("vmm jail", errno.EINVAL, "must start single-threaded (it forks into the jail)")
    keep = warm_up()
    group = make_cgroup(config)  # first: a --cgroup file this host does not have is told before a jail is made
    try:
        root = prepare_root(config)
        return _supervise(config, root, group, keep)
    finally:
        try:
            group.remove()
        except JailError as exc:
            print(f"vmm jail: warning: cgroup {group.relpath} is left: {exc}", file=sys.stderr)


def _supervise(config: JailerConfig, root: str, group, keep: list[int]) -> int:
    from vmm.jail.native import check, lib

    check(lib.jail_prctl(lib.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
    report_r, report_w = os.pipe2(os.O_CLOEXEC)      # the jailed VMM's host pid, then EOF once it is jailed
    life_r, life_w = os.pipe2(os.O_CLOEXEC)          # the supervisor's lifeline: EOF in the VMM when we die
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in FORWARDED}
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(config, root, group, keep, report_r, report_w, life_r, life_w)  # never returns
    os.close(report_w)
    os.close(life_r)
    try:
        _, status = os.waitpid(pid, 0)   # the child that entered the jail leaves once the VMM is forked
        text = _read_all(report_r)  # EOF: the VMM is jailed, or it (or the child before it) failed
        head, _, message = text.partition(b"\n") if text[:1].isdigit() else (b"", b"", text)
        message = message.decode(errors="replace").strip()
        if message:
            print(f"vmm jail: error: {message}", file=sys.stderr)
        if not head:
            if not message:
                print(f"vmm jail: error: {_describe(status)}", file=sys.stderr)
            return 1
        return _wait(int(head), pending)
    finally:
        os.close(report_r)
        os.close(life_w)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _child(config, root, group, keep, report_r, report_w, life_r, life_w) -> None:
    """The forked child: join the cgroup, enter the jail (its parent half reports the VMM's pid and leaves), then,
    as the jailed VMM, run `vmm ARGS`."""
    status = 1
    try:
        os.close(report_r)
        os.close(life_w)
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        from vmm.cli import parse_jailed_args, run_parsed
        from vmm.jail import JailSpec, enter
        args = parse_jailed_args(config.vmm_args)
        os.setpgid(0, 0)  # our own process group: a terminal's Ctrl-C reaches the supervisor, which forwards it
        wipe_initial_environment()
        group.join()
        spec = JailSpec(root=root, bind_root=True, uid=config.uid, gid=config.gid, seccomp="vmm",
                        keep_fds=tuple(keep) + (report_w, life_r), hostname=config.id[:64])
        enter(spec, on_forked=lambda vmm_pid: os.write(report_w, b"%d\n" % vmm_pid))
        os.close(report_w)  # the supervisor's read ends: we are jailed
        report_w = -1
        _watch_lifeline(life_r)
        status = run_parsed(args)
    except SystemExit as exc:  # argparse inside (its message is already printed)
        status = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:  # noqa: BLE001 (one line, never a traceback)
        if report_w >= 0:  # to the supervisor, which prints it
            os.write(report_w, str(exc).encode(errors="replace")[:4000])
        else:
            print(f"vmm: error: {exc}", file=sys.stderr)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status if isinstance(status, int) else 1)


def _watch_lifeline(fd: int) -> None:
    """A thread that stops this VMM once the supervisor is gone (its pipe's write end closed by the kernel):
    SIGTERM to ourselves (the API server's clean stop), then, should that not end us, exit."""
    def watch():
        while True:
            try:
                if not os.read(fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        signal.raise_signal(signal.SIGTERM)
        time.sleep(STOP_GRACE)
        os._exit(1)

    threading.Thread(target=watch, name="jail-lifeline", daemon=True).start()


def _wait(vmm_pid: int, pending: list[int]) -> int:
    """Wait for the jailed VMM (our child now: we are its subreaper), forwarding our signals to it; SIGKILL it
    STOP_GRACE seconds after the first one if it is still there (pid 1 of its namespace ignores a signal it has no
    handler for, e.g. before its API server started)."""
    pidfd = os.pidfd_open(vmm_pid)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    kill_at, killed = None, False
    try:
        while True:
            while pending:
                os.kill(vmm_pid, pending.pop(0))  # our unreaped child: its pid cannot be another's yet
                if kill_at is None and not killed:
                    kill_at = time.monotonic() + STOP_GRACE
            timeout = None if kill_at is None else max(0.0, kill_at - time.monotonic())
            ready, _, _ = select.select([pidfd, wake_r], [], [], timeout)
            if pidfd in ready:
                break
            if wake_r in ready:
                while _drain(wake_r):
                    pass
            if kill_at is not None and time.monotonic() >= kill_at:
                print(f"vmm jail: the VMM did not stop within {STOP_GRACE:.0f} s of the signal: killing it",
                      file=sys.stderr)
                os.kill(vmm_pid, signal.SIGKILL)
                kill_at, killed = None, True
        _, status = os.waitpid(vmm_pid, 0)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
        os.close(pidfd)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"the jail's set-up was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"the jail's set-up exited with status {os.WEXITSTATUS(status)}"


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 512))
    except BlockingIOError:
        return False


def _read_all(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            return data
        data += chunk


__all__ = ["JailerConfig", "JailerUsageError", "run", "parse_cgroup_option", "VmmError"]
