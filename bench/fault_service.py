"""Per-fault service time of the userfaultfd page server, by chunk size and codec, with real faults.

    python -m bench.fault_service [--mem-mib 32] [--quick]

For each (chunk size, codec) a synthetic image is written, a "VMM" in this process maps anonymous
memory, registers it and hands the uffd to an in-process page server over the real socket
handshake; one byte per chunk is then touched from C (GIL released) so every touch is one fault.
Reported: the server's service time per fault (read of the fault message to the wake) and the
latency the faulting thread saw, p50/p99, plus the cost per 4 KiB page.

Also home of the helpers the page-server tests share: `write_image` (pack + chunk table from
bytes) and `GuestMemory` (the VMM side: mapping, uffd, handshake).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import random
import tempfile

import lz4.block
import xxhash
import zstandard

from bench.common import machine_line, percentile, table
from snapd import uffd, uffd_handshake as hs
from snapd.pageserver import (CODEC_LZ4, CODEC_RAW, CODEC_ZERO, CODEC_ZSTD, ChunkRef, ChunkTable,
                              PageServer)
from snapd.uffd import ffi, lib

CODEC_NAMES = {CODEC_ZERO: "zero", CODEC_RAW: "raw", CODEC_LZ4: "lz4", CODEC_ZSTD: "zstd"}
PAGE = uffd.PAGE_SIZE

# ---------------------------------------------------------------- synthetic images


def synthetic_memory(size: int, chunk_size: int, seed: int = 1, zero_every: int = 4) -> bytes:
    """Guest-like memory: every page tagged with its index (misplaced pages show), half random,
    half repetitive; every `zero_every`-th chunk all zero (0: none)."""
    rng = random.Random(seed)
    out = bytearray(size)
    for page in range(size // PAGE):
        if zero_every and (page * PAGE // chunk_size) % zero_every == zero_every - 1:
            continue
        off = page * PAGE
        tag = f"page {page} seed {seed} ".encode()
        out[off:off + len(tag)] = tag
        out[off + 64:off + PAGE // 2] = rng.randbytes(PAGE // 2 - 64)
        out[off + PAGE // 2:off + PAGE] = bytes([page & 0xFF]) * (PAGE // 2)
    return bytes(out)


def encode_chunk(data: bytes, codec: int) -> bytes:
    if codec == CODEC_RAW:
        return data
    if codec == CODEC_LZ4:
        return lz4.block.compress(data, store_size=False)
    if codec == CODEC_ZSTD:
        return zstandard.ZstdCompressor(level=3).compress(data)
    raise ValueError(codec)


def write_image(directory: str, data: bytes, chunk_size: int, codecs=(CODEC_RAW, CODEC_LZ4, CODEC_ZSTD),
                name: str = "test-image", npacks: int = 2) -> ChunkTable:
    """Write data as chunks into `npacks` pack files; all-zero chunks get codec 0, the others cycle
    through `codecs`. Returns the chunk table (the shape BaseImage.chunk_table() has)."""
    paths = [os.path.join(directory, f"{name}.pack{i}") for i in range(npacks)]
    packs = [open(p, "wb") for p in paths]
    chunks, nonzero = [], 0
    try:
        for start in range(0, len(data), chunk_size):
            raw = data[start:start + chunk_size]
            if not any(raw):
                chunks.append(ChunkRef("", 0, 0, CODEC_ZERO, 0))
                continue
            codec = codecs[nonzero % len(codecs)]
            stored = encode_chunk(raw, codec)
            pack = nonzero % npacks
            nonzero += 1
            chunks.append(ChunkRef(paths[pack], packs[pack].tell(), len(stored), codec,
                                   xxhash.xxh3_64_intdigest(stored)))
            packs[pack].write(stored)
    finally:
        for f in packs:
            f.close()
    return ChunkTable(name, chunk_size, len(data), chunks)


# ---------------------------------------------------------------- the VMM side

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
PROT_RW = 0x1 | 0x2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED = 0x02, 0x20, 0x10
MADV_DONTNEED = 4
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap(size: int, fd: int = -1, offset: int = 0, addr: int | None = None) -> int:
    flags = MAP_PRIVATE | (MAP_ANONYMOUS if fd < 0 else 0) | (MAP_FIXED if addr else 0)
    p = _libc.mmap(addr, size, PROT_RW, flags, fd, offset)
    if p in (None, MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap")
    return p


class GuestMemory:
    """What a VMM does: map guest memory (anonymous, or MAP_PRIVATE of a shared image memfd),
    register it with a uffd, hand the uffd to the page server, keep the socket."""

    def __init__(self, size: int, memfd: int = -1, offset: int = 0):
        self.size, self.offset = size, offset
        self.addr = _mmap(size, memfd, offset)
        self.uffd = -1
        self.sock = None
        self.messages: hs.ServerMessages | None = None

    def register(self, mode: str = "missing") -> int:
        self.uffd = uffd.create_registered_uffd([(self.addr, self.size)], mode)
        return self.uffd

    def connect(self, sock_path: str, regions=None) -> hs.ServerMessages:
        """Register (if not yet) and do the handshake; regions default to the whole mapping."""
        if self.uffd < 0:
            self.register()
        regions = regions or [(self.addr, self.size, self.offset)]
        self.sock = hs.send_uffd(sock_path, self.uffd, regions)
        self.messages = hs.ServerMessages(self.sock)
        return self.messages

    def read(self, off: int = 0, n: int | None = None) -> bytes:
        return ctypes.string_at(self.addr + off, self.size - off if n is None else n)

    def touch(self, off: int, length: int, stride: int = PAGE, write: bool = False, timings=None) -> None:
        """Fault pages from C with the GIL released; timings: a cffi uint64_t[] for per-touch ns."""
        lib.snapd_touch(self.addr + off, length, stride, int(write), timings if timings is not None else ffi.NULL)

    def madvise_dontneed(self, off: int, length: int) -> None:
        if _libc.madvise(self.addr + off, length, MADV_DONTNEED):
            raise OSError(ctypes.get_errno(), "madvise")

    def mremap_to_new_address(self) -> int:
        """Move the whole mapping (a UFFD_EVENT_REMAP for the server); returns the new address."""
        target = _mmap(self.size)  # reserve a destination, then move over it
        p = _libc.mremap(self.addr, self.size, self.size, MREMAP_MAYMOVE | MREMAP_FIXED, target)
        if p in (None, MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mremap")
        self.addr = p
        return p

    def unregister(self) -> None:
        """Drop the registration and our uffd; the kernel wakes threads blocked on a fault, which
        then fault as on plain anonymous memory."""
        if self.uffd >= 0:
            try:
                uffd.unregister(self.uffd, self.addr, self.size)
            except uffd.UffdError:
                pass
            os.close(self.uffd)
            self.uffd = -1

    def close(self) -> None:
        """Unregister before unmapping: with EVENT_UNMAP, munmap would otherwise wait for a server
        that may already be gone to read the event."""
        self.unregister()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.addr:
            _libc.munmap(self.addr, self.size)
            self.addr = 0


# ---------------------------------------------------------------- the benchmark

CHUNK_SIZES = (4 << 10, 64 << 10, 512 << 10, 2 << 20)
CODECS = (CODEC_RAW, CODEC_LZ4, CODEC_ZSTD, CODEC_ZERO)


def measure(server: PageServer, workdir: str, chunk_size: int, codec: int, mem_size: int) -> dict:
    zero = codec == CODEC_ZERO
    data = bytes(mem_size) if zero else synthetic_memory(mem_size, chunk_size, zero_every=0)
    table_ = write_image(workdir, data, chunk_size, codecs=(codec,) if not zero else (CODEC_RAW,),
                         name=f"bench-{chunk_size}-{codec}", npacks=1)
    stored = sum(c.stored_len for c in table_.chunks)
    image = server.add_image(table_)
    sock_path = os.path.join(workdir, f"bench-{chunk_size}-{codec}.sock")
    listener = server.serve(sock_path, image)
    guest = GuestMemory(mem_size)
    try:
        guest.connect(sock_path).wait_ready(10)
        nfaults = mem_size // chunk_size
        timings = ffi.new("uint64_t[]", nfaults)
        guest.touch(0, mem_size, chunk_size, timings=timings)  # one touch per chunk = one fault
        touch_ns = [timings[i] for i in range(nfaults)]
        stats = server.stats(listener.wait_for_vms(1)[0])
    finally:
        guest.close()
        listener.close()
    pages = chunk_size // PAGE
    p50_touch = percentile(touch_ns, 50)
    return {
        "chunk": f"{chunk_size >> 10} KiB", "codec": CODEC_NAMES[codec], "faults": stats.faults,
        "ratio": round(mem_size / stored, 2) if stored else "-",
        "svc_p50_us": stats.percentile_ns(50) / 1e3, "svc_p99_us": stats.percentile_ns(99) / 1e3,
        "touch_p50_us": p50_touch / 1e3, "touch_p99_us": percentile(touch_ns, 99) / 1e3,
        "us_per_page": p50_touch / 1e3 / pages,
        "GB_s": chunk_size / p50_touch,
    }


SHARING_VARIANTS = ("copy", "shared+wake", "shared+continue")


def measure_sharing(server: PageServer, workdir: str, chunk_size: int, variant: str, mem_size: int) -> dict:
    """Two VMs on one image, each touching every page: what the first and the second VM pay per
    page with private UFFDIO_COPY, with the shared memfd + UFFDIO_WAKE, and with the shared memfd
    + UFFDIO_CONTINUE (registered missing+minor)."""
    data = synthetic_memory(mem_size, chunk_size, zero_every=0)
    name = f"share-{chunk_size}-{variant}"
    image = server.add_image(write_image(workdir, data, chunk_size, codecs=(CODEC_LZ4,), name=name, npacks=1),
                             shared=variant != "copy")
    sock_path = os.path.join(workdir, name + ".sock")
    listener = server.serve(sock_path, image, minor=variant == "shared+continue")
    npages = mem_size // PAGE
    row = {"chunk": f"{chunk_size >> 10} KiB", "install": variant}
    guests = []
    try:
        for which in ("vm1", "vm2"):
            g = GuestMemory(mem_size, memfd=image.memfd)
            guests.append(g)
            g.register("missing+minor" if variant == "shared+continue" else "missing")
            g.connect(sock_path).wait_ready(10)
            timings = ffi.new("uint64_t[]", npages)
            g.touch(0, mem_size, PAGE, timings=timings)
            row[f"{which}_us_per_page"] = sum(timings[i] for i in range(npages)) / npages / 1e3
            vm_id = listener.wait_for_vms(len(guests))[-1]
            row[f"{which}_uffd_faults"] = server.stats(vm_id).faults
        assert all(g.read() == data for g in guests)
    finally:
        for g in guests:
            g.close()
        listener.close()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fault_service", description=__doc__.split("\n")[0])
    p.add_argument("--mem-mib", type=int, default=32, help="guest memory per case (default 32 MiB)")
    p.add_argument("--quick", action="store_true", help="8 MiB per case")
    args = p.parse_args(argv)
    mem = (8 if args.quick else args.mem_mib) << 20
    rows = []
    with tempfile.TemporaryDirectory(prefix="fault-bench-") as workdir, PageServer() as server:
        for chunk_size in CHUNK_SIZES:
            for codec in CODECS:
                r = measure(server, workdir, chunk_size, codec, mem)
                rows.append(list(r.values()))
                headers = list(r.keys())
        share_rows = []
        for chunk_size in (64 << 10, 2 << 20):
            for variant in SHARING_VARIANTS:
                r = measure_sharing(server, workdir, chunk_size, variant, mem)
                share_rows.append(list(r.values()))
                share_headers = list(r.keys())
    print(f"# page-server fault service, {mem >> 20} MiB per case; {machine_line()}")
    print("## one fault per chunk (touch one byte per chunk)")
    print(table(headers, rows))
    print("\n## every page touched, two VMs on one image (lz4)")
    print(table(share_headers, share_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
