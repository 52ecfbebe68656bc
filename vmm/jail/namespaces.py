"""New namespaces and an empty root for the calling process (the mount, pid, net, ipc, uts and cgroup layers).

A new pid namespace applies to the children of the process that makes it, so ``enter_namespaces`` forks once:
the child is pid 1 of its own namespace and goes on; the parent leaves at once, and the kernel hands the child to
the nearest subreaper (snapd's daemon sets itself as one, so it can read each worker's exit status).
"""
from __future__ import annotations

import os

from vmm.jail.native import check, ffi, lib

# Namespaces a process that forks many jailed VMMs (snapd's zygote) may make once for all of them: the VMMs
# reach nothing in them anyway (their seccomp filter allows no socket, no System V IPC, no sethostname), and a
# net namespace costs 0.7 ms to make here, and more to tear down, per worker.
SHAREABLE = lib.CLONE_NEWNET | lib.CLONE_NEWIPC | lib.CLONE_NEWUTS
NAMESPACES = lib.CLONE_NEWNS | lib.CLONE_NEWPID | lib.CLONE_NEWCGROUP | SHAREABLE
OLD_ROOT = ".old-root"


def host_pid() -> int:
    """Our pid as the host's (the procfs mount's) pid namespace sees it: NSpid's first field."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("NSpid:"):
                return int(line.split()[1])
    return os.getpid()


def enter_user_namespace() -> None:
    """Unprivileged mode: a new user namespace in which our own uid and gid are root, so the other namespaces,
    the mounts and pivot_root work without privilege on the host. Only our own ids exist in it."""
    uid, gid = os.geteuid(), os.getegid()
    check(lib.jail_unshare(lib.CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                       ("/proc/self/gid_map", f"0 {gid} 1")):
        with open(path, "w") as f:
            f.write(text)


def enter_shared_namespaces(hostname: str) -> None:
    """New net, ipc and uts namespaces for the caller and every process it forks later (see SHAREABLE)."""
    check(lib.jail_unshare(SHAREABLE), "unshare(NEWNET|NEWIPC|NEWUTS)")
    set_hostname(hostname)


def enter_namespaces(on_forked=None, shared: bool = False) -> int:
    """unshare every namespace (``shared``: all but SHAREABLE, which the caller's parent made already), then fork
    into the new pid namespace. Returns our host pid, in the child only; the parent calls
    ``on_forked(child_host_pid)`` and exits. The caller must be single-threaded."""
    flags = NAMESPACES & ~SHAREABLE if shared else NAMESPACES
    check(lib.jail_unshare(flags), f"unshare({flags:#x})")
    pid = os.fork()
    if pid:
        try:
            if on_forked is not None:
                on_forked(pid)
        finally:
            os._exit(0)
    return host_pid()


def pivot_into(root: str, bind: bool, binds: tuple[tuple[str, str], ...] = (), read_only: bool = True) -> None:
    """Make ``root`` our whole file system: a fresh tmpfs mounted on it (``bind`` False) or the directory itself
    bind-mounted (``bind`` True, for a jail whose files the host prepares, as `vmm jail` does); ``binds``
    (host path, path inside) are bind-mounted in first. The old root is detached, so no host file is left
    reachable by name; mount propagation is cut first, so none of this shows outside. A bind-mounted root is
    nosuid, nodev and noexec."""
    check(lib.jail_mount(b"none", b"/", ffi.NULL, lib.MS_REC | lib.MS_PRIVATE, ffi.NULL), "mount(/, MS_REC|MS_PRIVATE)")
    target = root.encode()
    if bind:
        check(lib.jail_mount(target, target, ffi.NULL, lib.MS_BIND | lib.MS_REC, ffi.NULL), "mount(bind)", root)
        # The VMM needs no device node (it is handed /dev/kvm open), no set-id bit and no exec: a device node or
        # a program put in the jail directory is inert inside. (A read-only host mount stays read-only.)
        read_only_flag = lib.MS_RDONLY if os.statvfs(root).f_flag & os.ST_RDONLY else 0
        check(lib.jail_mount(ffi.NULL, target, ffi.NULL, lib.MS_REMOUNT | lib.MS_BIND | lib.MS_NOSUID | lib.MS_NODEV
                             | lib.MS_NOEXEC | read_only_flag, ffi.NULL), "mount(remount nosuid,nodev,noexec)", root)
    else:
        check(lib.jail_mount(b"jail", target, b"tmpfs", lib.MS_NOSUID | lib.MS_NODEV | lib.MS_NOEXEC,
                             b"size=64k,nr_inodes=64,mode=0755"), "mount(tmpfs)", root)
    for host_path, inside in binds:
        dest = os.path.join(root, inside.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if not os.path.exists(dest):
            if os.path.isdir(host_path):
                os.mkdir(dest)
            else:
                open(dest, "a").close()
        check(lib.jail_mount(host_path.encode(), dest.encode(), ffi.NULL, lib.MS_BIND, ffi.NULL), "mount(bind)", host_path)
    old = os.path.join(root, OLD_ROOT)
    os.makedirs(old, exist_ok=True)
    check(lib.jail_pivot_root(target, old.encode()), "pivot_root", root)
    os.chdir("/")
    check(lib.jail_umount2(b"/" + OLD_ROOT.encode(), lib.MNT_DETACH), "umount2(old root)")
    os.rmdir("/" + OLD_ROOT)
    if read_only and not bind:
        check(lib.jail_mount(b"jail", b"/", ffi.NULL, lib.MS_REMOUNT | lib.MS_RDONLY | lib.MS_NOSUID | lib.MS_NODEV
                             | lib.MS_NOEXEC, ffi.NULL), "mount(remount read-only)")


def set_hostname(name: str) -> None:
    check(lib.jail_sethostname(name.encode()), "sethostname", name)
