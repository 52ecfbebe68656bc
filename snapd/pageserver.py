"""The userfaultfd page server: Python sets up, the fault loop runs in C with the GIL released.

    server = PageServer(); server.start()
    image = server.add_image(ChunkTable.from_base_image("base.img"))
    listener = server.serve("/run/snapd/vm1.sock", image, mode="lazy")   # or "eager"
    ... server.stats(vm_id), server.live_vms() ...
    server.close()

See docs/page-server.md for the protocol and event handling.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import threading
import warnings
from dataclasses import dataclass, fields
from typing import Callable, Sequence

from snapd import uffd_handshake as hs
from snapd.loadset import LoadingSet, LoadingSetError, default_path
from snapd.image.reader import ChunkRef  # one chunk as BaseImage.chunk_table() describes it
from snapd.uffd import check, ffi, lib

log = logging.getLogger("snapd.pageserver")

CODEC_ZERO, CODEC_RAW, CODEC_LZ4, CODEC_ZSTD = (lib.SNAPD_CODEC_ZERO, lib.SNAPD_CODEC_RAW,
                                                lib.SNAPD_CODEC_LZ4, lib.SNAPD_CODEC_ZSTD)
VM_STATES = {lib.SNAPD_VM_FREE: "free", lib.SNAPD_VM_ACTIVE: "active",
             lib.SNAPD_VM_FAILED: "failed", lib.SNAPD_VM_CLOSED: "closed"}
MODES = ("lazy", "eager", "prefetch")


class LoadingSetWarning(UserWarning):
    """A loading set was refused; the VM is served by plain lazy paging instead (never wrong memory)."""


@dataclass
class ChunkTable:
    name: str
    chunk_size: int
    mem_size: int
    chunks: list[ChunkRef]
    identity: bytes = b""  # the image's content id: loading sets recorded on it carry it (b"": unknown)
    # The loading set kept beside the image (IMAGE.loadset) when there is one: add_image(shared=True)
    # pre-fills the image's memfd from it. "" for none.
    loading_set: str = ""

    @classmethod
    def from_base_image(cls, path: str, store: str | None = None) -> "ChunkTable":
        """A base image or a diff layer; a layer's table is the composition of its chain (top wins)."""
        from snapd.image.reader import BaseImage
        img = BaseImage.open(path, store)
        try:
            ls = default_path(path)
            return cls(os.path.basename(path), img.chunk_size, img.mem_size,
                       [ChunkRef(*c) for c in img.chunk_table()], img.header.content_id,
                       ls if os.path.exists(ls) else "")
        finally:
            img.close()

    def to_json(self) -> dict:
        return {"name": self.name, "chunk_size": self.chunk_size, "mem_size": self.mem_size,
                "chunks": [list(c) for c in self.chunks], "identity": self.identity.hex(),
                "loading_set": self.loading_set}

    @classmethod
    def from_json(cls, d: dict) -> "ChunkTable":
        return cls(d["name"], d["chunk_size"], d["mem_size"], [ChunkRef(*c) for c in d["chunks"]],
                   bytes.fromhex(d.get("identity", "")), d.get("loading_set", ""))


@dataclass
class PrefillStats:
    """Progress of a shared image's pre-fill (Image.prefill); chunk counts are image chunks."""
    running: bool
    cancelled: bool
    total: int          # chunks in the loading set
    done: int           # dealt with so far, in the set's order
    filled: int         # written into the memfd by the pre-fill
    skipped: int        # already present (a clone's fault or an earlier fill got there first)
    busy: int           # a clone's fault was writing it at that moment (left to it)
    fault_waits: int    # clone faults that found their chunk being pre-filled and waited for it
    zero_chunks: int    # of filled: all-zero chunks
    bytes: int          # bytes the pre-fill wrote
    errors: int         # chunks that could not be loaded (left missing: a clone faulting there gets the error)
    ns: int             # start to end, or to now while running
    error: str          # the first chunk error, "" if none
    present_chunks: int  # chunks in the memfd now, from any source
    loading_set: str = ""  # the set's file ("" for one given in memory)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Prefill:
    """A running (or finished) pre-fill of a shared image; returned by Image.prefill."""

    def __init__(self, image: "Image", loading_set: LoadingSet):
        self.image, self.loading_set = image, loading_set
        chunks = list(loading_set.chunks)
        self._chunks = ffi.new("uint32_t[]", chunks) if chunks else ffi.NULL
        self._n = len(chunks)
        self.rc: int | None = None
        self._thread = threading.Thread(target=self._run, name=f"snapd-prefill:{image.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.rc = lib.snapd_image_prefill(self.image._ptr, self._chunks, self._n)  # GIL released
        if self.rc < 0:
            log.warning("pre-fill of %s from %s failed: %s", self.image.name, self.loading_set.name,
                        os.strerror(-self.rc))

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> PrefillStats:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"pre-fill of {self.image.name} still running after {timeout} s")
        if self.rc is not None and self.rc < 0:
            check(self.rc, "snapd_image_prefill")
        return self.stats()

    def stats(self) -> PrefillStats:
        return self.image.prefill_stats()

    def cancel(self, wait: bool = True) -> None:
        lib.snapd_image_prefill_cancel(self.image._ptr)
        if wait:
            self._thread.join()


