"""Fault injection: kill -9 of the daemon, the zygote or a worker at a random moment during a restore, an
invocation, a clone snapshot, an image build or a delete; after each round the invariants below must hold.

    PYTHONPATH=. .venv/bin/python -m bench.faults [--rounds 200] [--seed 1] [--mem-mib 64] [--max-seconds 600]

(The page servers run inside the daemon: killing the daemon kills them.) A bounded run is a test in `make test`
(tests/test_fault_injection.py); this command is the longer soak. Invariants, checked after every round:
- the daemon answers (restarted first if it was the victim), and every process of a killed daemon is gone;
- every listed image verifies chunk by chunk, and the image directory holds the files of listed images only;
- every snapshot published under STATE/snapshots loads (its state file with its own memory file), and no
  temporary file is left there;
- every clone listed is running and answers, or is failed with a reason; no VMM process runs that the daemon
  does not list, and none is left a zombie;
- the daemon's descriptors and threads stay bounded across rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from snapd.client import SnapdError
from snapd.daemon_process import DaemonProcess
from snapd.image.reader import BaseImage
from snapd.pool.worker_handle import proc_stat
from vmm import workloads
from vmm.snapshot import SnapshotError, open_memory_file, read_snapshot, snapshot_builtin_guest

OPERATIONS = ("restore", "invoke", "snapshot", "register", "delete_clone", "delete_image")
VICTIMS = ("daemon", "zygote", "worker", "none")
SETTLE_S = 10.0


def processes_of(state_dir: str) -> dict[int, str]:
    """pid -> command line of every process started for this state directory (the daemon, its zygote and the
    workers forked from it: the zygote's command line names the state directory's jail root)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state_dir in cmdline and ("snapd.cli serve" in cmdline or "snapd.pool.zygote" in cmdline):
            found[int(name)] = cmdline
    return found


def process_state(pid: int) -> str:
    """R, S, T, Z... as /proc/PID/stat says; "gone" once the process is."""
    fields = proc_stat(pid)
    return fields[0].decode() if fields else "gone"


