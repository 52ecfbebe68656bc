"""Run every benchmark of the harness in sequence and print all their tables.

    python -m bench [--quick] [--only boot,lazy_restore,...] [--list]

Each module runs as its own process (`python -m bench.NAME ARGS`, the exact command is printed above its
tables), so one failing module does not stop the others; the exit status is non-zero if any failed.
peers runs where qemu-system-x86_64 is installed.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time

from bench.common import machine_line

# (name, module, full-run arguments, --quick arguments)
PLAN = [
    ("boot", "bench.boot", [], ["--runs", "5", "--invokes", "300"]),
    ("snapshot", "bench.snapshot", [], ["--sizes", "128,2048", "--runs", "5"]),
    ("compression", "bench.compression", [], ["--workloads", "kv,scan,code", "--chunks", "64,512"]),
    ("compression-real", "bench.compression", ["--real", "--mem-mib", "128", "--data-mib", "32"],
     ["--real", "--mem-mib", "128", "--data-mib", "16", "--chunks", "64,512"]),
    ("fault_service", "bench.fault_service", [], ["--quick"]),
    ("lazy_restore", "bench.lazy_restore", [], ["--quick"]),
    # bench.clones takes a sub-command: latency | latency-gaps | invoke-gaps | latency-ab | memory | rate
    ("clones-latency", "bench.clones", ["latency"], ["latency", "--n", "20", "--warmup", "2"]),
    ("clones-latency-gaps", "bench.clones", ["latency-gaps"], ["latency-gaps", "--n", "15", "--warmup", "2"]),
    ("clones-invoke-gaps", "bench.clones", ["invoke-gaps"], ["invoke-gaps", "--n", "15", "--warmup", "2"]),
    ("clones-lane-ab", "bench.clones", ["latency-ab", "--ab", "lane"],
     ["latency-ab", "--ab", "lane", "--n", "15", "--warmup", "2"]),
    ("cold_cpu", "bench.cold_cpu", [], ["--n", "20"]),
    ("clones-memory", "bench.clones", ["memory"], ["memory", "--counts", "1,10"]),
    ("clones-rate", "bench.clones", ["rate"], ["rate", "--seconds", "3"]),
    ("prefetch", "bench.prefetch", [], ["--quick"]),
    ("dirty_log", "bench.dirty_log", [], ["--runs", "2"]),
    ("peers", "bench.peers", [], ["--runs", "5"]),  # runs only where qemu-system-x86_64 is installed
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small runs of every benchmark (a few minutes in all)")
    ap.add_argument("--only", default="", help="comma-separated names: " + ",".join(p[0] for p in PLAN))
    ap.add_argument("--list", action="store_true", help="print the commands that would run, and exit")
    args = ap.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    unknown = only - {p[0] for p in PLAN}
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    plan = []
    for name, module, full, quick in PLAN:
        if only and name not in only:
            continue
        if name == "peers" and shutil.which("qemu-system-x86_64") is None:
            print(f"# {name}: qemu-system-x86_64 is not installed; skipped", flush=True)
            continue
        plan.append((name, [sys.executable, "-m", module] + (quick if args.quick else full)))
    if args.list:
        for name, cmd in plan:
            print(" ".join(["python"] + cmd[1:]))
        return 0
    print(f"# Benchmarks ({'quick' if args.quick else 'full'} run) on {machine_line()}", flush=True)
    failed, t_all = [], time.perf_counter()
    for name, cmd in plan:
        print(f"\n\n## {name}: `{' '.join(['python'] + cmd[1:])}`\n", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"\n# {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.0f} s",
              flush=True)
        if rc:
            failed.append(name)
    print(f"\n# all benchmarks: {time.perf_counter() - t_all:.0f} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "all ok"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
