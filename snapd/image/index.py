"""Image index file: header, one fixed 64-byte entry per chunk, BLAKE2b-256 trailer.

Byte layout in docs/image-format.md. Entries are fixed-size so entry i is at
header_size + 64 * i and any chunk can be located without reading the others.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

from snapd.atomic import atomic_write
from snapd.image.errors import ImageFormatError, IndexTruncated

MAGIC = b"UVMIMG\0\0"
VERSION = (1, 0)
# A diff layer's index: the 1.0 layout plus the parent's identity after the store path, and entries
# whose codec is CODEC_PARENT ("this chunk is the parent's"). Major 2 so that a 1.x reader refuses a
# layer instead of serving it as a whole image.
LAYER_VERSION = (2, 0)
READABLE_MAJORS = (1, 2)
CODEC_PARENT = 255
LAYER_EXT = struct.Struct("<32sH")  # parent content id, parent path length (then the path, UTF-8)
MIN_CHUNK, MAX_CHUNK = 4096, 2 << 20
# magic, major, minor, header_size, chunk_size, codec, reserved, level, mem_size, nchunks,
# content_id, source_id length, store path length
HEADER = struct.Struct("<8sHHIIBBhQQ32sHH")
ENTRY = struct.Struct("<32sB3xIQI4xQ")  # hash, codec, pack id, offset, stored_len, xxh3_64(stored)
DIGEST_LEN = 32
ALIGN = 64
_CODEC_AT = 32  # offset of an entry's codec byte
_BASE_CODECS = bytes((0, 1, 2, 3))  # zero, raw, lz4, zstd (snapd.image.codecs; a fixed ABI)
_LAYER_CODECS = _BASE_CODECS + bytes((CODEC_PARENT,))


class Entry(NamedTuple):
    hash: bytes
    codec: int
    pack_id: int
    offset: int
    stored_len: int
    checksum: int


@dataclass(frozen=True)
class Header:
    chunk_size: int
    codec: int          # codec requested for newly stored chunks (entries may differ: dedup keeps the first)
    level: int
    mem_size: int
    nchunks: int
    content_id: bytes   # BLAKE2b-256 over chunk size, memory size and every chunk's hash (zeros for zero chunks)
    source_id: str      # caller-supplied name of the snapshot this image was built from
    store_path: str     # chunk store directory, relative to the index file's directory unless absolute
    version: tuple[int, int] = VERSION
    header_size: int = 0
    parent_id: bytes = b""   # layers only: content id the parent image must have
    parent_path: str = ""    # layers only: parent index, relative to this index's directory unless absolute

    @property
    def is_layer(self) -> bool:
        return bool(self.parent_id)


def check_chunk_size(chunk_size: int) -> None:
    if not (MIN_CHUNK <= chunk_size <= MAX_CHUNK) or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk size {chunk_size} must be a power of two from 4 KiB to 2 MiB")


def nchunks_for(mem_size: int, chunk_size: int) -> int:
    return -(-mem_size // chunk_size)


def content_id(chunk_size: int, mem_size: int, hashes) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_LEN)
    h.update(struct.pack("<QQ", chunk_size, mem_size))
    for x in hashes:
        h.update(x)
    return h.digest()


def encode_index(hdr: Header, entries: list[Entry]) -> bytes:
    src, store = hdr.source_id.encode(), hdr.store_path.encode()
    ext = b""
    version = VERSION
    if hdr.is_layer:
        parent = hdr.parent_path.encode()
        ext = LAYER_EXT.pack(hdr.parent_id, len(parent)) + parent
        version = LAYER_VERSION
    fixed = HEADER.size + len(src) + len(store) + len(ext)
    header_size = -(-fixed // ALIGN) * ALIGN
    head = HEADER.pack(MAGIC, version[0], version[1], header_size, hdr.chunk_size, hdr.codec, 0,
                       hdr.level, hdr.mem_size, len(entries), hdr.content_id, len(src), len(store))
    body = b"".join([head, src, store, ext, bytes(header_size - fixed)] +
                    [ENTRY.pack(*e) for e in entries])
    return body + hashlib.blake2b(body, digest_size=DIGEST_LEN).digest()


def write_index(path: str | os.PathLike, hdr: Header, entries: list[Entry]) -> None:
    atomic_write(path, encode_index(hdr, entries))


def decode_index(data: bytes, name: str) -> tuple[Header, memoryview]:
    """Validate the whole index; return the header and a view of the packed entries."""
    size = len(data)
    if size == 0:
        raise IndexTruncated(name, "index file is empty")
    if data[:len(MAGIC)] != MAGIC[:min(size, len(MAGIC))]:
        raise ImageFormatError(name, "not an image index (it does not begin with the index magic)")
    if size < HEADER.size:
        raise IndexTruncated(name, f"index truncated: {size} bytes, header alone is {HEADER.size}")
    (_, major, minor, header_size, chunk_size, codec, _, level, mem_size, nchunks, cid,
     src_len, store_len) = HEADER.unpack_from(data)
    if major not in READABLE_MAJORS:
        raise ImageFormatError(name, f"index format {major}.{minor} is not supported "
                                     f"(reader: {', '.join(f'{m}.x' for m in READABLE_MAJORS)})")
    expected = header_size + nchunks * ENTRY.size + DIGEST_LEN
    if size < expected:
        raise IndexTruncated(name, f"index truncated: {size} bytes, header declares {expected}")
    if size > expected:
        raise ImageFormatError(name, f"{size - expected} bytes of trailing data after the index checksum")
    view = memoryview(data)
    if hashlib.blake2b(view[:-DIGEST_LEN], digest_size=DIGEST_LEN).digest() != view[-DIGEST_LEN:]:
        raise ImageFormatError(name, "index checksum mismatch (index file is corrupt)")
    # The checksum held, so what follows are writer bugs or hand-made files, not bit rot.
    if header_size < HEADER.size + src_len + store_len:
        raise ImageFormatError(name, f"header size {header_size} too small")
    if header_size % ALIGN:
        raise ImageFormatError(name, f"header size {header_size} is not a multiple of {ALIGN}")
    try:
        check_chunk_size(chunk_size)
    except ValueError as exc:
        raise ImageFormatError(name, str(exc)) from None
    if nchunks != nchunks_for(mem_size, chunk_size):
        raise ImageFormatError(name, f"{nchunks} chunks do not cover {mem_size} bytes of memory")
    p = HEADER.size
    try:
        src = bytes(view[p:p + src_len]).decode()
        store = bytes(view[p + src_len:p + src_len + store_len]).decode()
    except UnicodeDecodeError:
        raise ImageFormatError(name, "source id or store path is not UTF-8") from None
    if "\0" in store:
        raise ImageFormatError(name, "store path holds a NUL byte (no path can)")
    parent_id, parent_path = b"", ""
    if major == LAYER_VERSION[0]:
        q = p + src_len + store_len
        if header_size < q + LAYER_EXT.size:
            raise ImageFormatError(name, f"header size {header_size} too small for a layer")
        parent_id, plen = LAYER_EXT.unpack_from(view, q)
        if header_size < q + LAYER_EXT.size + plen or parent_id == bytes(32):
            raise ImageFormatError(name, "layer header names no parent")
        try:
            parent_path = bytes(view[q + LAYER_EXT.size:q + LAYER_EXT.size + plen]).decode()
        except UnicodeDecodeError:
            raise ImageFormatError(name, "parent path is not UTF-8") from None
        if not parent_path or "\0" in parent_path:
            raise ImageFormatError(name, "layer parent path is empty or holds a NUL byte")
    entries = view[header_size:header_size + nchunks * ENTRY.size]
    # Every entry's codec is one this reader knows (CODEC_PARENT only in a layer, which has a parent to take the
    # chunk from): one C pass over the codec bytes, so a hostile entry fails here, not deep in a read.
    codec_bytes = bytes(entries[_CODEC_AT::ENTRY.size])
    stray = codec_bytes.translate(None, _LAYER_CODECS if parent_id else _BASE_CODECS)
    if stray:
        chunk = codec_bytes.index(stray[:1])
        raise ImageFormatError(name, f"unknown codec id {stray[0]}"
                                     + (" (a base image has no parent to take it from)" if stray[0] == CODEC_PARENT
                                        else ""), chunk)
    hdr = Header(chunk_size, codec, level, mem_size, nchunks, cid, src, store, (major, minor), header_size,
                 parent_id, parent_path)
    return hdr, entries