DEFAULT_STAGE_LIMIT = 512 << 20  # staging buffer bytes at most per served loading set


@dataclass
class StageStats:
    """Progress of a loading set's staging (Stage): chunks are image chunks."""
    running: bool
    cancelled: bool
    total: int        # chunks in the loading set
    done: int         # dealt with so far, in the set's order
    staged: int       # chunks whose verified, decompressed bytes are in the buffer
    zero_chunks: int  # all-zero chunks (nothing stored; installed with UFFDIO_ZEROPAGE)
    bytes: int        # bytes in the buffer
    capacity: int     # buffer size (at most the limit)
    over_limit: int   # chunks left out by the size limit (served by the normal path)
    errors: int       # chunks that failed to load or verify (left to the normal path, which reports them)
    ns: int           # staging time, or to now while running
    error: str        # the first chunk error, "" if none

    @property
    def complete(self) -> bool:
        return not self.running and self.done == self.total

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Stage:
    """A loading set decompressed ahead of the restore into one staging buffer (C, background thread, GIL
    released): serve(mode="prefetch", loading_set=...) makes one per served set (private images). VMs attached
    with it get the set installed with large UFFDIO_COPY batches straight from the buffer, and their faults on
    staged chunks are served from it. Chunks not staged (yet, over the limit, or bad) take the normal path.
    close() stops the staging and drops the buffer (VMs still attached keep it until they close)."""

    def __init__(self, image: "Image", loading_set: LoadingSet, limit: int = DEFAULT_STAGE_LIMIT):
        if image.shared:
            raise ValueError(f"image {image.name}: shared images pre-fill their memfd instead (Image.prefill)")
        self.image, self.loading_set, self.limit = image, loading_set, limit
        chunks = list(loading_set.chunks)
        buf = ffi.new("uint32_t[]", chunks) if chunks else ffi.NULL
        err = ffi.new("int *")
        ptr = lib.snapd_stage_new(image._ptr, buf, len(chunks), max(0, limit), err)
        if ptr == ffi.NULL:
            check(err[0] or -12, "snapd_stage_new")
        self._ptr = ptr
        self.rc: int | None = None
        self._thread = threading.Thread(target=self._run, name=f"snapd-stage:{image.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.rc = lib.snapd_stage_run(self._ptr)  # GIL released

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> StageStats:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"staging of {self.image.name} still running after {timeout} s")
        return self.stats()

    def stats(self) -> StageStats:
        if self._ptr is None:
            raise ValueError("stage closed")
        st = ffi.new("struct snapd_stage_stats *")
        err = ffi.new("char[]", 512)
        lib.snapd_stage_stats(self._ptr, st, err, 512)
        return StageStats(bool(st.running), bool(st.cancelled), st.total, st.done, st.staged, st.zero_chunks,
                          st.bytes, st.capacity, st.over_limit, st.errors, st.ns,
                          ffi.string(err).decode(errors="replace"))

    def close(self) -> None:
        if self._ptr is None:
            return
        lib.snapd_stage_cancel(self._ptr)
        self._thread.join()
        lib.snapd_stage_put(self._ptr)
        self._ptr = None


