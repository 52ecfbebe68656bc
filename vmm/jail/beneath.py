"""Opening a caller's path beneath the root it belongs to, so that no ``..``, symlink, magic link or mount
point leads outside: openat2(2) with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV, relative to a
descriptor of the root. Only regular files are opened (a FIFO would hang the reader, a device has no end).

    root = Root("/var/lib/snapd/import")
    fd = root.open_file("snapshots/vm.state")            # read
    fd = root.create_file("clone-1.state.tmp")            # write (O_EXCL: never an existing file)
"""
from __future__ import annotations

import errno
import os
import stat

from vmm.jail.native import lib

RESOLVE = lib.RESOLVE_BENEATH | lib.RESOLVE_NO_MAGICLINKS | lib.RESOLVE_NO_XDEV


class PathRefused(ValueError):
    """A caller's path that this root does not allow; the message names the path and the rule, never file bytes."""


class Root:
    """A directory that a class of caller paths must resolve beneath."""

    def __init__(self, path: str, create: bool = False):
        self.path = os.path.abspath(path)
        if create:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        self.fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def relative(self, path: str) -> str:
        """The caller's path relative to this root: absolute paths must name a place beneath it."""
        if "\0" in path:
            raise PathRefused(f"path {path!r} contains a NUL byte")
        if not path:
            raise PathRefused("an empty path names no file")
        if os.path.isabs(path):
            rel = os.path.relpath(os.path.normpath(path), self.path)
            if rel == os.pardir or rel.startswith(os.pardir + os.sep):
                raise PathRefused(f"path {path!r} is not beneath {self.path}")
            return rel
        return path

    def _openat2(self, path: str, flags: int, mode: int = 0) -> int:
        rel = self.relative(path)
        fd = lib.jail_openat2(self.fd, rel.encode(), flags | os.O_CLOEXEC | os.O_NOCTTY, mode, RESOLVE)
        if fd >= 0:
            return fd
        err = -fd
        if err == errno.EXDEV:  # what openat2 says for a .., symlink or mount leading out
            raise PathRefused(f"path {path!r} leads outside {self.path} (through .., a symlink or a mount)")
        if err == errno.ELOOP:
            raise PathRefused(f"path {path!r}: a magic link or symlink loop is not followed")
        if err == errno.ENOENT:
            raise PathRefused(f"path {path!r} does not exist beneath {self.path}")
        if err == errno.EEXIST:
            raise PathRefused(f"path {path!r} already exists beneath {self.path}")
        raise PathRefused(f"path {path!r} cannot be opened beneath {self.path}: {os.strerror(err)}")

    def open_file(self, path: str, max_size: int | None = None) -> int:
        """A read-only descriptor of a regular file beneath the root, at most ``max_size`` bytes long. O_NONBLOCK
        on the open keeps a FIFO from blocking us before it is refused."""
        fd = self._openat2(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PathRefused(f"path {path!r} is not a regular file ({_kind(st.st_mode)})")
            if max_size is not None and st.st_size > max_size:
                raise PathRefused(f"path {path!r} is {st.st_size} bytes, more than the {max_size} allowed")
            os.set_blocking(fd, True)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def create_file(self, path: str, mode: int = 0o600) -> int:
        """A new regular file beneath the root, opened for writing; refused if anything exists at the path."""
        return self._openat2(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"
