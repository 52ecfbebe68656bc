"""Compression ratio and one-core throughput per codec, level and chunk size, over guest memory
shaped like the built-in workloads (docs/function-port.md). Run: python -m bench.compression
With --real (or --mem-file PATH), the same measures over the memory files of real snapshots of the built-in guest
(booted, snapshotted right after init, as bench.lazy_restore does) instead of synthetic memory:
    python -m bench.compression --real --mem-mib 128 --data-mib 32"""
from __future__ import annotations

import argparse
import array
import glob
import os
import sys
import tempfile
import time

from snapd.image import codecs

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIB = 1 << 20
CHUNK_SIZES = (4 << 10, 64 << 10, 512 << 10, 2 << 20)
CODECS = (("lz4", codecs.LZ4, 0), ("lz4hc-9", codecs.LZ4, 9),
          ("zstd-1", codecs.ZSTD, 1), ("zstd-3", codecs.ZSTD, 3), ("zstd-9", codecs.ZSTD, 9))


def mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def kv_table(mib: int, seed: int = 1) -> bytes:
    """Open-addressing table of {u64 key, u64 value}, load 0.5, linear probing (slot = mix64(key) mod n)."""
    n = mib * MIB // 16
    table = array.array("Q", bytes(16 * n))
    mask = n - 1
    for i in range(n // 2):
        key = mix64(seed ^ (i + 1)) | 1
        pos = mix64(key) & mask
        while table[2 * pos]:
            pos = (pos + 1) & mask
        table[2 * pos] = key
        table[2 * pos + 1] = mix64(key ^ seed)
    return table.tobytes()


def scan_array(mib: int, seed: int = 1) -> bytes:
    base = mix64(seed)
    return array.array("Q", [(base + i * GOLDEN) & M64 for i in range(mib * MIB // 8)]).tobytes()


def code_bytes(size: int) -> bytes:
    """Real machine code and data: shared libraries of this machine, standing in for a guest's text."""
    out = bytearray()
    for path in sorted(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*")):
        if len(out) >= size:
            break
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                out += f.read(size - len(out))
    return bytes(out.ljust(size, b"\0"))


def guest_memory(workload: str, mem_mib: int = 64, heap_mib: int = 16) -> bytes:
    """A guest of mem_mib: low memory with page tables, a 64 KiB image at 1 MiB, the workload heap at
    2 MiB, zeros elsewhere (as after the guest's init phase)."""
    mem = bytearray(mem_mib * MIB)
    pd = array.array("Q", [(i << 21) | 0x87 for i in range(mem_mib // 2)]).tobytes()  # 2 MiB pages, U/W/P
    mem[0x9000:0x9008] = (0xA000 | 7).to_bytes(8, "little")
    mem[0xA000:0xA008] = (0xB000 | 7).to_bytes(8, "little")
    mem[0xB000:0xB000 + len(pd)] = pd
    mem[0x100000:0x110000] = code_bytes(64 << 10)
    heap = {"hello": b"", "kv": lambda: kv_table(heap_mib), "scan": lambda: scan_array(heap_mib),
            "code": lambda: code_bytes(heap_mib * MIB)}[workload]
    data = heap() if callable(heap) else heap
    mem[0x200000:0x200000 + len(data)] = data
    return bytes(mem)


def measure(mem: bytes, chunk: int, codec: int, level: int) -> dict:
    view = memoryview(mem)
    chunks = [view[o:o + chunk] for o in range(0, len(mem), chunk)]
    zero = bytes(chunk)
    live = [c for c in chunks if c != zero[:len(c)]]
    t0 = time.perf_counter()
    enc = [codecs.encode(c, codec, level) for c in live]
    t_comp = time.perf_counter() - t0
    packed = [(cid, stored, len(c)) for (cid, stored), c in zip(enc, live) if cid != codecs.RAW]
    best = float("inf")
    for _ in range(3):  # decompression is fast and noisy: best of three
        t0 = time.perf_counter()
        for cid, stored, n in packed:
            codecs.decode(cid, stored, n)
        best = min(best, time.perf_counter() - t0)
    live_bytes = sum(len(c) for c in live)
    packed_bytes = sum(n for _, _, n in packed)
    stored = sum(len(s) for _, s in enc)
    return {"zero": 1 - len(live) / len(chunks), "raw": 1 - len(packed) / len(live) if live else 0.0,
            "ratio": len(mem) / max(stored, 1), "live_ratio": live_bytes / max(stored, 1),
            "comp": live_bytes / t_comp / 1e6 if live else 0.0,
            "decomp": packed_bytes / best / 1e6 if packed else None}


def build_throughput(mem: bytes, chunk: int) -> float:
    from snapd.image import build_image
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mem")
        with open(path, "wb") as f:
            f.write(mem)
        t0 = time.perf_counter()
        build_image(path, os.path.join(d, "store"), os.path.join(d, "img"), chunk_size=chunk, codec="lz4")
        return len(mem) / (time.perf_counter() - t0) / 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workloads", default="hello,kv,scan,code")
    ap.add_argument("--mem-mib", type=int, default=64)
    ap.add_argument("--chunks", default=",".join(str(c >> 10) for c in CHUNK_SIZES), help="chunk sizes, KiB")
    ap.add_argument("--real", action="store_true", help="real snapshot memory of the built-in guest's workloads")
    ap.add_argument("--data-mib", type=int, default=32, help="--real: kv table / scan array MiB")
    ap.add_argument("--mem-file", action="append", default=[], help="measure this raw memory file (repeatable)")
    args = ap.parse_args(argv)
    chunk_sizes = [int(c) << 10 for c in args.chunks.split(",")]
    if args.real or args.mem_file:
        return real_main(args, chunk_sizes)
    print(f"# one core, MB/s of uncompressed non-zero input; ratio = whole memory / stored bytes "
          f"(zero chunks stored as nothing); live = non-zero bytes / stored bytes; raw % = non-zero chunks stored "
          f"raw; decompress over compressed chunks only; {args.mem_mib} MiB guests")
    print("| workload | codec | chunk | zero % | raw % | ratio | live ratio | compress MB/s | decompress MB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for wl in args.workloads.split(","):
        print_rows(wl, guest_memory(wl, args.mem_mib), chunk_sizes)
    guests = b"".join(guest_memory(wl, args.mem_mib) for wl in ("kv", "scan", "code"))
    dense = kv_table(32) + code_bytes(32 * MIB)  # no zero chunks: every byte is hashed and compressed
    for label, mem in (("kv+scan+code guests", guests), ("dense kv table + code, no zeros", dense)):
        for chunk in chunk_sizes:
            print(f"# build_image lz4, {os.cpu_count()} threads, {label} ({len(mem) >> 20} MiB), chunk "
                  f"{chunk >> 10} KiB: {build_throughput(mem, chunk):.0f} MB/s (hashing, zero skip, fsync included)")


def print_rows(label: str, mem: bytes, chunk_sizes) -> None:
    """One table row per codec and chunk size for ``mem``."""
    for name, cid, level in CODECS:
        for chunk in chunk_sizes:
            r = measure(mem, chunk, cid, level)
            dec = "-" if r["decomp"] is None else f"{r['decomp']:.0f}"
            print(f"| {label} | {name} | {chunk >> 10} KiB | {100 * r['zero']:.1f} | {100 * r['raw']:.0f} | "
                  f"{r['ratio']:.2f} | {r['live_ratio']:.2f} | {r['comp']:.0f} | {dec} |", flush=True)


def real_main(args, chunk_sizes) -> None:
    """The table of main() over real memory files: snapshots of the built-in guest (--real) and/or --mem-file."""
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as d:
        files = [(os.path.basename(p), p) for p in args.mem_file]
        if args.real:
            from bench.lazy_restore import data_mib_for, make_snapshot
            data_mib = data_mib_for(args.mem_mib, args.data_mib)
            for wl in args.workloads.split(","):
                if wl in ("hello", "kv", "scan"):
                    files.append((f"{wl} (real, data {data_mib if wl != 'hello' else 0} MiB)",
                                  make_snapshot(d, wl, args.mem_mib, data_mib)[2]))
        print(f"# REAL snapshot memory; one core, MB/s of uncompressed non-zero input; ratio = whole memory / "
              f"stored bytes; live = non-zero bytes / stored bytes; raw % = non-zero chunks stored raw; "
              f"{args.mem_mib} MiB guests snapshotted right after init")
        print("| memory | codec | chunk | zero % | raw % | ratio | live ratio | compress MB/s | decompress MB/s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, path in files:
            with open(path, "rb") as f:
                print_rows(label, f.read(), chunk_sizes)


if __name__ == "__main__":
    sys.exit(main())