class Image:
    """A chunk table loaded into C (packs opened once); owned by the PageServer that made it."""

    def __init__(self, table: ChunkTable, shared: bool = False):
        self.name = table.name
        self.identity = table.identity
        self.chunk_size, self.mem_size = table.chunk_size, table.mem_size
        self.nchunks = len(table.chunks)
        ptr = lib.snapd_image_new(table.name.encode(), table.chunk_size, table.mem_size, self.nchunks)
        if ptr == ffi.NULL:
            raise ValueError(f"image {table.name}: chunk_size {table.chunk_size} must be a page multiple "
                             f"and {self.nchunks} chunks must cover mem_size {table.mem_size}")
        self._ptr = ffi.gc(ptr, lib.snapd_image_free)
        packs: dict[str, int] = {}
        entries = ffi.new("struct snapd_chunk[]", max(1, self.nchunks))
        for i, c in enumerate(table.chunks):
            e = entries[i]
            e.codec, e.offset, e.stored_len, e.checksum = c.codec, c.offset, c.stored_len, c.checksum
            if c.codec != CODEC_ZERO:
                if c.pack_path not in packs:
                    packs[c.pack_path] = check(lib.snapd_image_add_pack(ptr, os.fsencode(c.pack_path)),
                                               "snapd_image_add_pack")
                e.pack = packs[c.pack_path]
        check(lib.snapd_image_set_chunks(ptr, entries, self.nchunks), "snapd_image_set_chunks")
        self.memfd = check(lib.snapd_image_enable_shared(ptr), "memfd_create") if shared else -1
        self._prefill: Prefill | None = None
        self._prefill_lock = threading.Lock()  # one pre-fill at a time (two API calls may race)
        self.prefill_error: LoadingSetError | None = None  # the last loading set refused for a pre-fill

    @property
    def shared(self) -> bool:
        return self.memfd >= 0

    # -- pre-fill of the shared memfd (REAP/FaaSnap before any restore) -----------------------------
    def prefill(self, loading_set: "LoadingSet | str | os.PathLike", wait: bool = False,
                timeout: float | None = None) -> Prefill:
        """Write the loading set's chunks into the shared memfd, first touch first, in a background
        thread (C, GIL released), before or while clones run: a clone then finds those pages in the page
        cache and takes no userfaultfd fault for them. Consistent with the fault loop per chunk (one
        writer per chunk; a fault on a chunk being pre-filled waits for it). Chunks already present are
        skipped. A running pre-fill is cancelled first.

        Raises LoadingSetError (LoadingSetCorrupt/Stale/OutOfRange, naming the file) when the set cannot
        be used: nothing is written and the image stays served by plain lazy paging."""
        if not self.shared:
            raise ValueError(f"image {self.name}: pre-fill needs a shared image (add_image(shared=True)); "
                             "private VMs prefetch per VM (serve(mode='prefetch'))")
        try:
            ls = loading_set if isinstance(loading_set, LoadingSet) else LoadingSet.load(loading_set)
            ls.check_image(self)
        except LoadingSetError as exc:
            self.prefill_error = exc
            raise
        self.prefill_error = None
        with self._prefill_lock:
            self.cancel_prefill()
            self._prefill = prefill = Prefill(self, ls)
        if wait:
            prefill.wait(timeout)
        return prefill

    def cancel_prefill(self) -> None:
        if self._prefill is not None:
            self._prefill.cancel(wait=True)

    def prefill_stats(self) -> PrefillStats:
        if not self.shared:
            raise ValueError(f"image {self.name} is not shared")
        st = ffi.new("struct snapd_prefill_stats *")
        err = ffi.new("char[]", 512)
        check(lib.snapd_image_prefill_stats(self._ptr, st, err, 512), "snapd_image_prefill_stats")
        return PrefillStats(bool(st.running), bool(st.cancelled), st.total, st.done, st.filled, st.skipped,
                            st.busy, st.fault_waits, st.zero_chunks, st.bytes, st.errors, st.ns, ffi.string(err).decode(errors="replace"),
                            self.present_chunks(),
                            self._prefill.loading_set.path if self._prefill is not None else "")

    def present_chunks(self) -> int:
        """Chunks written into the shared memfd so far (by faults or pre-fills)."""
        return check(lib.snapd_image_present_chunks(self._ptr), "snapd_image_present_chunks")

    def fill_order(self, include_prefilled: bool = True) -> list[int]:
        """The chunks in the order they were written into the shared memfd (faults and pre-fills)."""
        if not self.shared:
            raise ValueError(f"image {self.name} is not shared")
        n = 0
        while True:
            buf = ffi.new("uint32_t[]", max(n, 1))
            total = check(lib.snapd_image_fill_log(self._ptr, buf, n), "snapd_image_fill_log")
            if total <= n:
                break
            n = total + 64
        return [e & 0x7FFFFFFF for e in buf[0:total] if include_prefilled or not e & 0x80000000]

    def recorded_loading_set(self, include_prefilled: bool = True) -> LoadingSet:
        """A loading set recorded on the shared memfd: every chunk any VM of this image faulted in (plus
        pre-filled ones, unless include_prefilled=False), first fill first. After one clone's first reply
        on a fresh memfd, that is the clone's working set in first-touch order."""
        return LoadingSet(self.identity, self.chunk_size, self.mem_size, tuple(self.fill_order(include_prefilled)))

    def close(self) -> None:
        """Stop a running pre-fill (the C image is freed with this object)."""
        self.cancel_prefill()


