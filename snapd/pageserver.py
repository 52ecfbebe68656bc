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
import os
import signal
import socket
import threading
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple, Sequence

from snapd import uffd_handshake as hs
from snapd.uffd import check, ffi, lib

CODEC_ZERO, CODEC_RAW, CODEC_LZ4, CODEC_ZSTD = (lib.SNAPD_CODEC_ZERO, lib.SNAPD_CODEC_RAW,
                                                lib.SNAPD_CODEC_LZ4, lib.SNAPD_CODEC_ZSTD)
VM_STATES = {lib.SNAPD_VM_FREE: "free", lib.SNAPD_VM_ACTIVE: "active",
             lib.SNAPD_VM_FAILED: "failed", lib.SNAPD_VM_CLOSED: "closed"}
MODES = ("lazy", "eager")


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

    @classmethod
    def from_base_image(cls, path: str, store: str | None = None) -> "ChunkTable":
        from snapd.image.reader import BaseImage  # the colleague's format; imported only when used
        img = BaseImage.open(path, store)
        return cls(os.path.basename(path), img.chunk_size, img.mem_size,
                   [ChunkRef(*c) for c in img.chunk_table()])

    def to_json(self) -> dict:
        return {"name": self.name, "chunk_size": self.chunk_size, "mem_size": self.mem_size,
                "chunks": [list(c) for c in self.chunks]}

    @classmethod
    def from_json(cls, d: dict) -> "ChunkTable":
        return cls(d["name"], d["chunk_size"], d["mem_size"], [ChunkRef(*c) for c in d["chunks"]])


class Image:
    """A chunk table loaded into C (packs opened once); owned by the PageServer that made it."""

    def __init__(self, table: ChunkTable, shared: bool = False):
        self.name = table.name
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
                 on_error: Callable[[Exception], None] | None = None):
        self.server, self.sock_path, self.image, self.mode, self.minor = server, sock_path, image, mode, minor
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
                vm_id = self.server.attach(self.image, uffd_fd, conn, regions, self.mode, self.minor)
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
               minor: bool = False) -> int:
        """Serve a VM: the server takes ownership of uffd_fd and conn (closed on failure too).

        Returns the VM id for stats(). mode: "lazy" (on fault; ready sent at once) or "eager"
        (install everything, then send {"ready": true}). For a shared image the VM maps
        image.memfd MAP_PRIVATE; minor=True maps each filled chunk with UFFDIO_CONTINUE (register
        "missing+minor") instead of waking the faulting thread.
        """
        if minor and not image.shared:
            raise ValueError("minor (UFFDIO_CONTINUE) needs a shared image")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        specs = ffi.new("struct snapd_region_spec[]", len(regions))
        for i, r in enumerate(regions):
            addr, size, offset = ((r.base_host_virt_addr, r.size, r.offset) if isinstance(r, hs.Region) else r)
            specs[i].addr, specs[i].size, specs[i].offset = addr, size, offset
        flags = ((lib.SNAPD_ATTACH_EAGER if mode == "eager" else 0) | (lib.SNAPD_ATTACH_SHARED if image.shared else 0)
                 | (lib.SNAPD_ATTACH_CONTINUE if minor else 0))
        sock_fd = conn.fileno() if conn is not None else -1
        rc = lib.snapd_server_attach(self._ptr, image._ptr, uffd_fd, sock_fd, specs, len(regions), flags)
        if rc < 0:
            os.close(uffd_fd)
            if conn is not None:
                conn.close()
            check(rc, "snapd_server_attach")
        if conn is not None:
            conn.detach()  # the C loop owns the fd now
        return rc

    def serve(self, sock_path: str, image: Image, mode: str = "lazy", minor: bool = False) -> Listener:
        """Listen on sock_path; every VMM that connects is served from image (see attach)."""
        listener = Listener(self, sock_path, image, mode, minor)
        self._listeners.append(listener)
        return listener

    def stats(self, vm_id: int) -> VmStats:
        st = ffi.new("struct snapd_vm_stats *")
        hist = ffi.new("uint32_t[]", lib.SNAPD_HIST_BUCKETS)
        check(lib.snapd_server_vm_stats(self._ptr, vm_id, st, hist), "snapd_server_vm_stats")
        values = {f.name: getattr(st, f.name) for f in fields(VmStats) if f.name not in ("state", "histogram")}
        values["eager_pending"] = bool(values["eager_pending"])
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
        server.serve(args.socket, server.add_image(table, shared=args.shared), args.mode)
        print(f"serving {table.name} on {args.socket} ({args.mode})", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
