"""Opening a caller's path beneath the root it belongs to, so that no ``..``, symlink, magic link or mount
point leads outside: openat2(2) with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV, relative to a
descriptor of the root. Only regular files are opened (a FIFO would hang the reader, a device has no end).

    root = Root("/var/lib/snapd/import")
    fd = root.open_file("snapshots/vm.state")            # read
    fd = root.create_file("clone-1.state.tmp")            # write (O_EXCL: never an existing file)
    new = NewFile(Root("/var/lib/snapd/snapshots"), "c-1.mem")   # written under a temporary name in the target's
    os.write(new.fd, b"..."); new.sync(); new.link(); new.close()   # directory, then put in place (never replacing)

A caller's path is relative to the root, or absolute and then it must name a place beneath the root (its leading
components are the root's); what follows is resolved by the kernel, ``..`` and symlinks included, and refused if
it leaves the root. Every refusal is a ``PathRefused`` whose message names the path and the rule, never a byte of
a file; ``PathMissing`` (nothing there) and ``PathExists`` (something in the way) tell the two a caller can fix.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat

from vmm.jail.native import lib

RESOLVE = lib.RESOLVE_BENEATH | lib.RESOLVE_NO_MAGICLINKS | lib.RESOLVE_NO_XDEV


class PathRefused(ValueError):
    """A caller's path that this root does not allow; the message names the path and the rule, never file bytes."""


class PathMissing(PathRefused):
    """Nothing exists at the path beneath the root (or a directory on the way is missing)."""


class PathExists(PathRefused):
    """Something already exists where a new file was to be put."""


def _components(path: str) -> list[str]:
    """The path's names, without empty and ``.`` ones (``..`` is kept: the kernel resolves it, beneath the root)."""
    return [part for part in path.split("/") if part not in ("", ".")]


