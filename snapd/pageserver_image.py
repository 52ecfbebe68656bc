"""An image loaded into the C page server, and the pre-fill of a shared image's memfd from a loading set.

``Image`` turns a ChunkTable into the C image (packs opened once) and, for a shared image, its memfd; it pre-fills
that memfd from a loading set (``Prefill``, a background thread in C; ``PrefillStats`` its progress) and reports
what was filled and in which order (recorded loading sets). snapd.pageserver re-exports these names.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from snapd.loadset import LoadingSet, LoadingSetError
from snapd.pageserver_chunks import CODEC_ZERO, ChunkTable
from snapd.uffd import check, ffi, lib

log = logging.getLogger("snapd.pageserver")


HUGE_PAGE = lib.SNAPD_HUGE_PAGE


def huge_unfit(chunk_size: int, mem_size: int) -> str:
    """Why an image cannot be kept on 2 MiB pages ("" when it can): its chunks must be whole huge pages, since
    shmem zero-fills and marks present the rest of a huge page a partial write lands in."""
    if chunk_size % HUGE_PAGE:
        return f"its chunk size {chunk_size >> 10} KiB is not a multiple of {HUGE_PAGE >> 20} MiB"
    if mem_size % HUGE_PAGE:
        return f"its memory size {mem_size} bytes is not a multiple of {HUGE_PAGE >> 20} MiB"
    return ""


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


class Image:
    """A chunk table loaded into C (packs opened once); owned by the PageServer that made it."""

    def __init__(self, table: ChunkTable, shared: bool = False, huge_dir: str | None = None):
        """shared: one memfd for every VM of the image. huge_dir: a directory on a huge=always tmpfs
        (snapd.hugetmpfs): the shared file is made there, with 2 MiB pages, when the image is made of whole
        2 MiB pages (chunk and memory size multiples of 2 MiB); otherwise ``huge_refused`` says why not and
        the image gets a plain memfd."""
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
        self.huge_refused = huge_unfit(self.chunk_size, self.mem_size) if shared and huge_dir else ""
        self.huge = bool(shared and huge_dir and not self.huge_refused)
        if self.huge_refused:
            log.info("image %s: plain memfd, not huge pages: %s", self.name, self.huge_refused)
        self.memfd = -1
        if shared:
            where = os.fsencode(huge_dir) if self.huge else ffi.NULL
            self.memfd = check(lib.snapd_image_enable_shared(ptr, where),
                               f"creating the shared file in {huge_dir}" if self.huge else "memfd_create")
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
