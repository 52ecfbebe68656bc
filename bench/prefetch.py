"""Time to first reply after a restore, four ways in one run, plus Diff-snapshot cost.

    PYTHONPATH=. .venv/bin/python -m bench.prefetch [--quick] [--reps N]

Modes (one kv or scan guest snapshot per case, one base image, 512 KiB lz4 chunks):
- resident_file: the memory file mapped MAP_PRIVATE (File backend), in the page cache and every page
  pre-faulted by the VMM before the clock starts (the restore's load call is timed, the pre-fault is not);
- resident_anon: anonymous memory fully installed (an eager restore, not timed); only resume + first reply
  are timed: the lower bound;
- lazy: page server, faults only;
- prefetch: page server with the loading set recorded on one earlier lazy restore (another request);
- eager: page server installs the whole image before ready.
Time to first reply = load_snapshot_* call + resume + first invoke; the reply is verified (not timed).
The page server and image (packs in the page cache) are set up before the clock starts, as a daemon holds them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from bench.common import machine_line, table
from snapd.image.builder import build_image
from snapd.pageserver import ChunkTable, PageServer
from snapd.uffd import ffi as uffd_ffi
from snapd.uffd import lib as uffd_lib
from vmm import workloads
from vmm.config import MachineConfig
from vmm.machine import Microvm
from vmm.snapshot import create_snapshot, load_snapshot_file_backed, load_snapshot_uffd_backed, resume_restored

QUIET = lambda data: None  # noqa: E731
CHUNK = 512 << 10


def request_for(workload: str, mib: int, seed: int) -> bytes:
    if workload == "kv":  # random lookups; enough of them to touch every 512 KiB chunk of the table
        return workloads.kv_request(max(1000, mib * 64), seed)
    return workloads.scan_request(0, mib)  # the whole array


def verify(workload: str, mib: int, request: bytes, reply: bytes) -> None:
    if workload == "kv":
        workloads.verify_kv(1, mib, request, reply)
    else:
        workloads.verify_scan(1, mib, request, reply)


def prepare(workdir: str, workload: str, mib: int, mem_mib: int, chunk: int = CHUNK) -> str:
    d = os.path.join(workdir, f"{workload}{mib}-{mem_mib}-{chunk >> 10}k")
    os.makedirs(d)
    m = Microvm(MachineConfig(mem_size_mib=mem_mib, boot_args=f"workload={workload} {workload}_mib={mib}"),
                serial_sink=QUIET)
    try:
        m.boot()
        m.wait_ready(60)
        m.pause()
        create_snapshot(m, f"{d}/vm.state", f"{d}/vm.mem")
    finally:
        m.close()
    build_image(f"{d}/vm.mem", f"{d}/store", f"{d}/vm.img", chunk_size=chunk)
    return d


def prefault(machine) -> None:
    """Read every page from C (GIL released), so the page tables of the VMM's mapping are populated."""
    for r in machine.memory.regions:
        uffd_lib.snapd_touch(r.host_addr, r.size, 4096, 0, uffd_ffi.NULL)


def first_reply(load, workload, mib, seed) -> float:
    request = request_for(workload, mib, seed)
    t0 = time.perf_counter()
    machine = load()
    try:
        reply = machine.invoke(request, timeout=60)
        t = time.perf_counter() - t0
        verify(workload, mib, request, reply)
    finally:
        machine.close()
    return t * 1e3


def measure_case(server: PageServer, d: str, workload: str, mib: int, reps: int) -> dict:
    table_ = ChunkTable.from_base_image(f"{d}/vm.img")
    image = server.add_image(table_)
    state = f"{d}/vm.state"
    # Record: one lazy restore up to the first reply.
    rec = server.serve(f"{d}/rec.sock", image, "lazy", record=True)
    first_reply(lambda: load_snapshot_uffd_backed(state, rec.sock_path, serial_sink=QUIET), workload, mib, 1)
    loading_set = server.stop_recording(rec.wait_for_vms(1)[0])
    loading_set.save(f"{d}/vm.img.loadset")
    sockets = {mode: server.serve(f"{d}/{mode}.sock", image, mode,
                                  loading_set=f"{d}/vm.img.loadset" if mode == "prefetch" else None)
               for mode in ("lazy", "prefetch", "eager")}

    def resident():
        fd_mem = f"{d}/vm.mem"
        with open(fd_mem, "rb") as f:  # page cache warm
            while f.read(8 << 20):
                pass
        m = load_snapshot_file_backed(state, fd_mem, resume=False, serial_sink=QUIET)
        prefault(m)
        return m

    times: dict[str, list[float]] = {k: [] for k in ("resident", "resident_anon", "lazy", "prefetch", "eager")}
    for rep in range(reps):
        seed = 100 + rep
        # resident_anon: anonymous memory fully installed (eager) before the clock; resume + first reply only
        m = load_snapshot_uffd_backed(state, sockets["eager"].sock_path, resume=False, serial_sink=QUIET)
        request = request_for(workload, mib, seed)
        try:
            t0 = time.perf_counter()
            resume_restored(m)
            reply = m.invoke(request, timeout=60)
            times["resident_anon"].append((time.perf_counter() - t0) * 1e3)
            verify(workload, mib, request, reply)
        finally:
            m.close()
        # resident: pre-fault outside the clock
        m = resident()
        request = request_for(workload, mib, seed)
        t0 = time.perf_counter()
        try:
            resume_restored(m)
            reply = m.invoke(request, timeout=60)
            times["resident"].append((time.perf_counter() - t0) * 1e3)
            verify(workload, mib, request, reply)
        finally:
            m.close()
        for mode, listener in sockets.items():
            times[mode].append(first_reply(
                lambda: load_snapshot_uffd_backed(state, listener.sock_path, serial_sink=QUIET), workload, mib, seed))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"loadset_chunks": len(loading_set.chunks), "loadset_mib": loading_set.bytes_covered() / (1 << 20),
            **med}