def wait_gone(pids, timeout: float) -> list[int]:
    """The pids still running (a zombie counts as running: nobody reaped it) after ``timeout``. Those that are
    ours to reap are reaped: a killed daemon's workers come to us if this process is a subreaper (a test process
    that also ran a daemon in-process is one)."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        left = [pid for pid in pids if process_state(pid) != "gone"]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


class FaultRun:
    def __init__(self, work: str, seed: int, mem_mib: int):
        self.work = work
        self.rng = random.Random(seed)
        self.state_dir = os.path.join(work, "state")
        self.import_dir = os.path.join(work, "import")
        os.makedirs(self.import_dir, exist_ok=True)
        self.snapshot = snapshot_builtin_guest(self.import_dir, mem_mib, "workload=hello", "hello")
        self.daemon: DaemonProcess | None = None
        self.counts = {op: 0 for op in OPERATIONS} | {f"kill {v}": 0 for v in VICTIMS}
        self.violations: list[str] = []
        self.baseline: tuple[int, int] | None = None
        self.verbose = False
        self.rounds = 0
        self.start_daemon()

    # -- the daemon
    def start_daemon(self) -> None:
        self.daemon = DaemonProcess(self.state_dir, "--pool-size", "1", "--max-spawning", "2",
                                    import_roots=[self.import_dir])

    def daemon_alive(self) -> bool:
        return self.daemon is not None and self.daemon.process.poll() is None

    def zygote_pid(self) -> int | None:
        procs = os.path.join(self.state_dir, "run", "procs")
        for name in os.listdir(procs) if os.path.isdir(procs) else ():
            try:
                with open(os.path.join(procs, name)) as f:
                    record = json.load(f)
            except (OSError, ValueError):
                continue
            if record.get("role") == "zygote" and process_state(record["pid"]) not in ("gone", "Z"):
                return record["pid"]
        return None

    # -- one round
    def round(self) -> None:
        client = self.daemon.client
        try:
            images = [i["id"] for i in client.images()]
        except OSError as exc:
            self.violations.append(f"the daemon does not answer at a round's start ({exc}); its exit status: "
                                   f"{self.daemon.process.poll()}")
            self.daemon.stop()
            self.start_daemon()
            return
        if not images:
            images = [client.register_image(*self.snapshot)["id"]]
        clones = [c for c in client.clones() if c["state"] == "running"]
        op = OPERATIONS[self.rounds % len(OPERATIONS)]  # each in turn: a short run covers them all
        self.rounds += 1
        victim = self.rng.choice(VICTIMS)
        self.counts[op] += 1
        self.counts[f"kill {victim}"] += 1
        if self.verbose:
            print(f"round: {op}, kill {victim}", flush=True)
        before = set(processes_of(self.state_dir))
        worker = self.rng.choice(clones)["pid"] if clones else None
        target = {"daemon": self.daemon.process.pid, "zygote": self.zygote_pid(), "worker": worker}.get(victim)
        done = threading.Event()
        thread = threading.Thread(target=self._operate, args=(op, images, clones, done), daemon=True)
        thread.start()
        time.sleep(self.rng.uniform(0, 0.06))
        if target:
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
        thread.join(60)
        if thread.is_alive():
            self.violations.append(f"{op} with {victim} killed: the request did not end within 60 s")
        if victim == "daemon":
            try:
                self.daemon.process.wait(SETTLE_S)  # we are its parent: reap it
            except subprocess.TimeoutExpired:
                self.violations.append("the daemon outlived SIGKILL")
        if not self.daemon_alive():
            self.daemon.client.close()
            self.daemon.process.wait()
            left = wait_gone(before, SETTLE_S)
            if left:
                self.violations.append(f"processes of the killed daemon still there: {left}")
            self.start_daemon()
        elif target:
            left = wait_gone([target], SETTLE_S)
            if left:
                self.violations.append(f"killed {victim} {target} not reaped ({process_state(target)})")
        self.check()

    def _operate(self, op: str, images: list[str], clones: list[dict], done: threading.Event) -> None:
        client = self.daemon.client.__class__(self.daemon.socket_path, timeout=60)
        try:
            if op == "restore":
                request = workloads.hello_request("fault")
                for clone in client.create_clones(self.rng.choice(images), count=self.rng.randint(1, 3),
                                                  payload=request):
                    workloads.verify_hello(request, clone["result"], 1)
            elif op == "invoke" and clones:
                request = workloads.hello_request("again")
                client.invoke(self.rng.choice(clones)["id"], request)
            elif op == "snapshot" and clones:
                client.snapshot_clone(self.rng.choice(clones)["id"])
            elif op == "register":
                client.register_image(*self.snapshot)
            elif op == "delete_clone" and clones:
                client.delete_clone(self.rng.choice(clones)["id"])
            elif op == "delete_image" and len(images) > 1:
                image = self.rng.choice(images)
                for clone in client.clones():
                    if clone["image"] == image:
                        client.delete_clone(clone["id"])
                client.delete_image(image)
        except (SnapdError, OSError, ValueError):
            pass  # a request cut by the kill: what counts is the state it leaves
        finally:
            client.close()
            done.set()

    def pool_workers(self) -> int:
        """The warm workers the daemon counts (idle and prepared), from its metrics."""
        text = self.daemon.client.request("GET", "/metrics").body.decode()
        return sum(int(float(line.split()[-1])) for line in text.splitlines()
                   if line.startswith(("snapd_pool_idle_workers", "snapd_pool_prepared_workers")))

    # -- the invariants
    def check(self) -> None:
        client = self.daemon.client
        try:
            images = client.images()
            clones = client.clones()
        except (SnapdError, OSError) as exc:
            self.violations.append(f"the daemon does not answer: {exc}")
            return
        listed = {i["id"] for i in images}
        image_dir = os.path.join(self.state_dir, "images")
        for name in os.listdir(image_dir):
            if name.split(".", 1)[0] not in listed:
                self.violations.append(f"images/{name} belongs to no listed image")
        for image in listed:
            try:
                BaseImage.open(os.path.join(image_dir, f"{image}.img")).verify()
            except Exception as exc:  # noqa: BLE001 (any failure is the finding)
                self.violations.append(f"image {image} does not verify: {exc}")
        snapshots = os.path.join(self.state_dir, "snapshots")
        for name in sorted(os.listdir(snapshots)):
            path = os.path.join(snapshots, name)
            if ".tmp" in name:
                self.violations.append(f"temporary file left: snapshots/{name}")
            elif name.endswith(".state"):
                try:
                    os.close(open_memory_file(path[:-len(".state")] + ".mem", read_snapshot(path)))  # as load does
                except (SnapshotError, OSError) as exc:
                    self.violations.append(f"published snapshot {name} does not load: {exc}")
        live = set()
        for clone in clones:
            if clone["state"] == "running":
                live.add(clone["pid"])
                try:
                    request = workloads.hello_request("check")
                    client.invoke(clone["id"], request)
                except SnapdError as exc:
                    if exc.status not in (502, 504):  # its worker was the victim: failed, as it must be
                        self.violations.append(f"clone {clone['id']} is running but does not answer: {exc}")
            elif not clone["error"]:
                self.violations.append(f"clone {clone['id']} failed without a reason")
        daemon_pid = self.daemon.process.pid
        deadline = time.monotonic() + SETTLE_S
        while True:  # workers past the pool's target are being retired, killed ones reaped: give them time
            procs = processes_of(self.state_dir)
            pool = self.pool_workers()
            stray = {pid for pid in procs if pid != daemon_pid and pid != self.zygote_pid()} - live
            zombies = [pid for pid in procs if process_state(pid) == "Z"]
            if (len(stray) <= pool and not zombies) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if len(stray) > pool:
            self.violations.append(f"{len(stray)} VMM processes beside the clones, the pool holding {pool}")
        if zombies:
            self.violations.append(f"zombies left: {zombies}")
        fds = len(os.listdir(f"/proc/{daemon_pid}/fd"))
        threads = len(os.listdir(f"/proc/{daemon_pid}/task"))
        if self.baseline is None or self.baseline[0] != daemon_pid:
            self.baseline = (daemon_pid, fds, threads)
        elif fds > self.baseline[1] + 16 + 4 * len(live) or threads > self.baseline[2] + 16:
            self.violations.append(f"daemon grew: {fds} fds, {threads} threads (from {self.baseline[1:]})")

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()


def run(work: str, rounds: int, seed: int, mem_mib: int = 64, max_seconds: float = 600.0,
        verbose: bool = False) -> FaultRun:
    run = FaultRun(work, seed, mem_mib)
    run.verbose = verbose
    deadline = time.monotonic() + max_seconds
    try:
        for _ in range(rounds):
            if time.monotonic() > deadline:
                break
            run.round()
    finally:
        run.close()
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--mem-mib", type=int, default=64)
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--verbose", action="store_true", help="print each round's operation and victim")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-faults-")
    try:
        t0 = time.monotonic()
        result = run(work, args.rounds, args.seed, args.mem_mib, args.max_seconds, args.verbose)
        print(f"{sum(result.counts[o] for o in OPERATIONS)} rounds in {time.monotonic() - t0:.0f} s, seed "
              f"{args.seed}: " + ", ".join(f"{k} {v}" for k, v in result.counts.items()))
        for violation in result.violations:
            print("VIOLATION:", violation)
        print(f"{len(result.violations)} violations")
        return 1 if result.violations else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
