"""Build a base image from a raw guest-memory file: cut, hash, dedup, compress, store, index."""
from __future__ import annotations

import collections
import errno
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import xxhash

from snapd.image import codecs
from snapd.image.chunkstore import ChunkStore, NewChunk
from snapd.image.errors import ImageError
from snapd.image.index import Entry, Header, check_chunk_size, content_id, nchunks_for, write_index
from snapd.snapfile import SnapshotFormatError, memory_data_size

DEFAULT_CHUNK_SIZE = 512 << 10   # see docs/image-format.md, "Choosing the default chunk size and codec"
DEFAULT_CODEC = "lz4"
BATCH_BYTES = 64 << 20           # raw bytes of new chunks gathered per locked store append
INFLIGHT_BYTES = 64 << 20       # raw bytes submitted to workers but not yet consumed
_ZERO_HASH = bytes(32)


@dataclass(frozen=True)
class BuildResult:
    image_path: str
    nchunks: int
    zero_chunks: int
    dup_chunks: int       # non-zero chunks already in the store or earlier in this image
    new_chunks: int       # chunks this build added to the store
    new_stored_bytes: int


def resolve_codec(codec: str, level: int | None) -> tuple[int, int]:
    """(codec id, level) to build chunks with; 'zero' is what a build finds, not a codec to choose."""
    cid = codecs.codec_id(codec)
    if cid == codecs.ZERO:
        raise codecs.CodecError("'zero' is not a codec to build with")
    return cid, codecs.DEFAULT_LEVEL[cid] if level is None else level


def new_chunk(buf, digest: bytes, codec: int, level: int) -> NewChunk:
    """A chunk the store does not hold yet: compressed, with the checksum of its stored bytes."""
    used, stored = codecs.encode(buf, codec, level)
    return NewChunk(digest, used, stored, len(buf), xxhash.xxh3_64_intdigest(stored))


def _chunk_job(fd, mem_size, chunk_size, codec, level, known):
    zero = bytes(chunk_size)

    def job(i: int):
        start = i * chunk_size
        length = min(chunk_size, mem_size - start)
        buf = os.pread(fd, length, start)  # releases the GIL; a descriptor, not a mapping: a file truncated
        if len(buf) != length:             # under us is an error here, not a SIGBUS in the daemon
            raise OSError(errno.EIO, f"the memory file ended at byte {start + len(buf)} while it was read "
                                     f"(it was {mem_size} bytes): it changed during the build")
        if buf == zero[:length]:  # bytes == bytes compares with memcmp; far cheaper than hashing
            return i, None, None
        h = hashlib.blake2b(buf, digest_size=32).digest()  # releases the GIL on large buffers
        if known(h):
            return i, h, None
        return i, h, new_chunk(buf, h, codec, level)
    return job


def build_image(mem_path: str | os.PathLike | int, store_dir: str | os.PathLike, image_path: str | os.PathLike,
                chunk_size: int = DEFAULT_CHUNK_SIZE, codec: str = DEFAULT_CODEC, level: int | None = None,
                progress: Callable[[int, int], None] | None = None, source_id: str = "",
                workers: int | None = None, mem_size: int | None = None) -> BuildResult:
    """Build `image_path` from `mem_path` (a path, or an open descriptor of the memory file, read with pread and
    left open), storing new chunks in `store_dir`. ``mem_size``: the bytes to build from (default: the guest
    memory the file holds: a snapshot memory file's bytes before its identity trailer, which is not guest memory,
    or the whole of a raw memory file); a file shorter than that fails the build. Checking that the memory file is
    the one a state file names is the caller's (vmm.snapshot.check_memory_file).

    progress(done_bytes, total_bytes) is called from this thread as chunks complete.
    """
    check_chunk_size(chunk_size)
    cid, level = resolve_codec(codec, level)
    image_path = os.path.abspath(image_path)
    fd = mem_path if isinstance(mem_path, int) else os.open(mem_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with ChunkStore(store_dir) as store:
            if mem_size is None:
                name = os.fspath(mem_path) if not isinstance(mem_path, int) else f"memory file (fd {mem_path})"
                try:
                    mem_size = memory_data_size(fd, name)
                except SnapshotFormatError as exc:
                    raise ImageError(name, str(exc).removeprefix(name + ": ")) from None
            n = nchunks_for(mem_size, chunk_size)
            has_data = _chunks_with_data(fd, mem_size, chunk_size, n)
            entries, zero, dup, new, new_bytes = _build(fd, mem_size, n, chunk_size, cid, level, store, progress,
                                                        workers, has_data)
            rel_store = os.path.relpath(store.root, os.path.dirname(image_path))
            hdr = Header(chunk_size, cid, level, mem_size, n,
                         content_id(chunk_size, mem_size, (e.hash for e in entries)), source_id, rel_store)
            write_index(image_path, hdr, entries)
    finally:
        if fd is not mem_path:
            os.close(fd)
    return BuildResult(image_path, n, zero, dup, new, new_bytes)


def _chunks_with_data(fd: int, mem_size: int, chunk_size: int, n: int) -> bytearray:
    """1 for each chunk that overlaps a data extent of the file, 0 for chunks wholly inside holes.

    Snapshot memory files are sparse (all-zero MiBs are holes); reading a hole through the mapping costs a page
    fault and a zero page-cache page per 4 KiB (a 2 GiB guest: ~4 s and 2 GiB of page cache), SEEK_DATA/SEEK_HOLE
    tell the same in microseconds. Without SEEK_DATA support every chunk counts as data."""
    has_data = bytearray(n)
    offset = 0
    while offset < mem_size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                break
            return bytearray(b"\1" * n)
        if start >= mem_size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), mem_size)
        first, last = start // chunk_size, (end - 1) // chunk_size
        has_data[first:last + 1] = b"\1" * (last + 1 - first)
        offset = end
    return has_data


