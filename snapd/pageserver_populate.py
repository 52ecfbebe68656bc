"""The clone (VMM) side of a pre-filled shared image: map its loading set's pages in before the guest runs.

``populate_loading_set`` asks the kernel (MADV_POPULATE_READ) to map a loading set's chunks of a guest-memory
mapping of the image memfd, read-only and shared, so the guest's first touch takes no host page fault.
snapd.pageserver re-exports it.
"""
from __future__ import annotations

from snapd.loadset import LoadingSet
from snapd.uffd import check, ffi, lib


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
