"""Loading sets: the image chunks a restored VM touched, in first-touch order, stored beside the image.

A loading set is recorded once by the page server (PageServer.attach/serve(record=True), then
stop_recording) and replayed on later restores (serve(..., mode="prefetch", loading_set=...)): the
server installs those chunks in bulk, first-touch order first, while faults are still served ahead
of the stream. Byte layout (all integers little-endian) in docs/page-server.md, "Loading sets":

    0   8  magic b"UVMLSET\\0"
    8   2  major version (u16) = 1; readers refuse other majors
    10  2  minor version (u16) = 0
    12  4  chunk_size (u32)
    16  8  mem_size (u64)
    24 32  image identity: the image index's content id (docs/image-format.md)
    56  4  count (u32)
    60  4  reserved, 0
    64  4*count  chunk indices (u32), first-touch order, no duplicates
    ..  32 BLAKE2b-256 of every byte before it
"""
from __future__ import annotations

import hashlib
import os
import stat
import struct
from dataclasses import dataclass
from typing import Sequence

from snapd.atomic import atomic_write
from snapd.image.errors import ImageError
from snapd.image.index import MAX_CHUNK, MIN_CHUNK

MAGIC = b"UVMLSET\0"
VERSION = (1, 0)
HEADER = struct.Struct("<8sHHIQ32sII")
DIGEST_LEN = 32
FILE_SUFFIX = ".loadset"


class LoadingSetError(ImageError):
    """A loading set cannot be used; the message names the file (and the chunk when there is one)."""


class LoadingSetCorrupt(LoadingSetError):
    """Not a loading set, another major version, truncated, trailing data or checksum mismatch."""


class LoadingSetStale(LoadingSetError):
    """The loading set was recorded on another image (identity, chunk size or memory size differ)."""


class LoadingSetOutOfRange(LoadingSetError):
    """The loading set names a chunk the image does not have."""


def default_path(image_path: str | os.PathLike) -> str:
    """Where a loading set of an image is kept: beside its index, IMAGE.loadset."""
    return os.fspath(image_path) + FILE_SUFFIX


