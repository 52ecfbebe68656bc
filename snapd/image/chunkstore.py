"""Content-addressed chunk store: append-only pack files plus an append-only hash index log.

Directory layout (byte layouts in docs/image-format.md):
    lock               flock target; writers hold LOCK_EX, index readers LOCK_SH
    chunks.idx         header + fixed 72-byte entries: content hash -> (pack, offset, length, codec, ...)
    packs/NNNNNNNN.pack  16-byte header, then records: 64-byte record header + stored bytes

Dedup policy: the key is BLAKE2b-256 of the *uncompressed* chunk, and the first stored encoding wins.
A later build with another codec or level reuses the existing encoding, so an image's chunks may
carry mixed codecs; each image entry names its chunk's codec.

Durability order: pack bytes are fsynced before index entries naming them are appended, and the
index is fsynced before add() returns, so an image written afterwards never points at lost data.
A crash can leave unreferenced bytes at a pack's tail (harmless) or a torn index tail (cut off by
the next writer).
"""
from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterable
from typing import NamedTuple

import xxhash

from snapd.image.errors import StoreCorrupt

IDX_MAGIC = b"UVMCIDX\0"
PACK_MAGIC = b"UVMPACK\0"
REC_MAGIC = b"CHNK"
STORE_VERSION = 1
IDX_HEADER = struct.Struct("<8sII")           # magic, version, reserved
IDX_ENTRY = struct.Struct("<32sIB3xQIIQQ")     # hash, pack, codec, offset, stored_len, raw_len, xxh3, entry xxh3
PACK_HEADER = struct.Struct("<8sII")          # magic, version, pack id
REC_HEADER = struct.Struct("<4sB3xIIQ32s8x")  # magic, codec, stored_len, raw_len, xxh3, hash (64 bytes)
PACK_TARGET_SIZE = 1 << 30                    # start a new pack once the current one is this big


class StoredChunk(NamedTuple):
    pack_id: int
    offset: int       # file offset of the stored bytes inside the pack (after the record header)
    stored_len: int
    raw_len: int
    codec: int
    checksum: int     # xxh3_64 of the stored bytes


class NewChunk(NamedTuple):
    hash: bytes
    codec: int
    stored: bytes
    raw_len: int
    checksum: int


def pack_name(pack_id: int) -> str:
    return f"{pack_id:08d}.pack"


