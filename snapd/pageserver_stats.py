"""Per-VM page-server statistics: ``VmStats`` and its fault-service latency histogram.

``VM_STATES`` names the C VM slot states; ``_bucket_bounds`` inverts the C histogram's bucketing and
``histogram_percentile`` reads a percentile off the resulting (low, high, count) buckets. PageServer.stats fills
a ``VmStats`` from C. snapd.pageserver re-exports these names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from snapd.uffd import lib

VM_STATES = {lib.SNAPD_VM_FREE: "free", lib.SNAPD_VM_ACTIVE: "active",
             lib.SNAPD_VM_FAILED: "failed", lib.SNAPD_VM_CLOSED: "closed"}


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
