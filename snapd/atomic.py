"""Crash-safe file replacement: readers see the old file or the complete new one, never a torn one.

Every temporary file is ``.NAME.tmp-PID-RANDOM`` in the target's directory, and its writer holds an
open-file-description lock (``F_OFD_SETLKW``, a write lock on the whole file) on it from creation until it is
renamed or removed. A crash (kill -9, power loss) can leave one behind; ``remove_stale_temps`` removes those whose
lock nobody holds. The lock, not the PID in the name, tells a live writer from a dead one: a writer in another PID
namespace (a jailed VMM writing into a shared directory) has a PID that means nothing here, and PIDs are reused.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_file", "atomic_pair", "AtomicPair", "fsync_dir", "remove_stale_temps",
           "TEMP_NAME"]

# A temporary name of this module: dot, the target's name, ".tmp-", the writer's PID, 8 hex digits.
TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9]+-[0-9a-f]{8}$", re.DOTALL)
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock (x86-64 / LP64): l_type, l_whence, l_start, l_len, l_pid
_CREATE_TRIES = 8


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename/creation inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: str) -> str:
    head, tail = os.path.split(path)
    # Dot-prefixed and random so it can never collide with, or be mistaken for, a final name.
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _ofd_lock(fd: int, kind: int, wait: bool) -> bool:
    """Take an open-file-description lock on the whole file: True if taken, False if another holds a conflicting
    one (``wait`` False) or the file system has no such locks."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            return False
        raise
    return True


def _create_temp(path: str, mode: int) -> tuple[str, int]:
    """(name, descriptor) of a new temporary file for ``path``, locked by this open file description.

    ``remove_stale_temps`` may find the file between its creation and the lock and remove it (it holds a lock
    while it unlinks, so the lock taken here waits for it to finish): a file with no link left is dropped and
    another name tried."""
    for _ in range(_CREATE_TRIES):
        tmp = _temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except OSError as exc:  # named by its target: the temporary name means nothing to the caller
            raise OSError(exc.errno, exc.strerror, path) from None
        try:
            _ofd_lock(fd, fcntl.F_WRLCK, wait=True)
            if os.fstat(fd).st_nlink > 0:
                return tmp, fd
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        os.close(fd)
    raise OSError(errno.EAGAIN, f"temporary files for {path} kept being removed as they were created")


def remove_stale_temps(directory: str | os.PathLike) -> list[str]:
    """Remove the temporary files (``.NAME.tmp-PID-RANDOM``) in ``directory`` that no live writer holds: what a
    crashed writer left. Best effort: a directory that cannot be listed or a file that cannot be removed is left
    as it is. Returns the names removed."""
    directory = os.fspath(directory) or "."
    removed = []
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return removed
    try:
        try:
            names = [n for n in os.listdir(dir_fd) if TEMP_NAME.match(n)]
        except OSError:
            return removed
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or not _ofd_lock(fd, fcntl.F_RDLCK, wait=False):
                    continue  # a live writer holds it (or it is no file of ours)
                now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    continue
                os.unlink(name, dir_fd=dir_fd)  # under the lock: a writer that just created it sees no link left
                removed.append(name)
            except OSError:
                continue
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file to write; on clean exit it is fsynced and renamed to `path`.

    On an exception the temporary file is removed and `path` is left untouched.
    Use this for large outputs (memory files) that should be streamed, not held in memory.
    """
    path = os.fspath(path)
    tmp, fd = _create_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.rename(tmp, path)  # before the close: the lock is held until the temporary name is gone
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def atomic_write(path: str | os.PathLike, data: bytes | bytearray | memoryview | Iterable[bytes],
                 mode: int = 0o644) -> None:
    """Write `data` (bytes or an iterable of byte chunks) to `path` atomically and durably."""
    with atomic_file(path, mode) as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            for piece in data:
                f.write(piece)


class AtomicPair:
    """Two new files that are published together or not at all: ``first`` (published first) and ``second``.

    Both temporary files are created at once, in their targets' directories (a target directory that is missing
    or not writable fails here, before anything is written), after the stale temporaries of those directories are
    removed. ``files`` are the two open files to write. ``publish`` fsyncs both, renames ``first`` into place and
    fsyncs its directory, then renames ``second`` and fsyncs its directory: once ``second`` is durable under its
    name, ``first`` is too. A failure to put ``second`` in place takes back the ``first`` just published. Until
    ``publish`` the targets are untouched; ``discard`` removes what is left of the temporaries.

    What a crash between the renames leaves (a new ``first`` beside an old ``second``) is for the files' own
    contents to reveal: a snapshot's state file names its memory file's identity (docs/snapshot-format.md)."""

    def __init__(self, first: str | os.PathLike, second: str | os.PathLike, mode: int = 0o644):
        self.paths = (os.fspath(first), os.fspath(second))
        self.temps: list[str] = []
        self.files: list[BinaryIO] = []
        self.published = 0
        try:
            if os.path.normpath(self.paths[0]) == os.path.normpath(self.paths[1]):
                raise ValueError(f"{self.paths[0]}: the two files of a pair need two names")
            for path in self.paths:
                if os.path.isdir(path):  # renaming over it would fail only after the other one was published
                    raise IsADirectoryError(errno.EISDIR, "is a directory", path)
            for directory in dict.fromkeys(os.path.dirname(p) or "." for p in self.paths):
                remove_stale_temps(directory)
            for path in self.paths:
                tmp, fd = _create_temp(path, mode)
                self.temps.append(tmp)
                self.files.append(os.fdopen(fd, "wb"))
        except BaseException:
            self.discard()
            raise

    def sync(self) -> None:
        for f in self.files:
            f.flush()
            os.fsync(f.fileno())

    def publish_first(self) -> None:
        os.rename(self.temps[0], self.paths[0])
        self.published = 1
        fsync_dir(os.path.dirname(self.paths[0]) or ".")

    def publish_second(self) -> None:
        try:
            os.rename(self.temps[1], self.paths[1])
        except BaseException:
            self._take_back_first()
            raise
        self.published = 2
        fsync_dir(os.path.dirname(self.paths[1]) or ".")

    def publish(self) -> None:
        self.sync()
        self.publish_first()
        self.publish_second()
        self.close()

    def _take_back_first(self) -> None:
        """Unlink the first target if it is still the file this pair put there."""
        with contextlib.suppress(OSError):
            mine, there = os.fstat(self.files[0].fileno()), os.stat(self.paths[0], follow_symlinks=False)
            if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                os.unlink(self.paths[0])
                fsync_dir(os.path.dirname(self.paths[0]) or ".")
        self.published = 0

    def close(self) -> None:
        for f in self.files:
            with contextlib.suppress(OSError):
                f.close()
        self.files = []

    def discard(self) -> None:
        """Remove the temporaries not yet published (and close the files)."""
        if self.published == 1:
            self._take_back_first()
        for tmp in self.temps[self.published:]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.temps = self.temps[:self.published]
        self.close()


@contextlib.contextmanager
def atomic_pair(first: str | os.PathLike, second: str | os.PathLike,
                mode: int = 0o644) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """Yield (first file, second file) to write; on clean exit both are published (``AtomicPair.publish``), on an
    exception neither is and the temporaries are removed."""
    pair = AtomicPair(first, second, mode)
    try:
        yield pair.files[0], pair.files[1]
        pair.publish()
    except BaseException:
        pair.discard()
        raise
