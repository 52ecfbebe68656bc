"""Dirty bitmap vs dirty ring, measured in one run: which KVM dirty log to use for Diff snapshots here.

For each mode the kv guest (1 GiB, 64 MiB table) boots with dirty tracking on; its init phase writes the table.
Measured per mode, interleaved over --runs rounds:
- boot -> ready: the guest's writes under tracking (write-protection faults, ring-full exits)
- harvest after init: take_dirty_pages() with ~16k dirty pages
- harvest after 20 invocations: the sparse case (stack, mailbox)
- Diff snapshot after 20 invocations: create_snapshot(..., "Diff") end to end
Run: python -m bench.dirty_log [--runs N]
"""
import argparse
import os
import tempfile
import time

from bench.common import machine_line, percentile, table
from vmm import workloads
from vmm.config import MachineConfig
from vmm.machine import Microvm
from vmm.snapshot import create_snapshot

MODES = ("bitmap", "ring")


def one_run(mode: str, directory: str) -> dict:
    t0 = time.perf_counter()
    machine = Microvm(MachineConfig(mem_size_mib=1024, boot_args="workload=kv kv_mib=64", track_dirty_pages=True,
                                    dirty_log=mode), serial_sink=lambda data: None)
    try:
        machine.boot()
        machine.wait_ready(30)
        t1 = time.perf_counter()
        machine.pause()
        t2 = time.perf_counter()
        dense = len(machine.take_dirty_pages())
        t3 = time.perf_counter()
        create_snapshot(machine, os.path.join(directory, "base.state"), os.path.join(directory, "base.mem"))
        machine.resume()
        for i in range(20):
            machine.invoke(workloads.kv_request(1000, i))
        machine.pause()
        t4 = time.perf_counter()
        sparse = len(machine.take_dirty_pages())
        t5 = time.perf_counter()
        machine.resume()
        for i in range(20):
            machine.invoke(workloads.kv_request(1000, 100 + i))
        machine.pause()
        t6 = time.perf_counter()
        create_snapshot(machine, os.path.join(directory, "diff.state"), os.path.join(directory, "diff.mem"), "Diff")
        t7 = time.perf_counter()
    finally:
        machine.close()
    return {"ready": (t1 - t0) * 1e3, "dense": (t3 - t2) * 1e3, "dense_pages": dense,
            "sparse": (t5 - t4) * 1e3, "sparse_pages": sparse, "diff": (t7 - t6) * 1e3}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    results = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-dirty-") as directory:
        for _ in range(args.runs):
            for mode in MODES:
                results[mode].append(one_run(mode, directory))
    rows = []
    for mode in MODES:
        r = results[mode]
        p50 = lambda key: percentile([x[key] for x in r], 50)  # noqa: E731
        rows.append([mode, len(r), p50("ready"), p50("dense"), r[0]["dense_pages"], p50("sparse"),
                     r[0]["sparse_pages"], p50("diff")])
    print(f"# Dirty bitmap vs dirty ring, kv guest 1 GiB / 64 MiB table, p50 ms ({machine_line()})\n")
    print(table(["dirty log", "runs", "boot -> ready", "harvest after init", "pages", "harvest after 20 invokes",
                 "pages", "Diff snapshot"], rows))
    b, r = rows
    print(f"\nring / bitmap: boot {r[2] / b[2]:.2f}x, dense harvest {r[3] / b[3]:.2f}x, sparse harvest "
          f"{r[5] / b[5]:.2f}x, Diff snapshot {r[7] / b[7]:.2f}x")


if __name__ == "__main__":
    main()
