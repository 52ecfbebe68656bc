"""Read a base image: locate, verify and decompress chunks; expose the chunk table for the page server."""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from typing import NamedTuple

import xxhash

from snapd.image import codecs
from snapd.image.chunkstore import pack_name
from snapd.image.errors import (ChunkCorrupt, ChunkOutOfBounds, ImageError, LayerParentMismatch,
                                LayerParentMissing, PackMissing)
from snapd.image.index import CODEC_PARENT, ENTRY, Entry, Header, decode_index

MAX_LAYERS = 64  # a chain deeper than this is a cycle or a mistake
MAX_FILE_OFFSET = (1 << 63) - 1  # off_t


def max_stored_len(chunk_size: int) -> int:
    """The most stored bytes a chunk may have: the C page server's bound (chunk_source.c), above any codec's
    worst case for a chunk_size input (a builder stores a chunk raw when its codec does not shrink it)."""
    return 2 * chunk_size + 65536


def read_index_file(path: str) -> bytes:
    """The bytes of the index file at ``path``, which must be a regular file (a FIFO would block the open, a
    device like /dev/zero never end); OS errors become ImageError naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageError(path, "image index not found") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ImageError(path, f"cannot open the image index: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(path, "the image index is not a regular file")
        pieces, left = [], st.st_size + 1  # +1: a file that grew meanwhile is read to its new size and refused
        while left > 0:
            piece = os.read(fd, min(left, 1 << 24))
            if not piece:
                break
            pieces.append(piece)
            left -= len(piece)
        return b"".join(pieces)
    except OSError as exc:
        raise ImageError(path, f"cannot read the image index: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


class ChunkRef(NamedTuple):
    pack_path: str
    offset: int
    stored_len: int
    codec: int
    checksum: int


@dataclass(frozen=True)
class ImageStats:
    mem_size: int
    chunk_size: int
    nchunks: int
    zero_chunks: int
    dup_chunks: int        # non-zero chunks whose content already appeared earlier in this image
    unique_chunks: int
    stored_bytes: int      # bytes of distinct stored chunks this image references
    codecs: dict[str, int]  # chunk count per codec actually stored

    @property
    def ratio(self) -> float:
        return self.mem_size / self.stored_bytes if self.stored_bytes else float("inf")

    @property
    def zero_fraction(self) -> float:
        return self.zero_chunks / self.nchunks if self.nchunks else 0.0

    @property
    def dup_fraction(self) -> float:
        return self.dup_chunks / self.nchunks if self.nchunks else 0.0


class BaseImage:
    """A base image, or a diff layer over a parent image (self.parent, opened and checked with it):
    a layer's chunks marked CODEC_PARENT are read from the parent, so every method below sees the
    composition of the chain, top layer winning."""

    def __init__(self, path: str, header: Header, entries: memoryview, store_dir: str,
                 parent: "BaseImage | None" = None):
        self.path = path
        self.header = header
        self.store_dir = store_dir
        self.parent = parent
        self._entries = entries
        self._fds: dict[int, int] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, store: str | os.PathLike | None = None, _depth: int = 0) -> "BaseImage":
        """Open and validate an index; `store` overrides the store path recorded in it (this image only:
        a layer's parents use their own). A layer's parent chain is opened and checked too."""
        path = os.fspath(path)
        hdr, entries = decode_index(read_index_file(path), path)
        if store is None:
            store = os.path.join(os.path.dirname(os.path.abspath(path)), hdr.store_path)
        parent = cls._open_parent(path, hdr, _depth) if hdr.is_layer else None
        return cls(path, hdr, entries, os.path.normpath(os.fspath(store)), parent)

    @classmethod
    def _open_parent(cls, path: str, hdr: Header, depth: int) -> "BaseImage":
        if depth >= MAX_LAYERS:
            raise ImageError(path, f"more than {MAX_LAYERS} layers (a cycle?)")
        parent_path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), hdr.parent_path))
        if not os.path.exists(parent_path):
            raise LayerParentMissing(path, f"diff layer over {parent_path}, which is missing "
                                           f"(base image {hdr.parent_id.hex()[:16]} needed)")
        parent = cls.open(parent_path, _depth=depth + 1)
        if parent.header.content_id != hdr.parent_id:
            parent.close()
            raise LayerParentMismatch(path, f"diff layer built over image {hdr.parent_id.hex()[:16]}, but "
                                            f"{parent_path} is now {parent.header.content_id.hex()[:16]} "
                                            "(the base was altered or replaced)")
        if (parent.chunk_size, parent.mem_size) != (hdr.chunk_size, hdr.mem_size):
            parent.close()
            raise LayerParentMismatch(path, f"parent {parent_path} has {parent.mem_size} bytes in "
                                            f"{parent.chunk_size}-byte chunks, the layer {hdr.mem_size} in "
                                            f"{hdr.chunk_size}-byte chunks")
        return parent

    def chain(self) -> list["BaseImage"]:
        """This image, then its parents down to the base."""
        out, img = [], self
        while img is not None:
            out.append(img)
            img = img.parent
        return out

    def owner(self, i: int) -> tuple["BaseImage", Entry]:
        """The image of the chain that holds chunk i, and its entry there."""
        img = self
        e = img.entry(i)
        while e.codec == CODEC_PARENT:
            img = img.parent
            e = img.entry(i)
        return img, e

    chunk_size = property(lambda self: self.header.chunk_size)
    mem_size = property(lambda self: self.header.mem_size)
    nchunks = property(lambda self: self.header.nchunks)

    def entry(self, i: int) -> Entry:
        if not 0 <= i < self.nchunks:
            raise IndexError(f"{self.path}: chunk {i} out of range (0..{self.nchunks - 1})")
        return Entry._make(ENTRY.unpack_from(self._entries, i * ENTRY.size))

    def raw_len(self, i: int) -> int:
        return min(self.chunk_size, self.mem_size - i * self.chunk_size)

    def pack_path(self, pack_id: int) -> str:
        return os.path.join(self.store_dir, "packs", pack_name(pack_id))

    def chunk_table(self) -> list[ChunkRef]:
        """(pack_path, offset, stored_len, codec, checksum) per chunk, in order; ZERO chunks: codec 0.
        For a layer: the composition of the chain (a chunk the layer holds wins over its parents')."""
        paths: dict[int, str] = {}
        out = []
        below = self.parent.chunk_table() if self.parent is not None else None
        bound = max_stored_len(self.chunk_size)
        for i, (h, codec, pack, off, slen, csum) in enumerate(ENTRY.iter_unpack(self._entries)):
            if codec == CODEC_PARENT:
                out.append(below[i])
            elif codec == codecs.ZERO:
                out.append(ChunkRef("", 0, 0, codecs.ZERO, 0))
            else:
                if not 0 < slen <= bound or off + slen > MAX_FILE_OFFSET:
                    raise ChunkCorrupt(self.path, f"implausible stored length {slen} at offset {off} for a "
                                                  f"{self.chunk_size}-byte chunk", i)
                p = paths.get(pack) or paths.setdefault(pack, self.pack_path(pack))
                out.append(ChunkRef(p, off, slen, codec, csum))
        return out

    def read_stored(self, i: int) -> tuple[Entry, bytes]:
        """The chunk's stored (compressed) bytes after the checksum check."""
        e = self.entry(i)
        if e.codec == CODEC_PARENT:
            return self.parent.read_stored(i)
        if e.codec == codecs.ZERO:
            return e, b""
        if not 0 < e.stored_len <= max_stored_len(self.chunk_size) or e.offset + e.stored_len > MAX_FILE_OFFSET:
            # Refused before anything is allocated or read: a length field may claim gigabytes.
            raise ChunkCorrupt(self.path, f"implausible stored length {e.stored_len} at offset {e.offset} for a "
                                          f"{self.chunk_size}-byte chunk", i)
        fd = self._pack_fd(e.pack_id, i)
        data = os.pread(fd, e.stored_len, e.offset)
        if len(data) != e.stored_len:
            size = os.fstat(fd).st_size
            raise ChunkOutOfBounds(self.path, f"points at bytes {e.offset}..{e.offset + e.stored_len} of "
                                   f"{self.pack_path(e.pack_id)}, which has {size} bytes", i)
        if xxhash.xxh3_64_intdigest(data) != e.checksum:
            raise ChunkCorrupt(self.path, f"checksum mismatch in {self.pack_path(e.pack_id)} "
                               f"at offset {e.offset}", i)
        return e, data

    def read_chunk(self, i: int, check_hash: bool = False) -> bytes:
        """Chunk i uncompressed; check_hash also checks it against the content hash (slower)."""
        e, data = self.read_stored(i)
        try:
            raw = codecs.decode(e.codec, data, self.raw_len(i))
        except codecs.CodecError as exc:
            raise ChunkCorrupt(self.path, str(exc), i) from None
        if check_hash and e.codec != codecs.ZERO and hashlib.blake2b(raw, digest_size=32).digest() != e.hash:
            raise ChunkCorrupt(self.path, "content does not match its content hash", i)
        return raw

    def verify(self, progress=None) -> None:
        """Check every chunk: stored checksum, decompression and content hash. Raises on the first failure."""
        for i in range(self.nchunks):
            self.read_chunk(i, check_hash=True)
            if progress is not None:
                progress(i + 1, self.nchunks)

    def stats(self) -> ImageStats:
        zero = dup = stored = 0
        seen: set[bytes] = set()
        places: set[tuple[int, int]] = set()
        per_codec: dict[str, int] = {}
        for h, codec, pack, off, slen, _ in ENTRY.iter_unpack(self._entries):
            name = "parent" if codec == CODEC_PARENT else codecs.NAMES.get(codec, str(codec))
            if codec == CODEC_PARENT:
                per_codec[name] = per_codec.get(name, 0) + 1
                continue
            per_codec[name] = per_codec.get(name, 0) + 1
            if codec == codecs.ZERO:
                zero += 1
                continue
            if h in seen:
                dup += 1
            seen.add(h)
            if (pack, off) not in places:
                places.add((pack, off))
                stored += slen
        return ImageStats(self.mem_size, self.chunk_size, self.nchunks, zero, dup, len(seen), stored, per_codec)

    def _pack_fd(self, pack_id: int, chunk: int) -> int:
        fd = self._fds.get(pack_id)
        if fd is None:
            try:  # O_NONBLOCK: a FIFO in the pack's place must not block the open (it is refused below)
                fd = os.open(self.pack_path(pack_id), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:
                raise PackMissing(self.path, f"pack {self.pack_path(pack_id)} is missing", chunk) from None
            except OSError as exc:  # a directory where the pack should be, no permission
                raise PackMissing(self.path, f"pack {self.pack_path(pack_id)} cannot be opened: "
                                             f"{exc.strerror or exc}", chunk) from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise PackMissing(self.path, f"pack {self.pack_path(pack_id)} is not a regular file", chunk)
            self._fds[pack_id] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self.parent is not None:
            self.parent.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
