"""Clones from the snapd daemon: end-to-end restore latency, memory per clone, sustained restore rate.

    PYTHONPATH=. .venv/bin/python -m bench.clones latency [--mem-mib 512] [--n 200] [--prepared N]
    PYTHONPATH=. .venv/bin/python -m bench.clones latency-ab [--n 100]   (no prepared workers vs prepared, alternating)
    PYTHONPATH=. .venv/bin/python -m bench.clones latency-ab --ab lane   (the restore lane off vs on, alternating)
    PYTHONPATH=. .venv/bin/python -m bench.clones latency-ab --ab jail [--prepared 0]   (--jail off vs on)
    PYTHONPATH=. .venv/bin/python -m bench.clones rate-ab [--rounds 3]    (rate, --jail off and on in turns)
    PYTHONPATH=. .venv/bin/python -m bench.clones worker-ready [--n 20 --rounds 2]  (zygote fork to a ready worker)
    PYTHONPATH=. .venv/bin/python -m bench.clones latency-gaps [--gaps 1,2,5,20,100]   (on the wire, by idle time)
    PYTHONPATH=. .venv/bin/python -m bench.clones invoke-gaps [--gaps 1,2,5,20,100]    (a live clone's invocations)
    PYTHONPATH=. .venv/bin/python -m bench.clones memory  [--mem-mib 256] [--counts 1,10,100,1000]
    PYTHONPATH=. .venv/bin/python -m bench.clones rate    [--mem-mib 512] [--seconds 10] [--clients 4]
    (SNAPD_REUSE=0 in the environment: deleted clones' workers exit instead of being reused;
     --jail off: every daemon's workers unjailed, a development switch, for comparison)

The daemon runs as `snapd serve` in its own process (as a scheduler would see it); this process is the client.
Latency is one API request, POST /v1/clones with a hello payload, to the guest's first hello reply (verified),
with a warm pool: requests are paced (--gap-ms) so the pool refills between them.
"""
from __future__ import annotations

import argparse
import contextlib
import base64
import json
import os
import socket
import sys
import tempfile
import threading
import time

from bench.common import machine_line, summary, table
from snapd.daemon_process import DaemonProcess, wait_pool
from vmm import workloads
from vmm.snapshot import snapshot_builtin_guest


def make_hello_snapshot(directory: str, mem_mib: int, vcpus: int = 1) -> tuple[str, str]:
    """Boot the built-in hello guest, wait for its init phase, snapshot it; returns (state, memory) paths."""
    return snapshot_builtin_guest(directory, mem_mib, "workload=hello", "hello", vcpus)


def timed_clone(client, image: str, i: int) -> tuple[float, dict]:
    """One POST /v1/clones with a hello payload: ms to the verified first reply, and the clone's record.
    The clone is deleted after the clock stops."""
    request = workloads.hello_request(f"bench {i}")
    t0 = time.perf_counter()
    clone = client.create_clones(image, payload=request)[0]
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    workloads.verify_hello(request, clone["result"], 1)
    client.delete_clone(clone["id"])
    return elapsed_ms, clone


@contextlib.contextmanager
def hello_daemon(args, work: str):
    """A `snapd serve` with a hello snapshot of --mem-mib registered and its pool (prepared workers) ready:
    yields (daemon, image id)."""
    state, mem = make_hello_snapshot(work, args.mem_mib)
    prepared = args.pool_size if args.prepared is None else args.prepared
    with DaemonProcess(os.path.join(work, "state"), "--pool-size", str(args.pool_size), "--jail", args.jail,
                       prepared=prepared, import_roots=[work]) as daemon:
        image = daemon.client.register_image(state, mem)["id"]
        wait_pool(daemon.client, args.pool_size, prepared=prepared)
        yield daemon, image


