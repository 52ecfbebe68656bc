"""Crash-safe file replacement: readers see the old file or the complete new one, never a torn one."""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable, Iterator
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_file", "fsync_dir"]


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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file to write; on clean exit it is fsynced and renamed to `path`.

    On an exception the temporary file is removed and `path` is left untouched.
    Use this for large outputs (memory files) that should be streamed, not held in memory.
    """
    path = os.fspath(path)
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
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
