"""Cold boot and invoke round trip of the built-in guest.

- process start to first verified reply: `vmm run --invoke 1` as a new process, N times
- in-process: VM build + boot to the guest's ready signal, and to its first reply
- invoke round trip: many hello invocations on one running VM
Run: python -m bench.boot [--runs N]
"""
import argparse
import subprocess
import sys
import time

from bench.common import machine_line, summary, table
from vmm.config import MachineConfig
from vmm.machine import Microvm

FIRECRACKER_BOOT_TO_INIT_MS = 125.0  # published: boot to /sbin/init


def process_cold_boot(runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vmm.cli", "run", "--invoke", "1", "--json"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def in_process_boot(runs: int, mem_mib: int) -> tuple[list[float], list[float]]:
    to_ready, to_reply = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        machine = Microvm(MachineConfig(mem_size_mib=mem_mib), serial_sink=lambda data: None)
        try:
            machine.boot()
            machine.wait_ready(10)
            t1 = time.perf_counter()
            machine.invoke(b"first")
            t2 = time.perf_counter()
        finally:
            machine.close()
        to_ready.append((t1 - t0) * 1e3)
        to_reply.append((t2 - t0) * 1e3)
    return to_ready, to_reply


def invoke_round_trip(count: int) -> list[float]:
    machine = Microvm(MachineConfig(mem_size_mib=128), serial_sink=lambda data: None)
    try:
        machine.boot()
        machine.wait_ready(10)
        samples = []
        for i in range(count):
            t0 = time.perf_counter()
            machine.invoke(b"ping")
            samples.append((time.perf_counter() - t0) * 1e6)
    finally:
        machine.close()
    return samples


THP_CASES = {"hello, 128 MiB": (128, "workload=hello"), "kv, 512 MiB, 64 MiB table": (512, "workload=kv kv_mib=64")}


def thp_ab(runs: int, mem_mib: int, boot_args: str) -> tuple[list[float], list[float]]:
    """Boot to ready with guest memory on 4 KiB pages vs transparent huge pages, interleaved run by run."""
    import vmm.memory
    samples = {False: [], True: []}
    for i in range(2 * runs):
        thp = bool(i % 2)
        vmm.memory.TRANSPARENT_HUGE_PAGES = thp
        t0 = time.perf_counter()
        machine = Microvm(MachineConfig(mem_size_mib=mem_mib, boot_args=boot_args), serial_sink=lambda data: None)
        try:
            machine.boot()
            machine.wait_ready(30)
            samples[thp].append((time.perf_counter() - t0) * 1e3)
        finally:
            machine.close()
    vmm.memory.TRANSPARENT_HUGE_PAGES = True
    return samples[False], samples[True]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--invokes", type=int, default=2000)
    parser.add_argument("--thp-ab", action="store_true", help="only: kv boot on 4 KiB pages vs huge pages")
    args = parser.parse_args(argv)
    if args.thp_ab:
        rows = []
        for name, (mem_mib, boot_args) in THP_CASES.items():
            small, huge = (summary(s) for s in thp_ab(args.runs, mem_mib, boot_args))
            rows.append([name, small["n"], small["p50"], huge["p50"], small["p99"], huge["p99"],
                         f"{huge['p50'] / small['p50']:.2f}x"])
        print(f"# VM build + boot -> ready, ms: 4 KiB pages vs transparent huge pages ({machine_line()})\n")
        print(table(["guest", "n", "4 KiB p50", "THP p50", "4 KiB p99", "THP p99", "THP / 4 KiB (p50)"], rows))
        return
    cold = summary(process_cold_boot(max(3, args.runs // 4)))
    ready, reply = (summary(s) for s in in_process_boot(args.runs, 128))
    rtt = summary(invoke_round_trip(args.invokes))
    print(f"# Boot and invoke ({machine_line()})\n")
    print(table(["measure", "n", "p50", "p90", "p99", "unit"], [
        ["new process -> first verified reply (vmm run)", cold["n"], cold["p50"], cold["p90"], cold["p99"], "ms"],
        ["VM build + boot -> guest ready (128 MiB)", ready["n"], ready["p50"], ready["p90"], ready["p99"], "ms"],
        ["VM build + boot -> first reply (128 MiB)", reply["n"], reply["p50"], reply["p90"], reply["p99"], "ms"],
        ["invoke round trip (hello)", rtt["n"], rtt["p50"], rtt["p90"], rtt["p99"], "us"],
    ]))
    print(f"\nFirecracker, published: boot to /sbin/init {FIRECRACKER_BOOT_TO_INIT_MS} ms. "
          f"Ratio (Firecracker / ours, in-process boot to first reply p50): "
          f"{FIRECRACKER_BOOT_TO_INIT_MS / reply['p50']:.1f}x")


if __name__ == "__main__":
    main()