def run_latency(args, work: str) -> dict:
    rows, steps = [], {}
    with hello_daemon(args, work) as (daemon, image):
        client = daemon.client
        e2e, two_step, server, prepared_hits, reused = [], [], [], 0, 0
        for i in range(args.n + args.warmup):
            elapsed_ms, clone = timed_clone(client, image, i)
            if i >= args.warmup:
                e2e.append(elapsed_ms)
                prepared_hits += "prepare_us" in clone["timings_us"]
                server.append(clone["restore_us"] / 1e3)
                reused += clone["timings_us"].get("reuses", 0) > 0
                for key, value in clone["timings_us"].items():
                    if key != "reuses":  # a count, not a time
                        steps.setdefault(key, []).append(value / 1e3)
                steps.setdefault("first_invoke_us", []).append(clone["invoke_latency_us"] / 1e3)
            time.sleep(args.gap_ms / 1e3)
            # The same, as two requests: restore, then the first invocation.
            request = workloads.hello_request(f"bench {i}")
            t0 = time.perf_counter()
            clone = client.create_clones(image)[0]
            reply = client.invoke(clone["id"], request)
            t1 = time.perf_counter()
            workloads.verify_hello(request, reply, 1)
            client.delete_clone(clone["id"])
            if i >= args.warmup:
                two_step.append((t1 - t0) * 1e3)
            time.sleep(args.gap_ms / 1e3)
    for name, samples in [("e2e one request (ms)", e2e), ("e2e restore + invoke requests (ms)", two_step),
                          ("daemon: request to reply (ms)", server)] + [(f"worker {k} (ms)", v) for k, v in steps.items()]:
        s = summary(samples)
        rows.append([name, s["p50"], s["p90"], s["p99"], s["mean"], s["min"]])
    print(table(["what", "p50", "p90", "p99", "mean", "min"], rows))
    print(f"one-request restores served by a prepared worker: {prepared_hits}/{len(e2e)}, "
          f"by a reused (recycled) one: {reused}/{len(e2e)}")
    return {"e2e": summary(e2e), "two_step": summary(two_step)}


def run_latency_ab(args, work: str) -> None:
    """Two daemons side by side, requests alternating between them, each timed on the wire after --gap-ms of
    idle: a ratio from one run on a shared, noisy machine. --ab prepared: A without prepared workers, B with; --ab lane: both with, A with the restore lane
    off (every request the Python way), B with it on."""
    state, mem = make_hello_snapshot(work, args.mem_mib)
    prepared = args.pool_size if args.prepared is None else args.prepared
    if args.ab == "lane":
        options = {"A": ("--lane", "off"), "B": ("--lane", "on")}
        labels = {"A": "lane off", "B": "lane on"}
        prepared_of = {"A": prepared, "B": prepared}
    elif args.ab == "cpu-cgroups":
        options = {"A": ("--clone-cpu-cgroups", "off"), "B": ("--clone-cpu-cgroups", "on")}
        labels = {"A": "one cpu group", "B": "a cpu group per clone"}
        prepared_of = {"A": prepared, "B": prepared}
    elif args.ab == "jail":
        options = {"A": ("--jail", "off"), "B": ("--jail", "on")}
        labels = {"A": "jail off", "B": "jail on"}
        prepared_of = {"A": prepared, "B": prepared}
    else:
        options = {"A": (), "B": ()}
        labels = {"A": "no prepared workers", "B": f"{prepared} prepared workers"}
        prepared_of = {"A": 0, "B": prepared}
    samples = {"A": [], "B": []}
    with DaemonProcess(os.path.join(work, "a"), "--pool-size", str(args.pool_size), *options["A"],
                       prepared=prepared_of["A"], import_roots=[work]) as a, \
            DaemonProcess(os.path.join(work, "b"), "--pool-size", str(args.pool_size), *options["B"],
                          prepared=prepared_of["B"], import_roots=[work]) as b:
        daemons = {"A": (a, a.client.register_image(state, mem)["id"]),
                   "B": (b, b.client.register_image(state, mem)["id"])}
        wait_pool(a.client, args.pool_size, prepared=prepared_of["A"])
        wait_pool(b.client, args.pool_size, prepared=prepared_of["B"])
        wires = {name: WireClient(d.socket_path) for name, (d, _) in daemons.items()}
        for i in range(args.n + args.warmup):
            for name in ("A", "B") if i % 2 else ("B", "A"):
                daemon, image = daemons[name]
                elapsed_ms, clone = wire_clone(wires[name], daemon.client, image, f"bench {i}", args.gap_ms)
                if i >= args.warmup:
                    samples[name].append((elapsed_ms, clone["restore_us"] / 1e3))
        for wire in wires.values():
            wire.close()
    rows = []
    for name, label in labels.items():
        for k, what in ((0, "on the wire"), (1, "daemon: request to reply")):
            s = summary([x[k] for x in samples[name]])
            rows.append([f"{label}: {what} (ms)", s["p50"], s["p90"], s["p99"], s["mean"], s["min"]])
    for k, what in ((0, "on the wire"), (1, "daemon")):
        sa, sb = summary([x[k] for x in samples["A"]]), summary([x[k] for x in samples["B"]])
        rows.append([f"ratio B/A {what}", sb["p50"] / sa["p50"], sb["p90"] / sa["p90"], sb["p99"] / sa["p99"],
                     sb["mean"] / sa["mean"], sb["min"] / sa["min"]])
    print(table(["what", "p50", "p90", "p99", "mean", "min"], rows))


