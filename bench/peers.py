"""Our VMM and QEMU (microvm machine) side by side: same guest image, same workloads, interleaved run by run.

- cold boot, new process -> first verified reply: ours `vmm run --invoke 1`; QEMU `-M microvm` entering the same
  guest.elf at its PVH note, self-driven with `invoke=1` (no function port), until `vmguest: reply 1 ...`
- snapshot save of a running `progress` guest: ours pause + create_snapshot (in process, as bench.snapshot);
  QEMU QMP `stop` + `migrate "exec:cat > FILE"` until the MIGRATION event says completed
- restore -> the guest's next output line: ours `PUT /snapshot/load` (File backend) on a `vmm --api-sock`
  process; QEMU `migrate-incoming "exec:cat FILE"` on a `-incoming defer` process, then `cont`. Both timed
  once from the request on an already started process, and once from the process start.
Run: python -m bench.peers [--runs N] [--sizes 128,512] [--install]
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from bench.common import machine_line, summary, table
from vmm.api.client import ApiClient
from vmm.config import MachineConfig, builtin_guest_image
from vmm.machine import Microvm
from vmm.snapshot import create_snapshot
from vmm.workloads import expected_self_driven_replies, parse_self_driven_output, progress_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QEMU = "qemu-system-x86_64"
KV_MIB = 16
BOOT_MEM_MIB = 128
PROGRESS_SHIFT = 12  # a progress line every 4096 steps: the guest prints nearly all the time
SEED = 1
TIMEOUT = 30.0
SETTLE_S = 0.2  # a started process is left this long before a restore request, as a pool would leave it


# ------------------------------------------------------------------------------------------------ helpers

def find_qemu(install: bool) -> str | None:
    path = shutil.which(QEMU)
    if path is None and install:
        subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "qemu-system-x86"], check=True, stdout=subprocess.DEVNULL)
        path = shutil.which(QEMU)
    return path


def qemu_version(binary: str) -> str:
    return subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def qemu_command(binary: str, mem_mib: int, append: str, *extra: str) -> list[str]:
    return [binary, "-M", "microvm", "-enable-kvm", "-cpu", "qemu64", "-m", str(mem_mib), "-nodefaults",
            "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot", "-kernel", builtin_guest_image(),
            "-append", append, *extra]


def progress_args(shift: int = PROGRESS_SHIFT) -> str:
    return f"workload=progress seed={SEED} progress_shift={shift}"


class Output:
    """Collects a child's pipe (or a VMM's serial sink) in a thread, with the arrival time of every chunk."""

    def __init__(self, pipe=None):
        self.data = bytearray()
        self.arrivals = []  # (perf_counter, len(data) after the chunk)
        self.cond = threading.Condition()
        if pipe is not None:
            threading.Thread(target=self._read, args=(pipe.fileno(),), daemon=True).start()

    def _read(self, fd: int) -> None:
        while chunk := os.read(fd, 65536):
            self.feed(chunk)

    def feed(self, chunk: bytes) -> None:
        now = time.perf_counter()
        with self.cond:
            self.data += chunk
            self.arrivals.append((now, len(self.data)))
            self.cond.notify_all()

    def wait(self, found, timeout: float = TIMEOUT) -> tuple[float, int]:
        """Waits until ``found(data)`` returns an index; returns (arrival time of that byte, index)."""
        with self.cond:
            if not self.cond.wait_for(lambda: found(self.data) is not None, timeout):
                raise TimeoutError(f"output not seen within {timeout} s; got {bytes(self.data[-300:])!r}")
            index = found(self.data)
            return next(t for t, end in self.arrivals if end > index), index

    def text(self) -> str:
        with self.cond:
            return self.data.decode(errors="replace")


def newline_after(start: int):
    return lambda data: i if (i := data.find(b"\n", start)) >= 0 else None


def line_with(marker: bytes):
    """Finds the newline ending the first line that contains ``marker``."""
    def found(data):
        i = data.find(marker)
        j = data.find(b"\n", i) if i >= 0 else -1
        return j if j >= 0 else None
    return found


def lines_at_least(count: int):
    return lambda data: len(data) - 1 if data.count(b"\n") >= count else None


def json_end(data) -> int | None:
    """The closing brace of `vmm run --json`'s report (its last key is "verified")."""
    i = data.find(b'"verified"')
    j = data.find(b"\n}", i) if i >= 0 else -1
    return j + 1 if j >= 0 else None