class Root:
    """A directory that a class of caller paths must resolve beneath."""

    def __init__(self, path: str, create: bool = False):
        self.path = os.path.abspath(path)
        if create:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        self.fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        # an absolute caller path may name the root as given or as it really is (its symlinks resolved)
        self._prefixes = [_components(self.path)]
        real = _components(os.path.realpath(self.path))
        if real != self._prefixes[0]:
            self._prefixes.append(real)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check(self, path: str) -> None:
        """Refuse what no root allows: a NUL byte, an empty path, text that is no file name."""
        if not isinstance(path, str):
            raise PathRefused(f"path {path!r} is not a string")
        if "\0" in path:
            raise PathRefused(f"path {path!r} contains a NUL byte")
        if not path:
            raise PathRefused("an empty path names no file")
        try:
            os.fsencode(path)
        except UnicodeEncodeError:
            raise PathRefused(f"path {path!r} is not a valid file name (lone surrogate)") from None

    def contains(self, path: str) -> bool:
        """An absolute ``path`` names a place beneath (or at) this root; a relative one always does."""
        if not os.path.isabs(path):
            return True
        parts = _components(path)
        return any(parts[:len(prefix)] == prefix for prefix in self._prefixes)

    def relative(self, path: str) -> str:
        """The caller's path relative to this root: absolute paths must name a place beneath it. The rest is left
        to the kernel (openat2 refuses a ``..`` or symlink that leads out)."""
        self.check(path)
        if not os.path.isabs(path):
            return path
        parts = _components(path)
        for prefix in self._prefixes:
            if parts[:len(prefix)] == prefix:
                return "/".join(parts[len(prefix):]) or "."
        raise PathRefused(f"path {path!r} is not beneath {self.path}")

    def display(self, path: str) -> str:
        """The absolute form of a caller's path beneath this root (for replies and records), not resolved."""
        rel = self.relative(path)
        return self.path if rel == "." else os.path.join(self.path, rel)

    def _openat2(self, path: str, flags: int, mode: int = 0, rel: str | None = None) -> int:
        """openat2 beneath the root of ``rel`` (default: ``path`` made relative); messages name ``path``."""
        rel = self.relative(path) if rel is None else rel
        flags |= os.O_CLOEXEC if flags & os.O_PATH else os.O_CLOEXEC | os.O_NOCTTY  # openat2 takes no other with O_PATH
        fd = lib.jail_openat2(self.fd, os.fsencode(rel), flags, mode, RESOLVE)
        if fd >= 0:
            return fd
        err = -fd
        if err == errno.EXDEV:  # what openat2 says for a .., symlink or mount leading out
            raise PathRefused(f"path {path!r} leads outside {self.path} (through .., a symlink or a mount)")
        if err == errno.ELOOP:
            raise PathRefused(f"path {path!r}: a magic link or symlink loop is not followed")
        if err == errno.ENOENT:
            raise PathMissing(f"path {path!r} does not exist beneath {self.path}")
        if err == errno.EEXIST:
            raise PathExists(f"path {path!r} already exists beneath {self.path}")
        if err == errno.ENOTDIR and flags & os.O_DIRECTORY:
            raise PathRefused(f"path {path!r} is not a directory")
        raise PathRefused(f"path {path!r} cannot be opened beneath {self.path}: {os.strerror(err)}")

    def open_file(self, path: str, max_size: int | None = None) -> int:
        """A read-only descriptor of a regular file beneath the root, at most ``max_size`` bytes long. The path is
        opened O_PATH first, which opens nothing (a FIFO's open would block, a device's open can act), and only a
        regular file is then opened for reading, through its O_PATH descriptor: the same file, not the name again."""
        pathfd = self._openat2(path, os.O_PATH)
        try:
            st = os.fstat(pathfd)
            if not stat.S_ISREG(st.st_mode):
                raise PathRefused(f"path {path!r} is not a regular file ({_kind(st.st_mode)})")
            if max_size is not None and st.st_size > max_size:
                raise PathRefused(f"path {path!r} is {st.st_size} bytes, more than the {max_size} allowed")
            try:
                return os.open(f"/proc/self/fd/{pathfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
            except FileNotFoundError:  # no /proc: open it beneath the root again, O_NONBLOCK (a FIFO swapped in
                fd = self._openat2(path, os.O_RDONLY | os.O_NONBLOCK)  # meanwhile must not block us)
                if not os.path.sameopenfile(fd, pathfd):
                    os.close(fd)
                    raise PathRefused(f"path {path!r} changed while it was opened") from None
                os.set_blocking(fd, True)
                return fd
            except PermissionError:
                raise PathRefused(f"path {path!r} cannot be read: permission denied") from None
        finally:
            os.close(pathfd)

    def create_file(self, path: str, mode: int = 0o600) -> int:
        """A new regular file beneath the root, opened for writing; refused if anything exists at the path."""
        return self._openat2(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)

    def open_dir(self, path: str) -> int:
        """A descriptor of a directory beneath the root (O_RDONLY: it can be fsynced, and used with the *at
        calls: a name looked up relative to it has only one component to resolve)."""
        return self._openat2(path, os.O_RDONLY | os.O_DIRECTORY)

    def open_parent(self, path: str) -> tuple[int, str]:
        """(descriptor of the directory that would hold ``path``, beneath the root; the final name in it). The
        final name must be a plain file name: not empty, ``.`` or ``..``."""
        rel = self.relative(path)
        head, name = os.path.split(rel)
        if path.endswith("/") or name in ("", ".", ".."):
            raise PathRefused(f"path {path!r} does not end in a file name")
        return self._openat2(path, os.O_RDONLY | os.O_DIRECTORY, rel=head or "."), name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class NewFile:
    """A file to be created at a caller's ``path`` beneath ``root``, written under a temporary name in the target's
    directory (opened once, beneath the root; the temporary created O_EXCL there) and put in place by ``link``,
    which never replaces anything (link(2) fails with EEXIST). Until then the target is untouched; ``close``
    removes the temporary name (and, after ``unlink``, a target this object put in place).

    ``fd`` is the open temporary file (read-write), for whoever writes it: this process, or another it is passed
    to (SCM_RIGHTS). ``path`` is the target's absolute name, for replies."""

    def __init__(self, root: Root, path: str, mode: int = 0o644):
        self.caller_path = path
        self.path = root.display(path)
        self.dir_fd, self.name = root.open_parent(path)
        self.fd = -1
        self.temp = ""
        self.linked = False
        try:
            self.refuse_existing()
            temp = f".snapd-{secrets.token_hex(8)}.tmp"
            self.fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                              dir_fd=self.dir_fd)
            self.temp = temp
        except BaseException:
            self.close()
            raise

    @property
    def target(self) -> tuple[int, int, str]:
        """(device, inode of the directory, name): two NewFiles with the same target would collide."""
        st = os.fstat(self.dir_fd)
        return st.st_dev, st.st_ino, self.name

    def refuse_existing(self) -> None:
        try:
            st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        raise PathExists(f"path {self.caller_path!r} already exists ({_kind(st.st_mode, 'a file')}); "
                         "it is never replaced: choose another name or delete it first")

    def sync(self) -> None:
        os.fsync(self.fd)

    def link(self) -> None:
        """Give the complete temporary file its target name (refused, PathExists, if that name is taken now)."""
        try:
            os.link(self.temp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd, follow_symlinks=False)
        except FileExistsError:
            raise PathExists(f"path {self.caller_path!r} was created by someone else meanwhile; "
                             "it is never replaced") from None
        self.linked = True

    def unlink(self) -> None:
        """Take back a target this object linked (the other file of a pair failed)."""
        if self.linked:
            _unlink_quietly(self.name, self.dir_fd)
            self.linked = False

    def close(self) -> None:
        """Remove the temporary name, fsync the directory if a target was put in place, close everything."""
        if self.temp:
            _unlink_quietly(self.temp, self.dir_fd)
            self.temp = ""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd >= 0:
            if self.linked:
                os.fsync(self.dir_fd)
            os.close(self.dir_fd)
            self.dir_fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _kind(mode: int, otherwise: str = "not a regular file") -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return otherwise