class WireClient:
    """One raw connection to the daemon, timed on the wire: the clock runs from a request's first byte sent to
    its reply's last byte received; encoding the request and decoding the reply stay outside it."""

    def __init__(self, socket_path: str):
        from snapd import http_wire
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(120)  # a hung daemon fails the run instead of hanging it
        self.sock.connect(socket_path)
        self.stream = http_wire.Stream(self.sock)

    def post(self, path: str, body: dict, expect: int, idle_ms: float) -> tuple[float, dict]:
        """POST ``body`` after ``idle_ms`` of idle: (ms on the wire, the decoded reply)."""
        from snapd import http_wire
        from snapd.client import JSON_HEADERS
        message = http_wire.request("POST", path, json.dumps(body).encode(), JSON_HEADERS)
        time.sleep(idle_ms / 1e3)
        t0 = time.perf_counter()
        self.sock.sendall(message)
        status, _, reply, _ = self.stream.read_response("POST")
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        if status != expect:
            raise RuntimeError(f"POST {path} -> {status}: {reply[:200]!r}")
        return elapsed_ms, json.loads(reply)

    def close(self) -> None:
        self.sock.close()


def wire_clone(wire: WireClient, client, image: str, label: str, idle_ms: float) -> tuple[float, dict]:
    """POST /v1/clones with a hello payload after ``idle_ms`` of idle, timed on the wire (kept-alive connection);
    the reply verified and the clone deleted after the clock stops."""
    request = workloads.hello_request(label)
    body = {"image": image, "payload": base64.b64encode(request).decode()}
    elapsed_ms, reply = wire.post("/v1/clones", body, 201, idle_ms)
    clone = reply["clones"][0]
    workloads.verify_hello(request, base64.b64decode(clone["result"]), 1)
    client.delete_clone(clone["id"])
    return elapsed_ms, clone


def run_latency_gaps(args, work: str) -> None:
    """End-to-end latency by the idle time before each request, gaps interleaved in one run. On these nested
    hosts a CPU that idles for milliseconds comes back cold (docs/benchmarks.md, "Cold CPUs"): an isolated
    request pays for it, requests arriving every few ms (the sustained-rate goal's regime) do not. Measured on
    the wire: the clock runs from the request's first byte sent to its reply's last byte received, the request
    encoded and the reply decoded and verified outside it (the Python client's own costs are not the daemon's)."""
    gaps = [float(g) for g in args.gaps.split(",")]
    samples = {gap: {"wire": [], "daemon": [], "first_invoke": []} for gap in gaps}
    with hello_daemon(args, work) as (daemon, image):
        client = daemon.client
        wire = WireClient(daemon.socket_path)
        for i in range(args.n + args.warmup):
            for gap in gaps:
                elapsed_ms, clone = wire_clone(wire, client, image, f"gap {gap} {i}", gap)
                if i >= args.warmup:
                    samples[gap]["wire"].append(elapsed_ms)
                    samples[gap]["daemon"].append(clone["restore_us"] / 1e3)
                    samples[gap]["first_invoke"].append(clone["invoke_latency_us"] / 1e3)
        wire.close()
    rows = []
    for gap in gaps:
        wire, dmn, inv = (summary(samples[gap][k]) for k in ("wire", "daemon", "first_invoke"))
        rows.append([gap, wire["p50"], wire["p90"], wire["p99"], dmn["p50"], inv["p50"]])
    print(table(["idle before request (ms)", "e2e p50 (ms)", "e2e p90", "e2e p99", "daemon p50",
                 "first invocation p50"], rows))


