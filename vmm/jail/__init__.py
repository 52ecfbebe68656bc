"""Confinement of one VMM process: the role Firecracker's jailer plays, as a function the process calls on itself.

``enter(spec)`` turns the calling, single-threaded process into a jailed one, in this order (each step needs
what the next one takes away):
 1. environment emptied; every descriptor closed but stdio and ``spec.keep_fds``;
 2. (unprivileged) a user namespace mapping our uid to root inside it;
 3. new mount, pid, net, ipc, uts and cgroup namespaces (net, ipc and uts may be made once by a forking parent:
    ``shared_namespaces``), and a fork into the pid namespace (we become its pid 1; the parent leaves:
    ``on_forked`` hears the child's host pid);
 4. ``spec.root`` becomes the whole file system (pivot_root; the host's root detached);
 5. hostname; own uid/gid, no groups, no capabilities, no_new_privs, not dumpable;
 6. the seccomp allow-list of ``spec.seccomp``.
Whatever the process needs from the host (``/dev/kvm``, its channel, snapshot files) is opened before, and
passed as descriptors. A cgroup is joined by the caller before (vmm.jail.cgroups), while /sys is still there.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from vmm.jail import creds, namespaces, seccomp
from vmm.jail.native import check, ffi, lib

__all__ = ["JailSpec", "enter", "host_pid"]

_host_pid: int | None = None


@dataclass(frozen=True)
class JailSpec:
    root: str                        # an existing directory: a tmpfs is mounted on it (bind_root: used as it is)
    uid: int | None = None           # None: unprivileged mode (a user namespace), or stay as we are when not root
    gid: int | None = None
    seccomp: str | None = "worker"   # the allow-list role (vmm.jail.seccomp.ROLES); None: no filter
    keep_fds: tuple[int, ...] = ()   # besides 0, 1, 2
    hostname: str = "vmm"
    bind_root: bool = False          # the root is a host-prepared directory (vmm jail), bind-mounted, writable
    binds: tuple[tuple[str, str], ...] = ()  # (host path, path inside), e.g. ("/dev/kvm", "/dev/kvm")
    seccomp_program: bytes | None = None  # seccomp.compile(role, 1) made ahead (the zygote): loaded as it is
    shared_namespaces: bool = False  # net, ipc and uts made once by the parent (namespaces.enter_shared_namespaces)

    @property
    def user_namespace(self) -> bool:
        return self.uid is None and os.geteuid() != 0


def host_pid() -> int:
    """This process's pid in the host's pid namespace (what the daemon must know it by)."""
    return _host_pid if _host_pid is not None else os.getpid()


def scrub(keep_fds: tuple[int, ...]) -> None:
    """Empty the environment and close every descriptor >= 3 not in ``keep_fds``."""
    os.environ.clear()
    check(lib.jail_clearenv(), "clearenv")
    keep = ffi.new("int[]", list(keep_fds) or [0])
    check(lib.jail_close_range_except(keep, len(keep_fds)), "close_range")


def enter(spec: JailSpec, on_forked=None) -> None:
    """Jail the calling process (see the module's docstring). Returns in the jailed child only."""
    global _host_pid
    if threading.active_count() != 1:
        raise RuntimeError("vmm.jail.enter needs a single-threaded process (unshare and fork copy one thread)")
    scrub(spec.keep_fds)
    if spec.user_namespace:
        namespaces.enter_user_namespace()
    _host_pid = namespaces.enter_namespaces(on_forked, spec.shared_namespaces)
    namespaces.pivot_into(spec.root, spec.bind_root, spec.binds)
    if not spec.shared_namespaces:
        namespaces.set_hostname(spec.hostname)
    creds.drop_privileges(spec.uid, spec.gid)
    if spec.seccomp_program is not None:
        seccomp.install(spec.seccomp_program)
    elif spec.seccomp:
        seccomp.load(spec.seccomp, os.getpid())