def wait_socket(path: str, process: subprocess.Popen) -> socket.socket:
    """Connects to a Unix socket as soon as the child serves it (polled every 0.5 ms)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.args[0]} did not serve {path} (exit status {process.poll()})")
        time.sleep(0.0005)


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    for stream in (process.stdout, process.stderr, process.stdin):
        if stream is not None:
            stream.close()


class Qmp:
    """The few QMP commands the benchmark needs (JSON lines over a Unix socket); events are kept in order."""

    def __init__(self, path: str, process: subprocess.Popen):
        self.sock = wait_socket(path, process)
        self.reader = self.sock.makefile("rb")
        self.events = []
        self._message()  # greeting
        self.execute("qmp_capabilities")
        self.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])

    def _message(self) -> dict:
        line = self.reader.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        return json.loads(line)

    def execute(self, command: str, **arguments):
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        while True:
            message = self._message()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                raise RuntimeError(f"QMP {command}: {message['error']}")
            else:
                return message["return"]

    def wait_migration(self) -> None:
        """Until a MIGRATION event reports completed (raises on failed)."""
        while True:
            while self.events:
                status = self.events.pop(0).get("data", {}).get("status")
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    raise RuntimeError(f"migration {status}")
            self.events.append(self._message())

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def check_next_line(before: str, after: str, shift: int) -> None:
    """The first line finished after a restore must be the successor of the last line before the snapshot
    (``before`` may end with the beginning of that line, ``after`` then starts with its end)."""
    complete, _, partial = before.rpartition("\n")
    last = complete.rsplit("\n", 1)[-1]
    (want,) = progress_lines(SEED, shift, 1, resume_from=last)
    got = partial + after.split("\n", 1)[0]
    if got != want:
        raise AssertionError(f"after restore: expected {want!r}, got {got!r}")


# ---------------------------------------------------------------------------------------------- cold boot

def ours_cold_boot(workload: str) -> float:
    """New `vmm run --invoke 1` process -> its JSON report (the reply verified by vmm/workloads.py)."""
    command = [sys.executable, "-m", "vmm.cli", "run", "--invoke", "1", "--json", "--mem", str(BOOT_MEM_MIB),
               "--workload", workload, "--kv-mib", str(KV_MIB)]
    t0 = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
                               env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=ROOT))
    try:
        out = Output(process.stdout)
        t1, end = out.wait(json_end)  # the reply was verified before the report is printed
        report = json.loads(out.text()[:end + 1])
        if report.get("verified") is not True or len(report["invocations"]) != 1:
            raise AssertionError(f"vmm run did not verify its reply: {report}")
        return (t1 - t0) * 1e3
    finally:
        try:
            process.wait(TIMEOUT)  # it exits by itself after printing the report
        finally:
            stop_process(process)


def qemu_cold_boot(binary: str, workload: str) -> float:
    """New QEMU process (PVH entry, self-driven invoke=1) -> the `vmguest: reply 1` line, verified."""
    command = qemu_command(binary, BOOT_MEM_MIB, f"workload={workload} seed={SEED} kv_mib={KV_MIB} invoke=1")
    t0 = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        out = Output(process.stdout)
        t1, end = out.wait(line_with(b"vmguest: reply 1 "))
        replies = parse_self_driven_output(out.text()[:end + 1])
        if replies != expected_self_driven_replies(workload, 1, SEED, KV_MIB):
            raise AssertionError(f"QEMU guest replied {replies}")
        return (t1 - t0) * 1e3
    finally:
        stop_process(process)


# -------------------------------------------------------------------------------------- snapshot save

def ours_save(directory: str, mem_mib: int) -> tuple[float, str, str, str]:
    """Boots a progress guest in process, lets it print, then pause + create_snapshot (timed)."""
    out = Output()
    machine = Microvm(MachineConfig(mem_size_mib=mem_mib, boot_args=progress_args()), serial_sink=out.feed)
    state, mem = os.path.join(directory, f"ours-{mem_mib}.state"), os.path.join(directory, f"ours-{mem_mib}.mem")
    try:
        machine.boot()
        out.wait(lines_at_least(3))
        t0 = time.perf_counter()
        machine.pause()
        create_snapshot(machine, state, mem)
        elapsed = (time.perf_counter() - t0) * 1e3
        before = out.text()
    finally:
        machine.close()
    return elapsed, state, mem, before


def qemu_save(binary: str, directory: str, mem_mib: int) -> tuple[float, str, str]:
    """QEMU running the progress guest; QMP stop + migrate to a file until completed (timed)."""
    qmp_path, image = os.path.join(directory, "qmp-save.sock"), os.path.join(directory, f"qemu-{mem_mib}.mig")
    command = qemu_command(binary, mem_mib, progress_args(), "-qmp", f"unix:{qmp_path},server=on,wait=off")
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    qmp = None
    try:
        out = Output(process.stdout)
        qmp = Qmp(qmp_path, process)
        out.wait(lines_at_least(3))
        t0 = time.perf_counter()
        qmp.execute("stop")
        qmp.execute("migrate", uri=f"exec:cat > {image}")
        qmp.wait_migration()
        elapsed = (time.perf_counter() - t0) * 1e3
        return elapsed, image, out.text()
    finally:
        if qmp is not None:
            qmp.close()
        stop_process(process)


# ------------------------------------------------------------------------------------------ restore

def settled() -> float:
    time.sleep(SETTLE_S)
    return time.perf_counter()


def start_ours(sock_path: str) -> tuple[subprocess.Popen, Output, ApiClient]:
    process = subprocess.Popen([sys.executable, "-m", "vmm.cli", "--api-sock", sock_path], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=ROOT))
    out = Output(process.stdout)
    wait_socket(sock_path, process).close()
    return process, out, ApiClient(sock_path)


def ours_restore(directory: str, state: str, mem: str, before: str, from_start: bool) -> float:
    """`PUT /snapshot/load` (File backend, resume) -> the progress guest's next line on the VMM's stdout."""
    sock_path = os.path.join(directory, "ours-api.sock")
    t_start = time.perf_counter()
    process, out, client = start_ours(sock_path)
    try:
        t0 = t_start if from_start else settled()
        client.load_snapshot(state, mem, resume_vm=True)
        t1, _ = out.wait(newline_after(0))
        check_next_line(before, out.text(), PROGRESS_SHIFT)
        return (t1 - t0) * 1e3
    finally:
        client.close()
        stop_process(process)
        if os.path.exists(sock_path):
            os.unlink(sock_path)


def qemu_restore(binary: str, directory: str, mem_mib: int, image: str, before: str, from_start: bool) -> float:
    """`-incoming defer`, then QMP migrate-incoming "exec:cat FILE", completion event, `cont` -> next line."""
    qmp_path = os.path.join(directory, "qmp-restore.sock")
    t_start = time.perf_counter()
    process = subprocess.Popen(qemu_command(binary, mem_mib, progress_args(), "-incoming", "defer",
                                            "-qmp", f"unix:{qmp_path},server=on,wait=off"),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    qmp = None
    try:
        out = Output(process.stdout)
        qmp = Qmp(qmp_path, process)
        t0 = t_start if from_start else settled()
        qmp.execute("migrate-incoming", uri=f"exec:cat {image}")
        qmp.wait_migration()
        qmp.execute("cont")
        t1, _ = out.wait(newline_after(0))
        check_next_line(before, out.text(), PROGRESS_SHIFT)
        return (t1 - t0) * 1e3
    finally:
        if qmp is not None:
            qmp.close()
        stop_process(process)


# --------------------------------------------------------------------------------------------------- main

def row(what: str, ours: list[float], qemu: list[float]) -> list:
    o, q = summary(ours), summary(qemu)
    return [what, o["n"], o["p50"], o["p99"], q["p50"], q["p99"], f"{q['p50'] / o['p50']:.2f}x",
            f"{q['p99'] / o['p99']:.2f}x"]


HEADERS = ["measure", "n", "ours p50", "ours p99", "QEMU p50", "QEMU p99", "QEMU/ours p50", "QEMU/ours p99"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--sizes", default="128,512")
    parser.add_argument("--workloads", default="hello,kv")
    parser.add_argument("--install", action="store_true", help="apt-get install qemu-system-x86 if it is missing")
    args = parser.parse_args(argv)
    binary = find_qemu(args.install)
    if binary is None:
        print(f"# bench.peers: {QEMU} not found; QEMU column skipped (install it with "
              f"`apt-get install -y qemu-system-x86`, or run with --install)")
        return 0
    workloads, sizes = args.workloads.split(","), [int(s) for s in args.sizes.split(",")]
    print(f"# Peers: our VMM and {qemu_version(binary)} ({machine_line()})\n", flush=True)

    boot = {(w, who): [] for w in workloads for who in ("ours", "qemu")}
    for run in range(args.runs):
        for workload in workloads:
            pair = [("ours", lambda: ours_cold_boot(workload)), ("qemu", lambda: qemu_cold_boot(binary, workload))]
            for who, measure in pair[::-1] if run % 2 else pair:  # alternate who goes first
                boot[workload, who].append(measure())
    print(f"#### Cold boot: new process -> first verified reply, {BOOT_MEM_MIB} MiB guest, ms\n")
    print(table(HEADERS, [row(f"{w}" + (f" (kv_mib {KV_MIB})" if w == "kv" else ""), boot[w, "ours"],
                              boot[w, "qemu"]) for w in workloads]), flush=True)

    rows, sizes_row = [], []
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as directory:
        for mem_mib in sizes:
            cells = {key: [] for key in ("save-ours", "save-qemu", "warm-ours", "warm-qemu", "new-ours", "new-qemu")}
            for run in range(args.runs):
                elapsed, state, mem, ours_before = ours_save(directory, mem_mib)
                cells["save-ours"].append(elapsed)
                elapsed, image, qemu_before = qemu_save(binary, directory, mem_mib)
                cells["save-qemu"].append(elapsed)
                for from_start, kind in ((False, "warm"), (True, "new")):
                    pair = [("ours", lambda: ours_restore(directory, state, mem, ours_before, from_start)),
                            ("qemu", lambda: qemu_restore(binary, directory, mem_mib, image, qemu_before, from_start))]
                    for who, measure in pair[::-1] if run % 2 else pair:
                        cells[f"{kind}-{who}"].append(measure())
            sizes_row.append([f"{mem_mib} MiB", os.path.getsize(state) + os.stat(mem).st_blocks * 512,
                              os.path.getsize(mem), os.path.getsize(image)])
            rows += [row(f"{mem_mib} MiB: save (pause/stop + write snapshot)", cells["save-ours"], cells["save-qemu"]),
                     row(f"{mem_mib} MiB: restore request on a started process -> next line",
                         cells["warm-ours"], cells["warm-qemu"]),
                     row(f"{mem_mib} MiB: process start + restore -> next line", cells["new-ours"], cells["new-qemu"])]
    print(f"\n#### Snapshot save and restore of a running progress guest (progress_shift {PROGRESS_SHIFT}), ms\n")
    print(table(HEADERS, rows))
    print("\n#### Snapshot files, bytes (ours: state + allocated blocks of the memory file; QEMU: migration stream)\n")
    print(table(["guest", "ours on disk", "ours memory file (apparent)", "QEMU migration file"], sizes_row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