@dataclass
class VmStats:
    state: str
    parent: int
    eager_pending: bool
    nregions: int
    faults: int
    bytes_installed: int
    chunks_installed: int
    zero_chunks: int
    shared_fills: int
    shared_wakes: int
    service_ns: int
    max_service_ns: int
    eexist: int
    eagain: int
    removes: int
    remaps: int
    unmaps: int
    forks: int
    errors: int
    eager_bytes: int
    eager_ns: int
    histogram: list[tuple[int, int, int]]  # (low_ns, high_ns, count) per non-empty bucket
    prefetch_pending: bool = False
    prefetch_chunks: int = 0   # chunks the background prefetch installed (a fault got the others first)
    prefetch_bytes: int = 0
    prefetch_ns: int = 0       # attach to the end of the prefetch
    prefetch_faults: int = 0   # faults taken while the prefetch was still running
    recorded: int = 0          # chunks in the working-set recording so far
    stage_chunks: int = 0      # staged prefetch: chunks the stream installed from the staging buffer
    stage_faults: int = 0      # faults served from the staging buffer (no decompress)
    stage_fallbacks: int = 0   # set chunks the stream found not staged (installed by the normal path)
    stage_ioctls: int = 0      # UFFDIO_COPY/ZEROPAGE calls of the staged stream (runs of adjacent chunks)

    def percentile_ns(self, p: float) -> float:
        return histogram_percentile(self.histogram, p)


def populate_loading_set(host_addr: int, size: int, loading_set: LoadingSet, offset: int = 0) -> int:
    """In a clone (VMM side): map the loading set's pages of a guest-memory mapping of a pre-filled shared
    image (host_addr..+size showing image bytes from offset on) into the page tables, read-only and shared
    (MADV_POPULATE_READ; writes still copy on write). Under nested KVM a guest's first touch of a page cache
    page costs a host page fault, several times a touch of a mapped page. Adjacent chunks are merged into one
    call. Only for chunks present in the memfd: a missing one would fault to the page server (served, but
    slowly). Returns the bytes populated."""
    cs = loading_set.chunk_size
    ranges: list[list[int]] = []
    for c in sorted(loading_set.chunks):
        s, e = max(c * cs, offset), min((c + 1) * cs, loading_set.mem_size, offset + size)
        if s >= e:
            continue
        if ranges and ranges[-1][1] == s:
            ranges[-1][1] = e
        else:
            ranges.append([s, e])
    if not ranges:
        return 0
    addrs = ffi.new("uint64_t[]", [host_addr + s - offset for s, _ in ranges])
    lens = ffi.new("uint64_t[]", [e - s for s, e in ranges])
    check(lib.snapd_populate_read(addrs, lens, len(ranges)), "madvise(MADV_POPULATE_READ)")
    return sum(e - s for s, e in ranges)


def _bucket_bounds(b: int) -> tuple[int, int]:
    """Inverse of hist_bucket() in pageserver.c: 8 log-linear buckets per power of two."""
    if b < 8:
        return b, b + 1
    msb, sub = divmod(b, 8)
    return (8 + sub) << (msb - 3), (9 + sub) << (msb - 3)


def histogram_percentile(hist: Sequence[tuple[int, int, int]], p: float) -> float:
    """p-th percentile (0-100) of a (low, high, count) histogram, at the bucket's midpoint."""
    total = sum(c for _, _, c in hist)
    if not total:
        return 0.0
    rank, seen = p / 100 * total, 0
    for lo, hi, count in hist:
        seen += count
        if seen >= rank:
            return (lo + hi) / 2
    return (hist[-1][0] + hist[-1][1]) / 2


