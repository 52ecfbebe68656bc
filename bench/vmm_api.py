"""The VMM API's request latency, this tree against another (a baseline checkout), alternating in one run.

    PYTHONPATH=. .venv/bin/python -m bench.vmm_api --baseline /tmp/old [--n 300] [--gap-ms 20]

Each side is a `vmm --api-sock` process started from its own tree (the baseline needs its compiled extensions:
copy this tree's *.so files into it when the C code is the same). The request is PUT /machine-config on a
kept-alive connection after --gap-ms of idle, timed on the wire from its first byte sent to its reply's head.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

from bench.common import machine_line, summary, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = b'{"vcpu_count": 1, "mem_size_mib": 32}'
REQUEST = (b"PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY)


def start(root: str, sock: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "vmm.cli", "--api-sock", sock], cwd=root,
                               env=dict(os.environ, PYTHONPATH=root), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"vmm from {root} did not start")
        time.sleep(0.02)
    return process


def timed(conn: socket.socket, gap_ms: float) -> float:
    time.sleep(gap_ms / 1e3)
    t0 = time.perf_counter()
    conn.sendall(REQUEST)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk:
            raise RuntimeError("the VMM closed the connection")
        head += chunk
    elapsed = (time.perf_counter() - t0) * 1e3
    if not head.startswith(b"HTTP/1.1 204"):
        raise RuntimeError(f"unexpected reply {head[:80]!r}")
    return elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vmm_api", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="another checkout of this project, built")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--gap-ms", type=float, default=20.0)
    args = p.parse_args(argv)
    print(machine_line(), flush=True)
    trees = {"baseline": os.path.abspath(args.baseline), "this tree": ROOT}
    samples = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="bench-vmm-api-") as work:
        processes, conns = {}, {}
        try:
            for name, root in trees.items():
                sock = os.path.join(work, f"{len(processes)}.sock")
                processes[name] = start(root, sock)
                conns[name] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conns[name].settimeout(30)
                conns[name].connect(sock)
            for i in range(args.n + args.warmup):
                for name in list(trees) if i % 2 else list(trees)[::-1]:
                    elapsed = timed(conns[name], args.gap_ms)
                    if i >= args.warmup:
                        samples[name].append(elapsed)
        finally:
            for conn in conns.values():
                conn.close()
            for process in processes.values():
                process.terminate()
                process.wait()
    rows = [[name, s["p50"], s["p90"], s["p99"]] for name, s in ((n, summary(v)) for n, v in samples.items())]
    base, this = summary(samples["baseline"]), summary(samples["this tree"])
    rows.append(["ratio this/baseline", this["p50"] / base["p50"], this["p90"] / base["p90"], this["p99"] / base["p99"]])
    print(table(["PUT /machine-config on the wire", "p50 (ms)", "p90", "p99"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
