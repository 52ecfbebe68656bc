"""Restore latency of the built-in guest's real snapshots: File (memory file MAP_PRIVATE), lazy (Uffd backend +
page server, chunks installed on fault) and eager (page server installs every chunk before it says ready).

For each workload (hello, kv, scan) and guest size (128 MiB, 512 MiB, 2 GiB) the guest is booted, snapshotted
right after its init phase, and its memory file built into a base image (default chunk size and codec). Then,
in rounds that visit every (workload, size, mode) cell once each (so the machine's noise lands on all cells
alike), one restore is timed:
- restore: the restore request until the load call returns with the VM running
- first reply: the restore request until the guest's first (verified) reply
The page server runs in this process (its fault loop is C with the GIL released), as in tests/test_lazy_restore.py.
All files are in the page cache (warm restores).

Also: the page server's per-fault service time for REAL KVM guest faults by chunk size (the kv guest restored
lazily from images built at 4 KiB .. 2 MiB chunks), beside bench.fault_service's thread faults measured in the
same run.

Run: python -m bench.lazy_restore [--sizes 128,512,2048] [--workloads hello,kv,scan] [--runs N] [--data-mib 32]
     python -m bench.lazy_restore --quick
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, field

from bench.common import machine_line, percentile, table
from snapd.image.builder import DEFAULT_CHUNK_SIZE, DEFAULT_CODEC, build_image
from snapd.pageserver import CODEC_LZ4, ChunkTable, PageServer, histogram_percentile
from vmm.config import MachineConfig
from vmm.driver import WorkloadDriver, WorkloadParams
from vmm.machine import Microvm
from vmm.prebuilt import PrebuiltVm, VmShape
from vmm.snapshot import create_snapshot, load_snapshot_file_backed, load_snapshot_uffd_backed, read_snapshot

# lazy-prebuilt: the lazy restore into a VM shell built before the request (vmm.prebuilt), as a warm pool does
MODES = ("file", "lazy", "eager", "lazy-prebuilt")
SERVER_MODE = {"lazy": "lazy", "eager": "eager", "lazy-prebuilt": "lazy"}
FIRECRACKER_LOAD_P50_MS = {128: 3.8, 512: 4.5, 2048: 6.9}  # published, bare metal, snapshot load
CLOUD_HYPERVISOR_1GIB_MS = {"eager": 727.0, "on-demand": 6.0}  # published, 1 GiB guest
FAULT_CHUNK_SIZES = (4 << 10, 64 << 10, 512 << 10, 2 << 20)
QUIET = lambda data: None  # noqa: E731


def data_mib_for(mem_mib: int, want: int) -> int:
    """The workload's table/array size: `want` MiB, at most a quarter of the guest."""
    return max(1, min(want, mem_mib // 4))


def make_snapshot(directory: str, workload: str, mem_mib: int, data_mib: int) -> tuple[WorkloadParams, str, str]:
    """Boot the built-in guest running `workload`, snapshot it right after its init phase (no invocation yet).
    Returns (params, state path, memory file path)."""
    params = WorkloadParams(workload=workload, kv_mib=data_mib, scan_mib=data_mib)
    machine = Microvm(MachineConfig(mem_size_mib=mem_mib, boot_args=params.boot_args()), serial_sink=QUIET)
    base = os.path.join(directory, f"{workload}-{mem_mib}")
    try:
        machine.boot()
        machine.wait_ready(60)
        machine.pause()
        create_snapshot(machine, base + ".state", base + ".mem")
    finally:
        machine.close()
    return params, base + ".state", base + ".mem"


def build(directory: str, mem_path: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> str:
    image = f"{mem_path[:-4]}-{chunk_size >> 10}k.img"
    build_image(mem_path, os.path.join(directory, f"store-{chunk_size >> 10}k"), image, chunk_size=chunk_size,
                codec=DEFAULT_CODEC)
    return image


@dataclass
class Cell:
    workload: str
    mem_mib: int
    mode: str
    restore_ms: list[float] = field(default_factory=list)
    reply_ms: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)
    installed: list[int] = field(default_factory=list)


class Restorer:
    """One snapshot, restorable in each mode; the page server listeners are made once and serve every restore."""

    def __init__(self, server: PageServer, directory: str, params: WorkloadParams, state: str, mem: str,
                 image: str, modes=MODES):
        self.server, self.params, self.state, self.mem = server, params, state, mem
        self.listeners = {}
        table_ = ChunkTable.from_base_image(image)
        img = server.add_image(table_)
        for mode in modes:
            if mode != "file":
                sock = os.path.join(directory, f"{os.path.basename(image)}.{mode}.sock")
                self.listeners[mode] = server.serve(sock, img, SERVER_MODE[mode])
        config = read_snapshot(state).config
        self.shape = VmShape(config.vcpu_count, config.mem_size_mib)

    def restore_once(self, mode: str, request_index: int = 0) -> tuple[float, float, object]:
        """(restore ms, first reply ms, page-server stats of this VM or None); the reply is verified."""
        driver = WorkloadDriver(self.params)
        request = driver.request(request_index)
        listener = self.listeners.get(mode)
        attached = len(listener.vm_ids) if listener else 0
        shell = PrebuiltVm(self.shape, serial_sink=QUIET) if mode == "lazy-prebuilt" else None  # untimed
        t0 = time.perf_counter()
        if mode == "file":
            machine = load_snapshot_file_backed(self.state, self.mem, serial_sink=QUIET)
        elif shell is not None:
            machine = shell.restore_from_page_server(read_snapshot(self.state), listener.sock_path)
        else:
            machine = load_snapshot_uffd_backed(self.state, listener.sock_path, serial_sink=QUIET)
        t1 = time.perf_counter()
        try:
            reply = machine.invoke(request, timeout=60)
            t2 = time.perf_counter()
            driver.verify(request, reply)
            stats = self.server.stats(listener.wait_for_vms(attached + 1)[-1]) if listener else None
        finally:
            machine.close()
        if stats is not None and stats.errors:
            raise RuntimeError(f"page server reported {stats.errors} errors for {self.params.workload} ({mode})")
        return (t1 - t0) * 1e3, (t2 - t0) * 1e3, stats


def merged_percentile(histograms: list[list[tuple[int, int, int]]], p: float) -> float:
    counts: dict[tuple[int, int], int] = {}
    for hist in histograms:
        for lo, hi, n in hist:
            counts[(lo, hi)] = counts.get((lo, hi), 0) + n
    return histogram_percentile(sorted((lo, hi, n) for (lo, hi), n in counts.items()), p)


def restore_matrix(server: PageServer, directory: str, sizes, workloads, data_mib: int, runs: int):
    """Returns (cells, prep rows, snapshots {(workload, mem_mib): (params, state, mem)})."""
    restorers, prep, snaps = {}, [], {}
    for mem_mib in sizes:
        for workload in workloads:
            t0 = time.perf_counter()
            params, state, mem = make_snapshot(directory, workload, mem_mib, data_mib_for(mem_mib, data_mib))
            t1 = time.perf_counter()
            image = build(directory, mem)
            t2 = time.perf_counter()
            snaps[(workload, mem_mib)] = (params, state, mem)
            restorers[(workload, mem_mib)] = Restorer(server, directory, params, state, mem, image)
            data = params.kv_mib if workload == "kv" else params.scan_mib if workload == "scan" else 0
            prep.append([workload, f"{mem_mib} MiB", data if data else "-", (t1 - t0) * 1e3, (t2 - t1) * 1e3,
                         os.stat(mem).st_blocks * 512 >> 20])
    cells = {(w, m, mode): Cell(w, m, mode) for (w, m) in restorers for mode in MODES}
    for key, restorer in restorers.items():  # one untimed warm-up per cell (page cache, code paths)
        for mode in MODES:
            restorer.restore_once(mode)
    for _ in range(runs):
        for (workload, mem_mib), restorer in restorers.items():
            for mode in MODES:
                restore_ms, reply_ms, stats = restorer.restore_once(mode)
                cell = cells[(workload, mem_mib, mode)]
                cell.restore_ms.append(restore_ms)
                cell.reply_ms.append(reply_ms)
                if stats is not None:
                    cell.faults.append(stats.faults)
                    cell.installed.append(stats.bytes_installed)
    return cells, prep, snaps


def real_fault_rows(server: PageServer, directory: str, params: WorkloadParams, state: str, mem: str,
                    runs: int, thread_mem: int) -> list[list]:
    """Per-fault service time of real KVM guest faults (kv guest, lazy) by chunk size, and bench.fault_service's
    thread faults (lz4, one fault per chunk) measured beside them."""
    from bench import fault_service
    rows = []
    for chunk in FAULT_CHUNK_SIZES:
        image = build(directory, mem, chunk)
        restorer = Restorer(server, directory, params, state, mem, image, modes=("lazy",))
        hists, faults, installed, replies = [], [], [], []
        restorer.restore_once("lazy")  # warm-up
        for _ in range(runs):
            _, reply_ms, stats = restorer.restore_once("lazy")
            hists.append(stats.histogram)
            faults.append(stats.faults)
            installed.append(stats.bytes_installed)
            replies.append(reply_ms)
        thread = fault_service.measure(server, directory, chunk, CODEC_LZ4, thread_mem)
        svc50 = merged_percentile(hists, 50) / 1e3
        rows.append([f"{chunk >> 10} KiB", round(percentile(faults, 50)), f"{percentile(installed, 50) / 2**20:.1f}",
                     svc50, merged_percentile(hists, 99) / 1e3, svc50 / (chunk // 4096), percentile(replies, 50),
                     thread["svc_p50_us"], thread["svc_p99_us"], thread["us_per_page"]])
    return rows


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lazy_restore", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128,512,2048", help="guest sizes in MiB")
    ap.add_argument("--workloads", default="hello,kv,scan")
    ap.add_argument("--runs", type=int, default=20, help="timed restores per (workload, size, mode)")
    ap.add_argument("--data-mib", type=int, default=32, help="kv table / scan array MiB (capped at a quarter of "
                                                              "the guest)")
    ap.add_argument("--fault-mib", type=int, default=512, help="guest size for the per-fault section (kv guest)")
    ap.add_argument("--fault-runs", type=int, default=5)
    ap.add_argument("--no-faults", action="store_true", help="skip the per-fault section")
    ap.add_argument("--quick", action="store_true", help="3 runs, 16 MiB data, 128 and 2048 MiB guests")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.data_mib, args.fault_runs, args.fault_mib = 3, 16, 2, 128
        if args.sizes == ap.get_default("sizes"):
            args.sizes = "128,2048"
    sizes = [int(s) for s in args.sizes.split(",")]
    workloads = args.workloads.split(",")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-lazy-") as directory, PageServer() as server:
        cells, prep, snaps = restore_matrix(server, directory, sizes, workloads, args.data_mib, args.runs)
        fault_rows = []
        if not args.no_faults:
            key = ("kv", args.fault_mib)
            if key in snaps:
                params, state, mem = snaps[key]
            else:
                params, state, mem = make_snapshot(directory, "kv", args.fault_mib,
                                                   data_mib_for(args.fault_mib, args.data_mib))
            fault_rows = real_fault_rows(server, directory, params, state, mem, args.fault_runs,
                                         (8 if args.quick else 32) << 20)
    elapsed = time.perf_counter() - t_start

    print(f"# Lazy / eager / File restore of real snapshots, ms ({machine_line()})")
    print(f"# {args.runs} timed restores per cell after one warm-up, cells interleaved; image chunk "
          f"{DEFAULT_CHUNK_SIZE >> 10} KiB {DEFAULT_CODEC}; page server in-process; warm page cache; "
          f"whole run {elapsed:.0f} s\n")
    print("## Snapshots (taken right after the guest's init phase)\n")
    print(table(["workload", "guest", "data MiB", "boot+snapshot ms", "build_image ms", "memory file MiB on disk"],
                prep))
    rows = []
    for (workload, mem_mib, mode), c in cells.items():
        fc = FIRECRACKER_LOAD_P50_MS.get(mem_mib) if mode == "file" else None
        rows.append([workload, f"{mem_mib} MiB", mode, len(c.reply_ms), percentile(c.restore_ms, 50),
                     percentile(c.restore_ms, 99), percentile(c.reply_ms, 50), percentile(c.reply_ms, 99),
                     round(percentile(c.faults, 50)) if c.faults else "-",
                     f"{percentile(c.installed, 50) / 2**20:.1f}" if c.installed else "-",
                     fc if fc else "-"])
    print("\n## Restore request -> VM running (restore), and -> first verified reply\n")
    print(table(["workload", "guest", "mode", "n", "restore p50", "restore p99", "first reply p50",
                 "first reply p99", "uffd faults", "MiB installed", "Firecracker load p50 (published)"], rows))

    print("\n## Ratios of first-reply p50 across guest sizes (goal: lazy 2 GiB / 128 MiB <= 1.2x)\n")
    small = min(sizes)
    ratio_rows = []
    for workload in workloads:
        for mode in MODES:
            base = percentile(cells[(workload, small, mode)].reply_ms, 50)
            ratio_rows.append([workload, mode] + [fmt_ratio(percentile(cells[(workload, m, mode)].reply_ms, 50), base)
                                                  for m in sizes if m != small])
    print(table(["workload", "mode"] + [f"{m} / {small} MiB" for m in sizes if m != small], ratio_rows))

    eager, on_demand = CLOUD_HYPERVISOR_1GIB_MS["eager"], CLOUD_HYPERVISOR_1GIB_MS["on-demand"]
    print(f"\n## Ratios between modes, first-reply p50 (Cloud Hypervisor, published, 1 GiB: eager {eager:.0f} ms vs "
          f"on-demand {on_demand:.0f} ms = {eager / on_demand:.0f}x)\n")
    mode_rows = []
    for mem_mib in sizes:
        for workload in workloads:
            p = {mode: percentile(cells[(workload, mem_mib, mode)].reply_ms, 50) for mode in MODES}
            mode_rows.append([workload, f"{mem_mib} MiB", fmt_ratio(p["eager"], p["lazy"]),
                              fmt_ratio(p["lazy"], p["file"]), fmt_ratio(p["eager"], p["file"])])
    print(table(["workload", "guest", "eager / lazy", "lazy / file", "eager / file"], mode_rows))

    if fault_rows:
        print(f"\n## Page-server fault service by chunk size: real KVM guest faults (kv guest, {args.fault_mib} MiB, "
              f"lazy restore + first reply, {args.fault_runs} restores merged) beside thread faults "
              f"(bench.fault_service, lz4, one touch per chunk, same run), us\n")
        print(table(["chunk", "guest faults / restore", "MiB installed", "guest svc p50", "guest svc p99",
                     "guest svc p50 per 4 KiB", "first reply p50 ms", "thread svc p50", "thread svc p99",
                     "thread touch us / 4 KiB"], fault_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