class Listener:
    """Accepts VMM connections on a socket path and attaches each to the server (a Python thread)."""

    def __init__(self, server: "PageServer", sock_path: str, image: Image, mode: str, minor: bool = False,
                 on_error: Callable[[Exception], None] | None = None, loading_set: LoadingSet | None = None,
                 record: bool = False, stage: "Stage | None" = None):
        self.server, self.sock_path, self.image, self.mode, self.minor = server, sock_path, image, mode, minor
        self.loading_set, self.record = loading_set, record
        self.stage = stage  # the loading set staged ahead of the restore (owned: closed with the listener)
        self.loading_set_error: LoadingSetError | None = None  # set when a loading set was refused
        self.vm_ids: list[int] = []
        self._attached = threading.Condition()
        self.errors: list[Exception] = []
        self._on_error = on_error
        self._sock = hs.listen(sock_path)
        self._thread = threading.Thread(target=self._accept_loop, name=f"snapd-accept:{sock_path}",
                                        daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed by close()
            try:
                uffd_fd, regions = hs.recv_handshake(conn)
                vm_id = self.server.attach(self.image, uffd_fd, conn, regions, self.mode, self.minor,
                                           loading_set=self.loading_set, record=self.record, stage=self.stage)
                with self._attached:
                    self.vm_ids.append(vm_id)
                    self._attached.notify_all()
            except Exception as e:  # a bad VMM must not stop the listener
                self.errors.append(e)
                hs.send_message(conn, {"error": f"handshake rejected: {e}"})
                conn.close()
                if self._on_error:
                    self._on_error(e)

    def wait_for_vms(self, n: int, timeout: float = 5.0) -> list[int]:
        """The ids of the first n VMs attached through this listener (ready may arrive first)."""
        with self._attached:
            if not self._attached.wait_for(lambda: len(self.vm_ids) >= n, timeout):
                raise TimeoutError(f"{len(self.vm_ids)} of {n} VMs attached on {self.sock_path}")
            return self.vm_ids[:n]

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)
        if self.stage is not None and not self._thread.is_alive():
            self.stage.close()  # VMs attached with it keep the buffer until they close
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass


