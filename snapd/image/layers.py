"""Diff snapshots as image layers, and squashing a chain of layers into one base image.

A layer (index format 2.0, docs/image-format.md "Diff layers") stores only the chunks a Diff snapshot
changed; every other entry says CODEC_PARENT and the reader takes that chunk from the parent image,
whose content id the layer records and checks on open. A chunk the diff only partly covers is
read-modify-written: the parent's chunk with the diff's pages laid over it.
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from snapd.image import codecs
from snapd.image.builder import DEFAULT_CODEC, _ZERO_HASH, StoreBatch, new_chunk, resolve_codec
from snapd.image.chunkstore import ChunkStore, NewChunk
from snapd.image.errors import ImageError, LayerParentMismatch
from snapd.image.index import (CODEC_PARENT, VERSION, Entry, Header, content_id, write_index)
from snapd.image.reader import BaseImage
from snapd.snapfile import SnapshotFormatError, memory_data_size

PAGE = 4096


@dataclass(frozen=True)
class LayerResult:
    image_path: str
    nchunks: int
    changed_chunks: int     # chunks the diff's pages touch
    stored_chunks: int      # of those, chunks whose content differs from the parent's (the layer holds them)
    new_chunks: int         # chunks this build added to the store
    new_stored_bytes: int


def _pieces_by_chunk(page_runs: Iterable[tuple[int, int]], chunk_size: int, mem_size: int, name: str):
    """{chunk: [(offset in memory, length)]} for the byte ranges the page runs cover."""
    out: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for first, count in page_runs:
        start, end = first * PAGE, (first + count) * PAGE
        if first < 0 or count <= 0 or end > mem_size:
            raise ImageError(name, f"diff page run ({first}, {count}) is outside {mem_size} bytes of memory")
        while start < end:
            c = start // chunk_size
            stop = min(end, (c + 1) * chunk_size)
            out[c].append((start, stop - start))
            start = stop
    return out


def build_layer(parent_path: str | os.PathLike, diff_mem_path: str | os.PathLike,
                page_runs: Iterable[tuple[int, int]], store_dir: str | os.PathLike,
                image_path: str | os.PathLike, source_id: str = "", parent_snapshot_id: str | None = None,
                codec: str = DEFAULT_CODEC, level: int | None = None) -> LayerResult:
    """Build a layer over the image at parent_path from a Diff snapshot's memory file and page runs
    (memory-file page numbers, as the diff state's `diff_page_runs`).

    parent_snapshot_id: the diff's parent snapshot; refused if the parent image records another
    snapshot as its source (an image built without --source-id cannot be checked this way)."""
    image_path = os.path.abspath(image_path)
    cid, level = resolve_codec(codec, level)
    parent = BaseImage.open(parent_path)
    try:
        ph = parent.header
        if parent_snapshot_id is not None and ph.source_id and ph.source_id != parent_snapshot_id:
            raise LayerParentMismatch(os.fspath(parent_path),
                                      f"is an image of snapshot {ph.source_id}, but the diff's parent is "
                                      f"snapshot {parent_snapshot_id}")
        with open(diff_mem_path, "rb") as diff, ChunkStore(store_dir) as store:
            try:  # its guest memory: the bytes before its identity trailer (a Diff's memory file has one too)
                size = memory_data_size(diff.fileno(), os.fspath(diff_mem_path))
            except SnapshotFormatError as exc:
                raise ImageError(os.fspath(diff_mem_path), str(exc).removeprefix(os.fspath(diff_mem_path) + ": ")) \
                    from None
            if size != parent.mem_size:
                raise ImageError(os.fspath(diff_mem_path), f"diff memory file is {size} bytes, the parent image "
                                                           f"{parent.path} holds {parent.mem_size}")
            pieces = _pieces_by_chunk(page_runs, parent.chunk_size, parent.mem_size, os.fspath(diff_mem_path))
            # Every entry starts as "the parent's", carrying the parent's content hash so the layer's content
            # id is that of the composed memory (equal to a whole image of the same memory).
            hashes = [parent.owner(i)[1].hash for i in range(parent.nchunks)]
            entries = [Entry(h, CODEC_PARENT, 0, 0, 0, 0) for h in hashes]
            batch = StoreBatch(store, entries, hashes)
            stored = 0

            for c in sorted(pieces):
                buf = bytearray(parent.read_chunk(c))  # read-modify-write: correctness first
                base = c * parent.chunk_size
                for off, length in pieces[c]:
                    data = os.pread(diff.fileno(), length, off)
                    if len(data) != length:
                        raise ImageError(os.fspath(diff_mem_path), f"short read at {off}", c)
                    buf[off - base:off - base + length] = data
                if not any(buf):  # bytes.count would copy; any() on a bytearray is a C loop
                    h = _ZERO_HASH
                else:
                    h = hashlib.blake2b(buf, digest_size=32).digest()
                if h == hashes[c]:
                    continue  # rewritten with the same bytes: the parent's chunk stands
                stored += 1
                hashes[c] = h
                if h == _ZERO_HASH:
                    entries[c] = Entry(_ZERO_HASH, codecs.ZERO, 0, 0, 0, 0)
                    continue
                fresh = new_chunk(bytes(buf), h, cid, level) if h not in store and h not in batch.pending else None
                batch.add(c, fresh, len(buf))
            batch.flush()
            rel_store = os.path.relpath(store.root, os.path.dirname(image_path))
            rel_parent = os.path.relpath(os.path.abspath(parent.path), os.path.dirname(image_path))
            hdr = Header(parent.chunk_size, cid, level, parent.mem_size, parent.nchunks,
                         content_id(parent.chunk_size, parent.mem_size, hashes), source_id, rel_store,
                         parent_id=ph.content_id, parent_path=rel_parent)
            write_index(image_path, hdr, entries)
        return LayerResult(image_path, parent.nchunks, len(pieces), stored, batch.new, batch.new_bytes)
    finally:
        parent.close()


@dataclass(frozen=True)
class SquashResult:
    image_path: str
    nchunks: int
    layers: int              # images in the chain that was merged
    copied_chunks: int       # chunks copied into the target store (they lived in another store)


def squash_image(top_path: str | os.PathLike, image_path: str | os.PathLike,
                 store_dir: str | os.PathLike | None = None) -> SquashResult:
    """Merge the chain under top_path into one base image (format 1.0) at image_path.

    Chunks keep their stored encoding; chunks held in another store than the target's (default: the
    top layer's) are copied there. The result has the top's content id and source id."""
    image_path = os.path.abspath(image_path)
    top = BaseImage.open(top_path)
    try:
        target = os.fspath(store_dir) if store_dir is not None else top.store_dir
        with ChunkStore(target) as store:
            entries: list[Entry | None] = [None] * top.nchunks
            hashes: list[bytes | None] = [None] * top.nchunks
            batch = StoreBatch(store, entries, hashes)
            copied = 0

            for i in range(top.nchunks):
                owner, e = top.owner(i)
                if e.codec == codecs.ZERO:
                    entries[i] = Entry(_ZERO_HASH, codecs.ZERO, 0, 0, 0, 0)
                    continue
                s = store.lookup(e.hash)
                if s is not None:
                    entries[i] = Entry(e.hash, s.codec, s.pack_id, s.offset, s.stored_len, s.checksum)
                    continue
                hashes[i] = e.hash
                copy = None
                if e.hash not in batch.pending:
                    _, data = owner.read_stored(i)  # checksum-checked
                    copy = NewChunk(e.hash, e.codec, data, top.raw_len(i), e.checksum)
                    copied += 1
                batch.add(i, copy, top.raw_len(i))
            batch.flush()
            th = top.header
            cid = content_id(th.chunk_size, th.mem_size, (e.hash for e in entries))
            if cid != th.content_id:
                raise ImageError(top.path, "squashed chunks do not hash to the layer's content id")
            hdr = Header(th.chunk_size, th.codec, th.level, th.mem_size, th.nchunks, cid, th.source_id,
                         os.path.relpath(store.root, os.path.dirname(image_path)), VERSION)
            write_index(image_path, hdr, entries)
        return SquashResult(image_path, top.nchunks, len(top.chain()), copied)
    finally:
        top.close()