class ChunkStore:
    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = os.path.abspath(root)
        self.packs_dir = os.path.join(self.root, "packs")
        self.idx_path = os.path.join(self.root, "chunks.idx")
        if create:
            os.makedirs(self.packs_dir, exist_ok=True)
        elif not os.path.isdir(self.packs_dir):
            raise FileNotFoundError(f"{self.root}: not a chunk store (no packs/ directory)")
        self._lock_fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._map: dict[bytes, StoredChunk] = {}
        self._idx_pos = IDX_HEADER.size
        self._stored_bytes = 0
        with _Flock(self._lock_fd, fcntl.LOCK_EX):
            self._init_index()
            self._read_new_entries(repair=True)

    # -- public --------------------------------------------------------------------------------
    def pack_path(self, pack_id: int) -> str:
        return os.path.join(self.packs_dir, pack_name(pack_id))

    def lookup(self, h: bytes) -> StoredChunk | None:
        return self._map.get(h)

    def __contains__(self, h: bytes) -> bool:
        return h in self._map

    def __len__(self) -> int:
        return len(self._map)

    @property
    def stored_bytes(self) -> int:
        """Sum of stored lengths of all indexed chunks (excludes headers and unreferenced tails)."""
        return self._stored_bytes

    def refresh(self) -> None:
        """Pick up chunks other processes added since we last looked."""
        with _Flock(self._lock_fd, fcntl.LOCK_SH):
            self._read_new_entries(repair=False)

    def add(self, chunks: Iterable[NewChunk]) -> tuple[dict[bytes, StoredChunk], int, int]:
        """Store the chunks not already present.

        Returns (location of every given hash, chunks written by this call, their stored bytes).
        """
        chunks = list(chunks)
        with _Flock(self._lock_fd, fcntl.LOCK_EX):
            self._read_new_entries(repair=True)  # another builder may have stored some meanwhile
            fresh: dict[bytes, NewChunk] = {}
            for c in chunks:
                if c.hash not in self._map:
                    fresh.setdefault(c.hash, c)
            if fresh:
                self._append(list(fresh.values()))
            where = {c.hash: self._map[c.hash] for c in chunks}
            return where, len(fresh), sum(len(c.stored) for c in fresh.values())

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals (caller holds the lock) -----------------------------------------------------
    def _init_index(self) -> None:
        fd = os.open(self.idx_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            head = os.pread(fd, IDX_HEADER.size, 0)
            if len(head) < IDX_HEADER.size:  # new, or a crash before the header was durable
                os.ftruncate(fd, 0)
                os.pwrite(fd, IDX_HEADER.pack(IDX_MAGIC, STORE_VERSION, 0), 0)
                os.fsync(fd)
                return
            magic, version, _ = IDX_HEADER.unpack(head)
            if magic != IDX_MAGIC or version != STORE_VERSION:
                what = "another format's magic" if magic != IDX_MAGIC else f"version {version}"
                raise StoreCorrupt(self.idx_path, f"not a version {STORE_VERSION} chunk index ({what})")
        finally:
            os.close(fd)

    def _read_new_entries(self, repair: bool) -> None:
        with open(self.idx_path, "r+b" if repair else "rb") as f:
            f.seek(self._idx_pos)
            data = f.read()
            n = len(data) // IDX_ENTRY.size
            good = 0
            for (h, pack, codec, off, slen, rlen, csum, check) in IDX_ENTRY.iter_unpack(
                    memoryview(data)[:n * IDX_ENTRY.size]):
                raw = data[good * IDX_ENTRY.size:(good + 1) * IDX_ENTRY.size - 8]
                if xxhash.xxh3_64_intdigest(raw) != check:
                    break  # torn tail of a crashed writer: everything from here on is unreliable
                if h not in self._map:
                    self._map[h] = StoredChunk(pack, off, slen, rlen, codec, csum)
                    self._stored_bytes += slen
                good += 1
            end = self._idx_pos + good * IDX_ENTRY.size
            if repair and end != self._idx_pos + len(data):
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
            self._idx_pos = end

    def _current_pack(self) -> int:
        ids = [int(n[:-5]) for n in os.listdir(self.packs_dir) if n.endswith(".pack") and n[:-5].isdigit()]
        return max(ids, default=0)

    def _new_pack(self, pack_id: int) -> None:
        path = self.pack_path(pack_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, PACK_HEADER.pack(PACK_MAGIC, STORE_VERSION, pack_id))
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(self.packs_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _append(self, chunks: list[NewChunk]) -> None:
        pack_id = self._current_pack()
        if pack_id == 0:
            pack_id = 1
            self._new_pack(pack_id)
        entries = []
        i = 0
        while i < len(chunks):
            path = self.pack_path(pack_id)
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                pos = os.lseek(fd, 0, os.SEEK_END)
                parts = []
                while i < len(chunks) and pos < PACK_TARGET_SIZE:
                    c = chunks[i]
                    parts.append(REC_HEADER.pack(REC_MAGIC, c.codec, len(c.stored), c.raw_len, c.checksum, c.hash))
                    parts.append(c.stored)
                    pos += REC_HEADER.size
                    entries.append((c, pack_id, pos))
                    pos += len(c.stored)
                    i += 1
                _write_all(fd, parts)
                os.fsync(fd)
            finally:
                os.close(fd)
            if i < len(chunks):
                pack_id += 1
                self._new_pack(pack_id)
        out = []
        for c, pid, off in entries:
            body = IDX_ENTRY.pack(c.hash, pid, c.codec, off, len(c.stored), c.raw_len, c.checksum, 0)[:-8]
            out.append(body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)))
        with open(self.idx_path, "ab") as f:
            f.write(b"".join(out))
            f.flush()
            os.fsync(f.fileno())
        self._read_new_entries(repair=False)


def _write_all(fd: int, parts: list) -> None:
    # os.writev may write partially and has an IOV_MAX limit: write in bounded groups, retry remainders.
    for k in range(0, len(parts), 512):
        group = [memoryview(p) for p in parts[k:k + 512]]
        while group:
            n = os.writev(fd, group)
            while group and n >= len(group[0]):
                n -= len(group[0])
                group.pop(0)
            if group and n:
                group[0] = group[0][n:]


class _Flock:
    def __init__(self, fd: int, mode: int):
        self.fd, self.mode = fd, mode

    def __enter__(self):
        fcntl.flock(self.fd, self.mode)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