class PageServer:
    """One C epoll loop serving the faults of every attached VM."""

    def __init__(self):
        ptr = lib.snapd_server_new()
        if ptr == ffi.NULL:
            raise OSError("snapd_server_new failed (epoll/eventfd)")
        self._ptr = ptr
        self._images: list[Image] = []  # freed with the server, after the loop stopped
        self._listeners: list[Listener] = []
        self._thread: threading.Thread | None = None
        self._loop_rc: int | None = None
        self._vm_images: dict[int, Image] = {}  # which image each VM id was attached with (for recordings)

    def start(self) -> "PageServer":
        self._thread = threading.Thread(target=self._run, name="snapd-fault-loop", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        self._loop_rc = lib.snapd_server_run(self._ptr)  # cffi releases the GIL for the call

    def add_image(self, table: ChunkTable, shared: bool = False,
                  prefill: "LoadingSet | str | os.PathLike | bool | None" = None) -> Image:
        """prefill (shared images only): a loading set (or its path) to pre-fill the memfd from in the
        background (Image.prefill); None: the table's loading set (IMAGE.loadset beside a base image),
        if any; False: none. A set that cannot be used is refused with a LoadingSetWarning naming the
        file and why (image.prefill_error keeps it): the image is then served by plain lazy paging."""
        img = Image(table, shared)
        self._images.append(img)
        if prefill is None or prefill is True:
            source = table.loading_set or None
        else:
            source = prefill or None
        if shared and source is not None:
            try:
                img.prefill(source)
            except LoadingSetError as exc:
                message = f"{exc}; serving {img.name} by plain lazy paging, without pre-fill"
                log.warning("%s", message)
                warnings.warn(message, LoadingSetWarning, stacklevel=2)
        return img

    def attach(self, image: Image, uffd_fd: int, conn: socket.socket | None,
               regions: Sequence[hs.Region | tuple[int, int, int]], mode: str = "lazy",
               minor: bool = False, loading_set: LoadingSet | None = None, record: bool = False,
               stage: Stage | None = None) -> int:
        """Serve a VM: the server takes ownership of uffd_fd and conn (closed on failure too).

        Returns the VM id for stats(). mode: "lazy" (on fault; ready sent at once), "eager"
        (install everything, then send {"ready": true}) or "prefetch" (lazy, and the loading set's
        chunks are installed in the background in its order, between faults; ready at once).
        A loading set given with mode "lazy" also prefetches. A loading set that does not fit the
        image raises LoadingSetError here (serve() instead warns and falls back to lazy).
        record=True logs the chunks this VM faults on from its first fault (stop_recording).
        stage: a Stage of this image (and of loading_set): the set is installed from its buffer in large
        UFFDIO_COPY batches and faults on staged chunks are served from it (private images only).
        For a shared image the VM maps image.memfd MAP_PRIVATE; minor=True maps each filled chunk
        with UFFDIO_CONTINUE (register "missing+minor") instead of waking the faulting thread.
        """
        if minor and not image.shared:
            raise ValueError("minor (UFFDIO_CONTINUE) needs a shared image")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if mode == "prefetch" and loading_set is None:
            raise ValueError("mode 'prefetch' needs a loading_set")
        if loading_set is not None and mode == "eager":
            raise ValueError("eager mode installs everything; a loading set adds nothing")
        prefetch = ffi.NULL
        nprefetch = 0
        if loading_set is not None:
            try:
                loading_set.check_image(image)
            except LoadingSetError:
                os.close(uffd_fd)
                if conn is not None:
                    conn.close()
                raise
            nprefetch = len(loading_set.chunks)
            prefetch = ffi.new("uint32_t[]", list(loading_set.chunks)) if nprefetch else ffi.NULL
        specs = ffi.new("struct snapd_region_spec[]", len(regions))
        for i, r in enumerate(regions):
            addr, size, offset = ((r.base_host_virt_addr, r.size, r.offset) if isinstance(r, hs.Region) else r)
            specs[i].addr, specs[i].size, specs[i].offset = addr, size, offset
        flags = ((lib.SNAPD_ATTACH_EAGER if mode == "eager" else 0) | (lib.SNAPD_ATTACH_SHARED if image.shared else 0)
                 | (lib.SNAPD_ATTACH_CONTINUE if minor else 0) | (lib.SNAPD_ATTACH_RECORD if record else 0))
        sock_fd = conn.fileno() if conn is not None else -1
        if stage is not None and (stage._ptr is None or stage.image is not image or image.shared or loading_set is None):
            stage = None  # closed, another image's, or nothing to stream: plain path
        rc = lib.snapd_server_attach_staged(self._ptr, image._ptr, uffd_fd, sock_fd, specs, len(regions), flags,
                                            prefetch, nprefetch, stage._ptr if stage is not None else ffi.NULL)
        if rc < 0:
            os.close(uffd_fd)
            if conn is not None:
                conn.close()
            check(rc, "snapd_server_attach")
        if conn is not None:
            conn.detach()  # the C loop owns the fd now
        self._vm_images[rc] = image
        return rc

    def serve(self, sock_path: str, image: Image, mode: str = "lazy", minor: bool = False,
              loading_set: "LoadingSet | str | os.PathLike | None" = None, record: bool = False,
              stage: bool = True, stage_limit: int = DEFAULT_STAGE_LIMIT) -> Listener:
        """Listen on sock_path; every VMM that connects is served from image (see attach).

        loading_set: a LoadingSet or the path of a loading-set file; with it (mode "prefetch", or
        "lazy") each VM gets the set prefetched. A loading set that cannot be read or does not fit
        the image (stale, truncated, chunks absent from the image) is refused with a
        LoadingSetWarning naming the file and why, and VMs are served by plain lazy paging
        (listener.loading_set_error keeps the error). record=True: see attach.

        stage (private images, a usable loading set): decompress and verify the set's chunks now, once, in
        the background, into a staging buffer of at most stage_limit bytes (listener.stage; freed when the
        listener closes), before any VM connects; each VM then gets the set installed from the buffer with
        large UFFDIO_COPY batches. stage=False: the set is streamed (decompressed per VM) as before."""
        if mode == "prefetch" and loading_set is None:
            raise ValueError("mode 'prefetch' needs a loading_set")
        ls, error = None, None
        if loading_set is not None:
            try:
                ls = loading_set if isinstance(loading_set, LoadingSet) else LoadingSet.load(loading_set)
                ls.check_image(image)
            except LoadingSetError as exc:
                ls, error = None, exc
                message = f"{exc}; serving {image.name} by plain lazy paging, without prefetch"
                log.warning("%s", message)
                warnings.warn(message, LoadingSetWarning, stacklevel=2)
        staged = (Stage(image, ls, stage_limit)
                  if ls is not None and stage and not image.shared and mode in ("lazy", "prefetch") else None)
        try:
            listener = Listener(self, sock_path, image, "lazy" if mode == "prefetch" and ls is None else mode, minor,
                                loading_set=ls, record=record, stage=staged)
        except BaseException:
            if staged is not None:
                staged.close()
            raise
        listener.loading_set_error = error
        self._listeners.append(listener)
        return listener

    # -- working-set recording ------------------------------------------------------------------------
    def start_recording(self, vm_id: int) -> None:
        """Log the image chunks vm_id faults on from now on (clears an earlier log)."""
        check(lib.snapd_server_record_start(self._ptr, vm_id), "snapd_server_record_start")

    def recorded_chunks(self, vm_id: int) -> list[int]:
        """The chunks logged so far, first fault first (recording goes on)."""
        n = 0
        while True:
            buf = ffi.new("uint32_t[]", max(n, 1))
            total = check(lib.snapd_server_record_take(self._ptr, vm_id, buf, n), "snapd_server_record_take")
            if total <= n:
                return list(buf[0:total])
            n = total + 64  # it grew meanwhile

    def stop_recording(self, vm_id: int) -> LoadingSet:
        """Stop logging and return the log as a loading set of the VM's image (save() it beside the image)."""
        check(lib.snapd_server_record_stop(self._ptr, vm_id), "snapd_server_record_stop")
        image = self._vm_images[vm_id]
        return LoadingSet(image.identity, image.chunk_size, image.mem_size, tuple(self.recorded_chunks(vm_id)))

    def stats(self, vm_id: int) -> VmStats:
        st = ffi.new("struct snapd_vm_stats *")
        hist = ffi.new("uint32_t[]", lib.SNAPD_HIST_BUCKETS)
        check(lib.snapd_server_vm_stats(self._ptr, vm_id, st, hist), "snapd_server_vm_stats")
        values = {f.name: getattr(st, f.name) for f in fields(VmStats) if f.name not in ("state", "histogram")}
        values["eager_pending"] = bool(values["eager_pending"])
        values["prefetch_pending"] = bool(values["prefetch_pending"])
        buckets = [(*_bucket_bounds(b), hist[b]) for b in range(lib.SNAPD_HIST_BUCKETS) if hist[b]]
        return VmStats(state=VM_STATES[st.state], histogram=buckets, **values)

    def live_vms(self) -> int:
        return lib.snapd_server_live_vms(self._ptr)

    def close(self) -> None:
        """Stop listening, stop the loop, release every VM's uffd and socket, free the images."""
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        if self._ptr is None:
            return
        lib.snapd_server_stop(self._ptr)
        if self._thread is not None:
            self._thread.join()
        lib.snapd_server_free(self._ptr)
        self._ptr = None
        for image in self._images:
            image.close()
        self._images.clear()

    stop = close

    def __enter__(self) -> "PageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """python -m snapd.pageserver --socket PATH (--image IMG | --chunk-table JSON) [--mode eager]"""
    p = argparse.ArgumentParser(prog="python -m snapd.pageserver", description=main.__doc__)
    p.add_argument("--socket", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="base image index (snapd.image format)")
    src.add_argument("--chunk-table", help="JSON chunk table (ChunkTable.to_json)")
    p.add_argument("--mode", choices=MODES, default="lazy")
    p.add_argument("--shared", action="store_true", help="fill one memfd shared by all VMs")
    p.add_argument("--loading-set", default=None, help="prefetch this loading set into every VM (mode prefetch)")
    p.add_argument("--no-stage", action="store_true",
                   help="stream the loading set per VM instead of staging it decompressed ahead of the restore")
    p.add_argument("--stage-limit-mib", type=int, default=DEFAULT_STAGE_LIMIT >> 20,
                   help="staging buffer size limit (default %(default)s MiB)")
    args = p.parse_args(argv)
    if args.image:
        table = ChunkTable.from_base_image(args.image)
    else:
        with open(args.chunk_table) as f:
            table = ChunkTable.from_json(json.load(f))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with PageServer() as server:
        mode = "prefetch" if args.loading_set and args.mode == "lazy" else args.mode
        server.serve(args.socket, server.add_image(table, shared=args.shared), mode, loading_set=args.loading_set,
                     stage=not args.no_stage, stage_limit=args.stage_limit_mib << 20)
        print(f"serving {table.name} on {args.socket} ({args.mode})", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
