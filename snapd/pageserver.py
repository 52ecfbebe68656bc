"""The userfaultfd page server: Python sets up, the fault loop runs in C with the GIL released.

    server = PageServer(); server.start()
    image = server.add_image(ChunkTable.from_base_image("base.img"))
    listener = server.serve("/run/snapd/vm1.sock", image, mode="lazy")   # or "eager"
    ... server.stats(vm_id), server.live_vms() ...
    server.close()

See docs/page-server.md for the protocol and event handling. This module holds the ``PageServer`` (the C
fault loop: attach, serve, recordings, stats) and its command line; the parts live beside it, and their names
are re-exported here: snapd.pageserver_chunks (ChunkTable, codecs), snapd.pageserver_image (Image, pre-fill),
snapd.pageserver_staging (Stage), snapd.pageserver_listener (Listener), snapd.pageserver_stats (VmStats,
histograms) and snapd.pageserver_populate (populate_loading_set).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import warnings
from dataclasses import fields
from typing import Sequence

from snapd import uffd_handshake as hs
from snapd.image.errors import ImageError
from snapd.loadset import LoadingSet, LoadingSetError
from snapd.pageserver_chunks import CODEC_LZ4, CODEC_RAW, CODEC_ZERO, CODEC_ZSTD, ChunkRef, ChunkTable
from snapd.pageserver_image import Image, Prefill, PrefillStats
from snapd.pageserver_listener import Listener
from snapd.pageserver_populate import populate_loading_set
from snapd.pageserver_staging import DEFAULT_STAGE_LIMIT, Stage, StageStats
from snapd.pageserver_stats import VM_STATES, VmStats, _bucket_bounds, histogram_percentile
from snapd.uffd import check, ffi, lib

__all__ = ["CODEC_LZ4", "CODEC_RAW", "CODEC_ZERO", "CODEC_ZSTD", "DEFAULT_STAGE_LIMIT", "MODES", "VM_STATES",
           "ChunkRef", "ChunkTable", "Image", "Listener", "LoadingSetWarning", "PageServer", "Prefill",
           "PrefillStats", "Stage", "StageStats", "VmStats", "histogram_percentile", "main", "populate_loading_set"]

log = logging.getLogger("snapd.pageserver")

MODES = ("lazy", "eager", "prefetch")


class LoadingSetWarning(UserWarning):
    """A loading set was refused; the VM is served by plain lazy paging instead (never wrong memory)."""


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
                  prefill: "LoadingSet | str | os.PathLike | bool | None" = None, huge_dir: str | None = None) -> Image:
        """prefill (shared images only): a loading set (or its path) to pre-fill the memfd from in the
        background (Image.prefill); None: the table's loading set (IMAGE.loadset beside a base image),
        if any; False: none. A set that cannot be used is refused with a LoadingSetWarning naming the
        file and why (image.prefill_error keeps it): the image is then served by plain lazy paging."""
        img = Image(table, shared, huge_dir)
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
            if not all(isinstance(v, int) and 0 <= v < 1 << 64 for v in (addr, size, offset)):
                os.close(uffd_fd)  # owned by us from the call on, as on every other refusal
                if conn is not None:
                    conn.close()
                raise ValueError(f"region {i}: address, size and offset must be integers in 0..2**64-1")
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
            check(rc, "snapd_server_attach_staged")
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
    try:
        return _serve_until_signalled(args)
    except (ImageError, OSError, ValueError, KeyError) as exc:  # loading-set errors are ImageErrors
        print(f"snapd.pageserver: error: {exc}", file=sys.stderr)  # a user mistake: one line, no traceback
        return 2


def _serve_until_signalled(args) -> int:
    if args.image:
        table = ChunkTable.from_base_image(args.image)
    else:
        with open(args.chunk_table) as f:
            try:
                table = ChunkTable.from_json(json.load(f))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{args.chunk_table}: not a JSON chunk table ({exc})") from None
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