def measure_diff(workdir: str, mem_mib: int, dirty_fraction: float) -> dict:
    """Full vs Diff snapshot of a guest with `dirty_fraction` of its memory dirtied since the last one."""
    d = os.path.join(workdir, f"diff-{mem_mib}")
    os.makedirs(d)
    m = Microvm(MachineConfig(mem_size_mib=mem_mib, boot_args="workload=scan scan_mib=64", track_dirty_pages=True),
                serial_sink=QUIET)
    try:
        m.boot()
        m.wait_ready(60)
        m.pause()
        full = create_snapshot(m, f"{d}/full.state", f"{d}/full.mem")
        npages = int(mem_mib * 256 * dirty_fraction)
        step = (mem_mib * 256) // npages
        page = os.urandom(4096)
        for k in range(npages):  # scattered over all of memory (the VMM writes; tracked like guest writes)
            m.memory.write(k * step * 4096, page)
        t0 = time.perf_counter()
        diff = create_snapshot(m, f"{d}/diff.state", f"{d}/diff.mem", snapshot_type="Diff")
        diff_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        full2 = create_snapshot(m, f"{d}/full2.state", f"{d}/full2.mem")
        full_ms = (time.perf_counter() - t0) * 1e3
    finally:
        m.close()
    used = lambda p: os.stat(p).st_blocks * 512  # noqa: E731  allocated bytes (files are sparse)
    return {"mem_mib": mem_mib, "dirty_pages": npages, "full_ms": full_ms, "diff_ms": diff_ms,
            "full_mib": used(f"{d}/full2.mem") / (1 << 20), "diff_mib": used(f"{d}/diff.mem") / (1 << 20),
            "first_full_ms": full.memory_ms + full.state_ms, "diff_memory_ms": diff.memory_ms}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prefetch", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small cases only")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunk-kib", type=int, action="append", help="image chunk size(s) in KiB (default 512)")
    p.add_argument("--no-diff", action="store_true", help="skip the Diff snapshot measurement")
    args = p.parse_args(argv)
    cases = ([("kv", 8, 256), ("scan", 8, 256)] if args.quick else
             [("kv", 8, 256), ("kv", 64, 1024), ("scan", 16, 512), ("scan", 64, 1024)])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prefetch-", dir=os.environ.get("BENCH_TMP")) as workdir, \
            PageServer() as server:
        for (workload, mib, mem_mib), chunk_kib in [(c, k) for c in cases for k in (args.chunk_kib or [512])]:
            d = prepare(workdir, workload, mib, mem_mib, chunk_kib << 10)
            r = measure_case(server, d, workload, mib, args.reps)
            rows.append([workload, f"{mib} MiB / {mem_mib} MiB", chunk_kib, r["loadset_chunks"], round(r["loadset_mib"], 1),
                         r["resident"], r["resident_anon"], r["lazy"], r["prefetch"], r["eager"],
                         r["prefetch"] / r["resident_anon"], r["lazy"] / r["prefetch"]])
            print(rows[-1], flush=True)
        print(f"\n{machine_line()}; median of {args.reps}; ms to the first verified reply\n")
        print(table(["workload", "working set / guest", "chunk KiB", "loadset chunks", "loadset MiB", "resident_file_ms",
                     "resident_anon_ms", "lazy_ms", "prefetch_ms", "eager_ms", "prefetch/resident_anon",
                     "lazy/prefetch"], rows))
        if args.no_diff:
            return 0
        diff = measure_diff(workdir, 256 if args.quick else 1024, 0.01)
        print()
        print(table(list(diff), [list(diff.values())]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