class StoreBatch:
    """New chunk contents waiting for one store append, and the index entries that wait for their location.
    Appending in batches keeps fsyncs few; ``entries[i]`` is filled in once chunk i's bytes are in a pack."""

    def __init__(self, store, entries: list, hashes: list):
        self.store, self.entries, self.hashes = store, entries, hashes
        self.pending: dict[bytes, NewChunk] = {}
        self.waiting: list[int] = []
        self.pending_raw = self.new = self.new_bytes = 0

    def add(self, i: int, chunk: NewChunk | None, raw_size: int) -> None:
        """Chunk i has content hash ``hashes[i]``; ``chunk`` is its new encoding, or None if already stored."""
        if chunk is not None:
            self.pending[chunk.hash] = chunk
            self.pending_raw += raw_size
        self.waiting.append(i)
        if self.pending_raw >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        where, added, added_bytes = self.store.add(self.pending.values())
        self.new += added
        self.new_bytes += added_bytes
        for i in self.waiting:
            h = self.hashes[i]
            s = where.get(h) or self.store.lookup(h)
            self.entries[i] = Entry(h, s.codec, s.pack_id, s.offset, s.stored_len, s.checksum)
        self.pending.clear()
        self.waiting.clear()
        self.pending_raw = 0


def _build(fd, mem_size, n, chunk_size, codec, level, store, progress, workers, has_data=None):
    entries: list[Entry | None] = [None] * n
    hashes: list[bytes | None] = [None] * n
    batch = StoreBatch(store, entries, hashes)
    seen: set[bytes] = set()
    zero = dup = done = 0
    job = _chunk_job(fd, mem_size, chunk_size, codec, level, lambda h: h in store or h in seen)

    workers = workers or os.cpu_count() or 1
    # Enough in flight that workers keep compressing while this thread appends and fsyncs a batch.
    window = max(4 * workers, INFLIGHT_BYTES // chunk_size)
    with ThreadPoolExecutor(workers, thread_name_prefix="image-build") as pool:
        inflight: collections.deque = collections.deque()
        nxt = 0
        while nxt < n or inflight:
            # Keep a bounded window in flight: memory stays small while workers stay busy.
            while nxt < n and len(inflight) < window:
                # a chunk wholly inside a hole of the file is zero: not read, not submitted
                inflight.append((nxt, None, None) if has_data is not None and not has_data[nxt]
                                else pool.submit(job, nxt))
                nxt += 1
            item = inflight.popleft()
            i, h, chunk = item if isinstance(item, tuple) else item.result()
            size = min(chunk_size, mem_size - i * chunk_size)
            done += size
            if h is None:
                zero += 1
                entries[i] = Entry(_ZERO_HASH, codecs.ZERO, 0, 0, 0, 0)
            else:
                hashes[i] = h
                duplicate = h in seen or chunk is None  # earlier in this image, or already in the store
                dup += duplicate
                seen.add(h)
                batch.add(i, None if duplicate else chunk, size)
            if progress is not None:
                progress(done, mem_size)
    batch.flush()
    return entries, zero, dup, batch.new, batch.new_bytes
