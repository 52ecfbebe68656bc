"""Staging: a private image's loading set decompressed and verified ahead of the restore into one buffer.

``Stage`` runs the staging in C (background thread, GIL released); ``StageStats`` is its progress. VMs served
with a stage get the set installed from the buffer in large UFFDIO_COPY batches (PageServer.serve/attach).
snapd.pageserver re-exports these names.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from snapd.loadset import LoadingSet
from snapd.uffd import check, ffi, lib

if TYPE_CHECKING:
    from snapd.pageserver_image import Image


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
