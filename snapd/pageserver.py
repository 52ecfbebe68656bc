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
from dataclasses import dataclass, field, fields
from typing import Callable, NamedTuple, Sequence

from snapd import uffd_handshake as hs
from snapd.loadset import LoadingSet, LoadingSetError
from snapd.uffd import check, ffi, lib

log = logging.getLogger("snapd.pageserver")

CODEC_ZERO, CODEC_RAW, CODEC_LZ4, CODEC_ZSTD = (lib.SNAPD_CODEC_ZERO, lib.SNAPD_CODEC_RAW,
                                                lib.SNAPD_CODEC_LZ4, lib.SNAPD_CODEC_ZSTD)
VM_STATES = {lib.SNAPD_VM_FREE: "free", lib.SNAPD_VM_ACTIVE: "active",
             lib.SNAPD_VM_FAILED: "failed", lib.SNAPD_VM_CLOSED: "closed"}
MODES = ("lazy", "eager", "prefetch")


class LoadingSetWarning(UserWarning):
    """A loading set was refused; the VM is served by plain lazy paging instead (never wrong memory)."""


class ChunkRef(NamedTuple):
    """One chunk as snapd.image's BaseImage.chunk_table() describes it."""
    pack_path: str
    offset: int
    stored_len: int
    codec: int
    checksum: int


@dataclass
class ChunkTable:
    name: str
    chunk_size: int
    mem_size: int
    chunks: list[ChunkRef]
    identity: bytes = b""  # the image's content id: loading sets recorded on it carry it (b"": unknown)

    @classmethod
    def from_base_image(cls, path: str, store: str | None = None) -> "ChunkTable":
        """A base image or a diff layer; a layer's table is the composition of its chain (top wins)."""
        from snapd.image.reader import BaseImage  # the colleague's format; imported only when used
        img = BaseImage.open(path, store)
        try:
            return cls(os.path.basename(path), img.chunk_size, img.mem_size,
                       [ChunkRef(*c) for c in img.chunk_table()], img.header.content_id)
        finally:
            img.close()

    def to_json(self) -> dict:
        return {"name": self.name, "chunk_size": self.chunk_size, "mem_size": self.mem_size,
                "chunks": [list(c) for c in self.chunks], "identity": self.identity.hex()}

    @classmethod
    def from_json(cls, d: dict) -> "ChunkTable":
        return cls(d["name"], d["chunk_size"], d["mem_size"], [ChunkRef(*c) for c in d["chunks"]],
                   bytes.fromhex(d.get("identity", "")))


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

    @property
    def shared(self) -> bool:
        return self.memfd >= 0


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

    def percentile_ns(self, p: float) -> float:
        return histogram_percentile(self.histogram, p)


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
                 record: bool = False):
        self.server, self.sock_path, self.image, self.mode, self.minor = server, sock_path, image, mode, minor
        self.loading_set, self.record = loading_set, record
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
                                           loading_set=self.loading_set, record=self.record)
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

    def add_image(self, table: ChunkTable, shared: bool = False) -> Image:
        img = Image(table, shared)
        self._images.append(img)
        return img

    def attach(self, image: Image, uffd_fd: int, conn: socket.socket | None,
               regions: Sequence[hs.Region | tuple[int, int, int]], mode: str = "lazy",
               minor: bool = False, loading_set: LoadingSet | None = None, record: bool = False) -> int:
        """Serve a VM: the server takes ownership of uffd_fd and conn (closed on failure too).

        Returns the VM id for stats(). mode: "lazy" (on fault; ready sent at once), "eager"
        (install everything, then send {"ready": true}) or "prefetch" (lazy, and the loading set's
        chunks are installed in the background in its order, between faults; ready at once).
        A loading set given with mode "lazy" also prefetches. A loading set that does not fit the
        image raises LoadingSetError here (serve() instead warns and falls back to lazy).
        record=True logs the chunks this VM faults on from its first fault (stop_recording).
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
        rc = lib.snapd_server_attach_ex(self._ptr, image._ptr, uffd_fd, sock_fd, specs, len(regions), flags,
                                        prefetch, nprefetch)
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
              loading_set: "LoadingSet | str | os.PathLike | None" = None, record: bool = False) -> Listener:
        """Listen on sock_path; every VMM that connects is served from image (see attach).

        loading_set: a LoadingSet or the path of a loading-set file; with it (mode "prefetch", or
        "lazy") each VM gets the set prefetched. A loading set that cannot be read or does not fit
        the image (stale, truncated, chunks absent from the image) is refused with a
        LoadingSetWarning naming the file and why, and VMs are served by plain lazy paging
        (listener.loading_set_error keeps the error). record=True: see attach."""
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
        listener = Listener(self, sock_path, image, "lazy" if mode == "prefetch" and ls is None else mode, minor,
                            loading_set=ls, record=record)
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
        server.serve(args.socket, server.add_image(table, shared=args.shared), mode, loading_set=args.loading_set)
        print(f"serving {table.name} on {args.socket} ({args.mode})", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
