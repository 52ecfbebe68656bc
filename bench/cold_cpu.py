"""How much slower the same small piece of work runs after the CPU has idled, on this host.

    python -m bench.cold_cpu [--gaps 0,1,2,5,20,100] [--n 60]

On these nested hosts a CPU that idles for a few milliseconds comes back cold: the first microseconds of work
after it (caches, TLBs, whatever the outer hypervisor did meanwhile) cost many times the same work done a moment
later. A restore request crosses four processes (client, daemon, worker, daemon, client), so an isolated request
pays this several times over (docs/benchmarks.md, "Cold CPUs"). This probe measures it without snapd: two
processes ping-pong one small JSON message over a SEQPACKET socket pair (decode, encode, send), after sleeping
``gap`` ms, and the same round trip repeated at once (warm); the ratio is the figure to compare across gaps.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

from bench.common import machine_line, summary, table

MESSAGE = json.dumps({"op": "restore", "prepared": True, "image": "i-0123456789ab", "invoke": True,
                      "timeout": 10.0, "timings": {"prepare_us": 1234.5, "populate_us": 61.2}}).encode()


def echo(sock: socket.socket) -> None:
    while True:
        data = sock.recv(4096)
        if not data:
            os._exit(0)
        sock.send(json.dumps(json.loads(data)).encode())


def round_trip(sock: socket.socket) -> float:
    t0 = time.perf_counter()
    sock.send(json.dumps(json.loads(MESSAGE)).encode())
    json.loads(sock.recv(4096))
    return (time.perf_counter() - t0) * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cold_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--gaps", default="0,1,2,5,20,100", help="idle ms before each measured round trip")
    p.add_argument("--n", type=int, default=60)
    args = p.parse_args(argv)
    gaps = [float(g) for g in args.gaps.split(",")]
    print(machine_line(), flush=True)
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        parent.close()
        echo(child)
    child.close()
    cold = {gap: [] for gap in gaps}
    warm = []
    try:
        for i in range(args.n + 5):
            for gap in gaps:  # interleaved: every gap sees the same drift of a shared machine
                time.sleep(gap / 1e3)
                first = round_trip(parent)
                again = round_trip(parent)
                if i >= 5:
                    cold[gap].append(first)
                    warm.append(again)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    warm_p50 = summary(warm)["p50"]
    rows = [[gap, summary(cold[gap])["p50"], summary(cold[gap])["p90"], summary(cold[gap])["p50"] / warm_p50]
            for gap in gaps]
    print(table(["idle before (ms)", "round trip p50 (us)", "p90 (us)", "x warm"], rows))
    print(f"warm (the same round trip repeated at once): p50 {warm_p50:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
