"""Other clones' latency beside hostile ones (issue #12): restore and invoke of a hello guest, timed on the wire,
with a quiet host and with 1-2 hostile clones running (spinning at CPL 3, or flooding the UART), interleaved.

    PYTHONPATH=. .venv/bin/python -m bench.hostile [--rounds 6] [--n 20] [--gap-ms 20] [--mem-mib 256]
                                                    [--conditions quiet,spin1,spin2,flood1,flood2]
    (--conditions may add floodrep1, and the what-if spin2-idle, flood2-idle: see CONDITIONS)

One `snapd serve` (jailed workers, the restore lane on) serves two images of the same shape: the built-in hello
guest and the hostile test guest (tests/guests/hostile.c). A hostile clone is made without a payload, then sent
`spin` or `flood` with a 20 ms timeout: it answers 504 and goes on spinning (or writing to COM1) on its vCPU
thread, at whatever CPU its cgroup gives it. Each round runs every condition once, in an order rotated from round
to round; a condition's block is: its hostile clones started, the pool refilled, then --n pairs of samples after
--gap-ms of idle each: POST /v1/clones with a hello payload (restore + first invocation, verified, deleted after
the clock stops) and POST /v1/clones/ID/invoke on one live hello clone (verified); then its hostile clones are
deleted. Ratios are against the quiet condition of the same run. The hostile clones' CPU use during their
blocks is reported beside them (their worker processes' user + system time over wall time).
"""
from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time

from bench.clones import WireClient, make_hello_snapshot, wire_clone
from bench.common import machine_line, summary, table
from snapd.daemon_process import DaemonProcess, wait_pool
from tests.guests import hostile_guest
from vmm import workloads

CONDITIONS = {"quiet": (None, 0), "spin1": ("spin", 1), "spin2": ("spin", 2), "flood1": ("flood", 1),
              "flood2": ("flood", 2), "floodrep1": ("flood-rep", 1),
              # What if: the same, then every thread of the hostile clones' workers put in SCHED_IDLE by this
              # process (root), as a daemon could do to a clone whose invocation timed out. Not something snapd
              # does: a measurement of what it would buy.
              "spin2-idle": ("spin", 2), "flood2-idle": ("flood", 2)}


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def demote(pid: int) -> None:
    """Every thread of process ``pid`` into SCHED_IDLE (the what-if conditions)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))


def start_hostile(client, image: str, request: str, count: int) -> list[dict]:
    """``count`` hostile clones, each sent ``request`` with a 20 ms timeout (504): misbehaving from then on."""
    clones = []
    for _ in range(count):
        clone = client.create_clones(image)[0]
        body = {"payload": base64.b64encode(request.encode()).decode(), "timeout_ms": 20}
        reply = client.request("POST", f"/v1/clones/{clone['id']}/invoke", body)
        if reply.status != 504:
            raise RuntimeError(f"hostile {request!r} answered {reply.status}: {reply.json()}")
        clones.append(clone)
    return clones


def run(args, work: str) -> None:
    hello_state, hello_mem = make_hello_snapshot(work, args.mem_mib)
    hostile_state, hostile_mem = hostile_guest.snapshot(work, "hostile", mem_mib=args.mem_mib)
    conditions = args.conditions.split(",")
    samples = {c: {"restore": [], "invoke": [], "cpu": []} for c in conditions}
    with DaemonProcess(os.path.join(work, "state"), "--pool-size", str(args.pool_size),
                       prepared=args.pool_size, import_roots=[work]) as daemon:
        client = daemon.client
        hello_image = client.register_image(hello_state, hello_mem)["id"]
        hostile_image = client.register_image(hostile_state, hostile_mem)["id"]
        wait_pool(client, args.pool_size, prepared=2 * args.pool_size)
        live = client.create_clones(hello_image, payload=b"live 0")[0]
        count = 1
        wire = WireClient(daemon.socket_path)
        for round_ in range(args.rounds):
            k = round_ % len(conditions)
            for condition in conditions[k:] + conditions[:k]:
                request, how_many = CONDITIONS[condition]
                hostile = start_hostile(client, hostile_image, request, how_many) if request else []
                if condition.endswith("-idle"):
                    for clone in hostile:
                        demote(clone["pid"])
                wait_pool(client, args.pool_size, prepared=2 * args.pool_size)
                time.sleep(0.1)
                cpu0, t0 = sum(cpu_seconds(c["pid"]) for c in hostile), time.monotonic()
                for i in range(args.n + (args.warmup if round_ == 0 else 0)):
                    restore_ms, _ = wire_clone(wire, client, hello_image, f"{condition} {round_} {i}", args.gap_ms)
                    payload = workloads.hello_request(f"invoke {condition} {round_} {i}")
                    body = {"payload": base64.b64encode(payload).decode()}
                    invoke_ms, answer = wire.post(f"/v1/clones/{live['id']}/invoke", body, 200, args.gap_ms)
                    count += 1
                    workloads.verify_hello(payload, base64.b64decode(answer["result"]), count)
                    if round_ or i >= args.warmup:
                        samples[condition]["restore"].append(restore_ms)
                        samples[condition]["invoke"].append(invoke_ms)
                if hostile:
                    busy = sum(cpu_seconds(c["pid"]) for c in hostile) - cpu0
                    samples[condition]["cpu"].append(busy / (time.monotonic() - t0))
                    for clone in hostile:
                        client.delete_clone(clone["id"])
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        wire.close()
        client.delete_clone(live["id"])
    rows = []
    quiet = {what: summary(samples["quiet"][what]) for what in ("restore", "invoke")} if "quiet" in samples else None
    for condition in conditions:
        row = [condition]
        for what in ("restore", "invoke"):
            s = summary(samples[condition][what])
            row += [s["p50"], s["p90"], s["p99"], s["mean"]]
            if quiet:
                row += [s["p50"] / quiet[what]["p50"], s["mean"] / quiet[what]["mean"]]
        cpu = samples[condition]["cpu"]
        row.append(f"{100 * sum(cpu) / len(cpu):.0f}%" if cpu else "-")
        rows.append(row)
    headers = ["condition", "restore p50 (ms)", "p90", "p99", "mean"] + (["p50 / quiet", "mean / quiet"] if quiet else [])
    headers += ["invoke p50 (ms)", "p90", "p99", "mean"] + (["p50 / quiet", "mean / quiet"] if quiet else [])
    headers.append("hostile clones' CPU")
    print(table(headers, rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n\n")[0])
    p.add_argument("--mem-mib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--n", type=int, default=20, help="sample pairs per condition per round")
    p.add_argument("--warmup", type=int, default=5, help="extra pairs of the first round, not counted")
    p.add_argument("--gap-ms", type=float, default=20.0, help="idle before each request")
    p.add_argument("--pool-size", type=int, default=2)
    p.add_argument("--conditions", default="quiet,spin1,spin2,flood1,flood2")
    args = p.parse_args(argv)
    unknown = set(args.conditions.split(",")) - set(CONDITIONS)
    if unknown:
        p.error(f"unknown conditions {sorted(unknown)}; known: {', '.join(CONDITIONS)}")
    hostile_guest.build()
    print(machine_line(), f"guest {args.mem_mib} MiB", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as work:
        run(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
