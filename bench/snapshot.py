"""Snapshot create time and File-backend restore latency (restore request to the guest's first reply).

Three restore paths, all with the File backend (memory file mapped MAP_PRIVATE):
- cold: parse the state file, build the VM, map memory, restore, start vCPU threads, first reply
- prebuilt: a VM shell (VM, slots, irqchip, parked vCPU threads) built ahead; parse + remap + restore + reply
- api: `PUT /snapshot/load` on a fresh `vmm --api-sock` process, then `PUT /invoke` (HTTP over a Unix socket)
Run: python -m bench.snapshot [--sizes 128,512,2048] [--runs N]
"""
import argparse
import os
import subprocess
import tempfile
import time

from bench.common import machine_line, summary, table
from vmm.config import MachineConfig
from vmm.machine import Microvm
from vmm.prebuilt import PrebuiltVm, VmShape
from vmm.snapshot import create_snapshot, load_snapshot_file_backed, read_snapshot

FIRECRACKER_LOAD_P50_MS = {128: 3.8, 512: 4.5, 2048: 6.9}  # published, bare metal
QUIET = staticmethod(lambda data: None)


def make_snapshot(directory: str, mem_mib: int) -> tuple[str, str, float]:
    machine = Microvm(MachineConfig(mem_size_mib=mem_mib, boot_args="workload=hello"), serial_sink=lambda d: None)
    try:
        machine.boot()
        machine.wait_ready(10)
        machine.invoke(b"warm")
        t0 = time.perf_counter()
        machine.pause()
        state, mem = os.path.join(directory, f"{mem_mib}.state"), os.path.join(directory, f"{mem_mib}.mem")
        create_snapshot(machine, state, mem)
        elapsed = (time.perf_counter() - t0) * 1e3
    finally:
        machine.close()
    return state, mem, elapsed


def _to_first_reply_ms(restore) -> float:
    """Milliseconds from calling ``restore()`` (which returns a running machine) to its first reply."""
    t0 = time.perf_counter()
    machine = restore()
    try:
        machine.invoke(b"first")
        return (time.perf_counter() - t0) * 1e3
    finally:
        machine.close()


def cold_restore(state_path: str, mem_path: str) -> float:
    return _to_first_reply_ms(lambda: load_snapshot_file_backed(state_path, mem_path, serial_sink=lambda d: None))


def prebuilt_restore(state_path: str, mem_path: str, mem_mib: int) -> float:
    shell = PrebuiltVm(VmShape(1, mem_mib), serial_sink=lambda d: None)  # built before the clock starts

    def restore():
        fd = os.open(mem_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return shell.restore(read_snapshot(state_path), fd)
        finally:
            os.close(fd)
    return _to_first_reply_ms(restore)


def api_restore(state_path: str, mem_path: str, directory: str) -> float:
    """A fresh `vmm --api-sock` process (started untimed, as a pool would), then load + first invoke over HTTP."""
    from vmm.api.client import VmmProcess
    with VmmProcess(os.path.join(directory, "bench-vmm.sock"), stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL) as vmm:
        t0 = time.perf_counter()
        vmm.client.load_snapshot(state_path, mem_path, resume_vm=True)
        vmm.client.invoke(b"first")
        return (time.perf_counter() - t0) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,512,2048")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as directory:
        for mem_mib in (int(s) for s in args.sizes.split(",")):
            creates = []
            for _ in range(5):
                state_path, mem_path, elapsed = make_snapshot(directory, mem_mib)
                creates.append(elapsed)
            cold = summary([cold_restore(state_path, mem_path) for _ in range(args.runs)])
            pre = summary([prebuilt_restore(state_path, mem_path, mem_mib) for _ in range(args.runs)])
            api = summary([api_restore(state_path, mem_path, directory) for _ in range(max(5, args.runs // 3))])
            create = summary(creates)
            fc = FIRECRACKER_LOAD_P50_MS.get(mem_mib)
            rows.append([f"{mem_mib} MiB", create["p50"], api["p50"], api["p99"], cold["p50"], cold["p99"],
                         pre["p50"], pre["p99"], fc if fc else "-",
                         f"{fc / api['p50']:.1f}x / {fc / pre['p50']:.1f}x" if fc else "-"])
    print(f"# Snapshot create and File-backend restore, ms ({machine_line()})\n")
    print(table(["guest", "create p50", "API load->reply p50", "p99", "cold in-process p50", "p99",
                 "prebuilt p50", "p99", "Firecracker load p50", "Firecracker / ours (API / prebuilt)"], rows))


if __name__ == "__main__":
    main()