def run_invoke_gaps(args, work: str) -> None:
    """POST /v1/clones/{id}/invoke on one live clone, by the idle time before each request, gaps interleaved in
    one run; timed on the wire as latency-gaps is. The worker's own time (its invocation, from the request's
    arrival in the worker to the guest's reply) is reported beside it."""
    gaps = [float(g) for g in args.gaps.split(",")]
    samples = {gap: {"wire": [], "worker": []} for gap in gaps}
    with hello_daemon(args, work) as (daemon, image):
        (clone,) = daemon.client.create_clones(image, payload=workloads.hello_request("first"))
        wire = WireClient(daemon.socket_path)
        count = 1
        for i in range(args.n + args.warmup):
            for gap in gaps:
                request = workloads.hello_request(f"invoke {gap} {i}")
                body = {"payload": base64.b64encode(request).decode()}
                elapsed_ms, answer = wire.post(f"/v1/clones/{clone['id']}/invoke", body, 200, gap)
                count += 1
                workloads.verify_hello(request, base64.b64decode(answer["result"]), count)
                if i >= args.warmup:
                    samples[gap]["wire"].append(elapsed_ms)
                    samples[gap]["worker"].append(answer["latency_us"] / 1e3)
        wire.close()
        daemon.client.delete_clone(clone["id"])
    rows = []
    for gap in gaps:
        wire, worker = summary(samples[gap]["wire"]), summary(samples[gap]["worker"])
        rows.append([gap, wire["p50"], wire["p90"], wire["p99"], worker["p50"]])
    print(table(["idle before request (ms)", "invoke e2e p50 (ms)", "e2e p90", "e2e p99", "worker invocation p50"],
                rows))


def worker_rollups(client) -> list[dict]:
    from snapd.daemon.metrics import smaps_rollup
    return [smaps_rollup(c["pid"]) for c in client.clones()]


def run_memory(args, work: str) -> None:
    state, mem = make_hello_snapshot(work, args.mem_mib)
    counts = [int(c) for c in args.counts.split(",")]
    rows = []
    with DaemonProcess(os.path.join(work, "state"), "--pool-size", str(args.pool_size), "--max-spawning", "2",
                       "--max-clones", str(max(counts)), "--max-count", "64", "--jail", args.jail,
                       prepared=args.prepared,
                       import_roots=[work]) as daemon:
        client = daemon.client
        image = client.register_image(state, mem)["id"]
        live = 0
        for target in counts:
            try:
                while live < target:
                    batch = min(64, target - live)
                    for clone in client.create_clones(image, count=batch, payload=b"memory"):
                        workloads.verify_hello(b"memory", clone["result"], 1)
                    live += batch
            except Exception as exc:  # out of memory or limits: report how far it got, then stop
                print(f"stopped at {live} clones: {exc}", file=sys.stderr)
                target = -1
            time.sleep(1.0)
            rollups = worker_rollups(client)
            n = len(rollups)
            if not n:
                break
            pss = sum(r.get("Pss", 0) for r in rollups) / n / 2**20
            private = sum(r.get("Private_Dirty", 0) + r.get("Private_Clean", 0) for r in rollups) / n / 2**20
            anon = sum(r.get("Anonymous", 0) for r in rollups) / n / 2**20
            shmem = sum(r.get("Pss_Shmem", 0) for r in rollups) / n / 2**20
            shared = client.image(image)["shared_bytes"] / 2**20
            rows.append([n, pss, private, anon, shmem, shared])
            print(table(["clones", "PSS MiB/clone", "private MiB/clone", "anon MiB/clone", "PSS shmem MiB/clone",
                         "shared memfd MiB"], rows[-1:]), flush=True)
            if n < target or target < 0:
                break
    print(table(["clones", "PSS MiB/clone", "private MiB/clone", "anon MiB/clone", "PSS shmem MiB/clone",
                 "shared memfd MiB"], rows))


def run_rate(args, work: str) -> float:
    state, mem = make_hello_snapshot(work, args.mem_mib)
    prepared = args.pool_size if args.prepared is None else args.prepared
    with DaemonProcess(os.path.join(work, "state"), "--pool-size", str(args.pool_size), "--jail", args.jail,
                       "--max-spawning", str(args.max_spawning), prepared=prepared, import_roots=[work]) as daemon:
        image = daemon.client.register_image(state, mem)["id"]
        wait_pool(daemon.client, args.pool_size, prepared=prepared)
        from snapd.client import SnapdClient
        done, errors = [0] * args.clients, []
        stop = time.monotonic() + args.seconds

        def client_loop(index: int) -> None:
            with SnapdClient(daemon.socket_path) as client:
                while time.monotonic() < stop:
                    try:
                        clone = client.create_clones(image, payload=b"rate")[0]
                        client.delete_clone(clone["id"])
                        done[index] += 1
                    except Exception as exc:
                        errors.append(str(exc))
        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
    total = sum(done)
    print(table(["clients", "seconds", "clones", "clones/s", "errors"],
                [[args.clients, round(elapsed, 2), total, total / elapsed, len(errors)]]))
    if errors:
        print("first error:", errors[0])
    return total / elapsed