@dataclass(frozen=True)
class LoadingSet:
    identity: bytes          # content id of the image it was recorded on (b"" when the image had none)
    chunk_size: int
    mem_size: int
    chunks: tuple[int, ...]  # image chunk indices, first touch first
    path: str = ""           # the file it was read from, for messages

    @property
    def nchunks(self) -> int:
        return -(-self.mem_size // self.chunk_size) if self.chunk_size else 0

    @property
    def name(self) -> str:
        return self.path or "loading set"

    # -- bytes ------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        ident = self.identity.ljust(32, b"\0")[:32]
        body = HEADER.pack(MAGIC, VERSION[0], VERSION[1], self.chunk_size, self.mem_size, ident,
                           len(self.chunks), 0) + struct.pack(f"<{len(self.chunks)}I", *self.chunks)
        return body + hashlib.blake2b(body, digest_size=DIGEST_LEN).digest()

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "loading set") -> "LoadingSet":
        size = len(data)
        if size == 0:
            raise LoadingSetCorrupt(name, "loading set file is empty")
        if data[:len(MAGIC)] != MAGIC[:min(size, len(MAGIC))]:
            raise LoadingSetCorrupt(name, "not a loading set (it does not begin with the loading-set magic)")
        if size < HEADER.size:
            raise LoadingSetCorrupt(name, f"loading set truncated: {size} bytes, the header alone is {HEADER.size}")
        _, major, minor, chunk_size, mem_size, ident, count, _ = HEADER.unpack_from(data)
        if major != VERSION[0]:
            raise LoadingSetCorrupt(name, f"loading set format {major}.{minor} is not supported "
                                          f"(reader: {VERSION[0]}.x)")
        expected = HEADER.size + 4 * count + DIGEST_LEN
        if size < expected:
            raise LoadingSetCorrupt(name, f"loading set truncated: {size} bytes, header declares {expected}")
        if size > expected:
            raise LoadingSetCorrupt(name, f"{size - expected} bytes of trailing data after the checksum")
        if hashlib.blake2b(data[:-DIGEST_LEN], digest_size=DIGEST_LEN).digest() != data[-DIGEST_LEN:]:
            raise LoadingSetCorrupt(name, "loading set checksum mismatch (file is corrupt)")
        if not (MIN_CHUNK <= chunk_size <= MAX_CHUNK) or chunk_size & (chunk_size - 1):
            raise LoadingSetCorrupt(name, f"chunk size {chunk_size} is not an image's (a power of two from "
                                          f"{MIN_CHUNK} to {MAX_CHUNK})")
        chunks = struct.unpack_from(f"<{count}I", data, HEADER.size)
        if len(set(chunks)) != len(chunks):
            raise LoadingSetCorrupt(name, "loading set lists a chunk twice")
        ident = b"" if ident == bytes(32) else ident
        return cls(ident, chunk_size, mem_size, tuple(chunks), name)

    def save(self, path: str | os.PathLike) -> None:
        """Atomically (temp file, fsync, rename, directory fsync)."""
        atomic_write(path, self.to_bytes())

    @staticmethod
    def max_file_size(mem_size: int, chunk_size: int) -> int:
        """The largest loading-set file an image of ``mem_size`` bytes in ``chunk_size``-byte chunks can have (each
        chunk listed once): a bound to check before reading a caller's file into memory."""
        return HEADER.size + 4 * -(-mem_size // max(chunk_size, 1)) + DIGEST_LEN

    @classmethod
    def read_fd(cls, fd: int, name: str, max_size: int) -> "LoadingSet":
        """The loading set in an open file (read once, from its start, from the descriptor); a file larger than
        ``max_size`` (``max_file_size``) is refused before anything is read into memory."""
        try:
            size = os.fstat(fd).st_size
            if size > max_size:
                raise LoadingSetCorrupt(name, f"{size} bytes, more than the {max_size} a loading set of this image "
                                              "can have")
            data = os.pread(fd, size + 1, 0)  # +1: a file that grew after the fstat is refused, not cut
        except OSError as exc:
            raise LoadingSetCorrupt(name, f"cannot read it: {exc.strerror or exc}") from None
        if len(data) > size:
            raise LoadingSetCorrupt(name, "the file grew while it was read")
        return cls.from_bytes(data, name)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LoadingSet":
        path = os.fspath(path)
        try:  # O_NONBLOCK: a FIFO must not block the open; it is refused as not a regular file below
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise LoadingSetCorrupt(path, "loading set file not found") from None
        except (OSError, ValueError) as exc:  # a directory, no permission, a NUL byte: the caller's mistake, named
            raise LoadingSetCorrupt(path, f"cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # /dev/zero would never end
                raise LoadingSetCorrupt(path, "cannot read it: not a regular file")
            # Its own header bounds it: 4 bytes per chunk of a count that is a u32 (16 GiB), so the file's size,
            # known before reading, is the bound; the file is read once, to one byte past it.
            return cls.read_fd(fd, path, st.st_size)
        finally:
            os.close(fd)

    # -- use --------------------------------------------------------------------------------------
    def check_for(self, identity: bytes, chunk_size: int, mem_size: int, image_name: str = "the image") -> None:
        """Raise LoadingSetStale / LoadingSetOutOfRange unless this set fits that image.

        An image without an identity (a hand-made chunk table) is checked on geometry alone."""
        if identity and self.identity and identity != self.identity:
            raise LoadingSetStale(self.name, f"recorded on image {self.identity.hex()[:16]}, not on "
                                             f"{image_name} ({identity.hex()[:16]}): re-record it")
        if (chunk_size, mem_size) != (self.chunk_size, self.mem_size):
            raise LoadingSetStale(self.name, f"recorded on {self.mem_size} bytes in {self.chunk_size}-byte chunks, "
                                             f"{image_name} has {mem_size} bytes in {chunk_size}-byte chunks")
        nchunks = -(-mem_size // chunk_size) if chunk_size > 0 else 0
        for c in self.chunks:
            if c >= nchunks:
                raise LoadingSetOutOfRange(self.name, f"absent from {image_name}, which has {nchunks} chunks", c)

    def check_image(self, image) -> None:
        """image: a pageserver Image, ChunkTable or snapd.image BaseImage."""
        identity = getattr(image, "identity", None)
        if identity is None:
            identity = image.header.content_id
        self.check_for(identity, image.chunk_size, image.mem_size, getattr(image, "name", None) or image.path)

    def bytes_covered(self) -> int:
        return sum(min(self.chunk_size, self.mem_size - c * self.chunk_size) for c in self.chunks)


def merge(sets: Sequence[LoadingSet], path: str = "") -> LoadingSet:
    """Union of loading sets of one image, each chunk at its earliest position in any of them
    (ties: the earlier set wins), so chunks every invocation needs first stay first."""
    if not sets:
        raise ValueError("nothing to merge")
    first = sets[0]
    for s in sets[1:]:
        s.check_for(first.identity, first.chunk_size, first.mem_size, first.name)
    best: dict[int, tuple[int, int]] = {}
    for k, s in enumerate(sets):
        for pos, c in enumerate(s.chunks):
            key = (pos, k)
            if c not in best or key < best[c]:
                best[c] = key
    ordered = sorted(best, key=lambda c: best[c])
    return LoadingSet(first.identity, first.chunk_size, first.mem_size, tuple(ordered), path)

