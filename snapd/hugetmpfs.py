"""A tmpfs with 2 MiB pages for shared images, mounted in a mount namespace of this process's own.

Why: a clone's first touch of a page of its image costs a host page fault and a KVM fault per 4 KiB page on this
nested host (~6 us; docs/benchmarks.md, "Working-set prefetch"). With the image's shared file on 2 MiB pages,
one host fault maps 2 MiB into the clone (PMD-mapped, read-only, copy-on-write per 4 KiB on a write) and KVM can
map the guest's 2 MiB pages whole. memfds follow /sys/kernel/mm/transparent_hugepage/shmem_enabled, which is
"never" on these hosts and is not ours to change; a tmpfs mount's own ``huge=always`` option is honoured
whatever that setting (only "deny" overrides it). The mount is made in a new mount namespace (unshare), with
every mount in it private, so the host's mount table never sees it and it goes away with the process; workers
get the files as descriptors and need no mount.

A mount namespace belongs to a thread: ``unshare(CLONE_NEWNS)`` moves only the calling thread, and threads it
starts later inherit it. A thread started before would still resolve STATE/huge in the host's namespace, to the
plain directory (where O_TMPFILE still works, on disk: a silent loss of the huge pages). So
``mount_private_huge_tmpfs`` refuses to run once the process has more than one thread; snapd.serve calls it
first thing, for --huge-pages.
"""
from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x00020000       # <linux/sched.h>
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_REC, MS_PRIVATE = 0x4000, 0x40000  # <linux/mount.h>
MNT_DETACH = 0x2
HUGE_ALWAYS = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"

_libc = ctypes.CDLL(None, use_errno=True)


class HugeTmpfsError(OSError):
    """The huge-page tmpfs could not be set up; the message names the step and the errno."""


def _call(what: str, rc: int) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise HugeTmpfsError(err, f"{what}: {os.strerror(err)}")


def mount_private_huge_tmpfs(path: str, size: str = "100%") -> str:
    """Enter a private mount namespace and mount a tmpfs with huge=always (mode 0700) at ``path`` (created if
    missing). Returns the absolute path. Raises HugeTmpfsError naming what failed (threads already running, not
    root, huge pages denied by the host)."""
    threads = len(os.listdir("/proc/self/task"))
    if threads > 1:
        raise HugeTmpfsError(0, f"a private mount namespace must be made before any thread starts; this process "
                                f"runs {threads} threads")
    _call("unshare(CLONE_NEWNS) (needs root)", _libc.unshare(CLONE_NEWNS))
    _call("making every mount private in the new namespace",
          _libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None))
    return mount_huge_tmpfs(path, size)


def mount_huge_tmpfs(path: str, size: str = "100%") -> str:
    """Mount a tmpfs with huge=always (mode 0700) at ``path`` in this process's current mount namespace: the
    host's, unless mount_private_huge_tmpfs made a private one (the tests use this, and unmount it)."""
    path = os.path.abspath(path)
    try:
        with open(HUGE_ALWAYS) as f:
            if "[deny]" in f.read():
                raise HugeTmpfsError(0, f"{HUGE_ALWAYS} is 'deny': the host forbids huge pages in tmpfs")
    except FileNotFoundError:
        raise HugeTmpfsError(0, "this kernel has no transparent huge pages for tmpfs") from None
    os.makedirs(path, mode=0o700, exist_ok=True)
    options = f"huge=always,mode=0700,size={size}".encode()
    _call(f"mount -t tmpfs -o {options.decode()} {path}",
          _libc.mount(b"snapd-huge", os.fsencode(path), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options))
    return path


def unmount(path: str) -> None:
    """Detach the mount now (MNT_DETACH); the tmpfs and its pages go once the last file on it is closed."""
    _call(f"umount -l {path}", _libc.umount2(os.fsencode(os.path.abspath(path)), MNT_DETACH))


def is_huge_tmpfs(path: str) -> bool:
    """Whether ``path`` is the mount point of a tmpfs with huge=always (as /proc/self/mountinfo shows it)."""
    path = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if fields[4] == path and tail[0] == "tmpfs" and "huge=always" in tail[2]:
                return True
    return False