def run_rate_ab(args, work: str) -> None:
    """The sustained rate with --jail off and on, in turns (--rounds each), one daemon at a time: a ratio from
    one run on a shared, noisy machine."""
    rates = {"off": [], "on": []}
    for r in range(args.rounds):
        for jail in ("off", "on") if r % 2 == 0 else ("on", "off"):
            args.jail = jail
            print(f"round {r + 1}, --jail {jail}:", flush=True)
            directory = os.path.join(work, f"{jail}-{r}")
            os.makedirs(directory)
            rates[jail].append(run_rate(args, directory))
    off, on = (sorted(rates[k])[len(rates[k]) // 2] for k in ("off", "on"))
    print(table(["--jail", "clones/s per round", "median"],
                [["off", " ".join(f"{x:.0f}" for x in rates["off"]), off],
                 ["on", " ".join(f"{x:.0f}" for x in rates["on"]), on], ["ratio on/off", "", on / off]]))


def run_worker_ready(args, work: str) -> None:
    """How long a warm worker takes from the zygote's fork to its hello (its VM shell built), --jail off and on in
    turns: the pool's refill speed, which on-demand restores without worker reuse depend on."""
    from snapd.pool import protocol
    from snapd.pool.jail import WorkerJail
    from snapd.pool.zygote_handle import Zygote
    from snapd.pool.worker_handle import readable
    from vmm.prebuilt import VmShape
    samples = {"off": [], "on": []}
    for r in range(args.rounds):
        for jail_mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            jail = WorkerJail("off" if jail_mode == "off" else "root", os.path.join(work, f"{jail_mode}-{r}"))
            zygote = Zygote(jail)
            try:
                for _ in range(args.n):
                    t0 = time.perf_counter()
                    worker = zygote.fork_worker(VmShape(1, args.mem_mib))
                    if not readable(worker.channel, 60):
                        raise RuntimeError("no worker within 60 s")
                    hello, _, _ = protocol.recv(worker.channel)
                    samples[jail_mode].append((time.perf_counter() - t0) * 1e3)
                    worker.pid = hello["pid"]
                    if worker.lease is not None:
                        jail.watch(worker.lease, worker.pid, lambda reason: None)
                    worker.stop()
                    time.sleep(args.gap_ms / 1e3)
            finally:
                zygote.close()
                jail.close()
    off, on = summary(samples["off"]), summary(samples["on"])
    print(table(["--jail", "fork to ready p50 (ms)", "p90", "p99"],
                [["off", off["p50"], off["p90"], off["p99"]], ["on", on["p50"], on["p90"], on["p99"]],
                 ["ratio on/off", on["p50"] / off["p50"], on["p90"] / off["p90"], on["p99"] / off["p99"]]]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.clones", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("latency", "latency-ab", "latency-gaps", "invoke-gaps", "memory", "rate",
                                     "rate-ab", "worker-ready"))
    p.add_argument("--mem-mib", type=int, default=None)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--gap-ms", type=float, default=20.0)
    p.add_argument("--gaps", default="1,2,5,20,100", help="latency-gaps, invoke-gaps: idle ms before each request")
    p.add_argument("--pool-size", type=int, default=4)
    p.add_argument("--max-spawning", type=int, default=2)
    p.add_argument("--counts", default="1,10,100,1000")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--ab", choices=("prepared", "lane", "jail", "cpu-cgroups"), default="prepared",
                   help="latency-ab: what the two daemons differ in (prepared workers, the restore lane, jailing)")
    p.add_argument("--jail", choices=("on", "off"), default="on", help="the daemon's --jail (default on)")
    p.add_argument("--rounds", type=int, default=3, help="rate-ab: rounds of each setting")
    p.add_argument("--prepared", type=int, default=None,
                   help="workers the daemon restores ahead per image (SNAPD_PREPARED; default: --pool-size; 0: off)")
    args = p.parse_args(argv)
    if args.mem_mib is None:
        args.mem_mib = 256 if args.what == "memory" else 512
    print(machine_line(), f"guest {args.mem_mib} MiB", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-clones-") as work:
        {"latency": run_latency, "latency-ab": run_latency_ab, "latency-gaps": run_latency_gaps,
         "invoke-gaps": run_invoke_gaps, "memory": run_memory, "rate": run_rate,
         "rate-ab": run_rate_ab, "worker-ready": run_worker_ready}[args.what](args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
