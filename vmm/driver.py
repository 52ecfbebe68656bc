"""Drives a built-in guest workload from the host: makes requests and verifies every reply independently
(vmm/workloads.py), so `vmm run`, the tests and bench/ all check the guest the same way."""
import json
import time
from dataclasses import dataclass

from vmm import workloads
from vmm.errors import ConfigError, InvocationError

KV_LOOKUPS = 1000
SCAN_WINDOW_MIB = 4


@dataclass(frozen=True)
class WorkloadParams:
    workload: str = "hello"
    seed: int = 1
    kv_mib: int = workloads.DEFAULTS["kv_mib"]
    scan_mib: int = workloads.DEFAULTS["scan_mib"]

    def boot_args(self) -> str:
        return f"workload={self.workload} seed={self.seed} kv_mib={self.kv_mib} scan_mib={self.scan_mib}"

    @classmethod
    def from_boot_args(cls, boot_args: str) -> "WorkloadParams":
        words = dict(w.split("=", 1) for w in boot_args.split() if "=" in w)
        defaults = cls()

        def number(name: str, default: int) -> int:
            try:
                return int(words.get(name, default))
            except ValueError:
                raise ConfigError(f"boot argument {name}={words[name]!r} is not a whole number") from None

        return cls(workload=words.get("workload", defaults.workload), seed=number("seed", defaults.seed),
                   kv_mib=number("kv_mib", defaults.kv_mib), scan_mib=number("scan_mib", defaults.scan_mib))


class WorkloadDriver:
    """Request ``i`` (0, 1, ...) and the check of its reply, for one guest whose count starts at ``count``."""

    def __init__(self, params: WorkloadParams, first_count: int = 1):
        self.params = params
        self.next_count = first_count

    def request(self, i: int) -> bytes:
        p = self.params
        if p.workload == "hello":
            return workloads.hello_request(f"invocation {i}")
        if p.workload == "kv":
            return workloads.kv_request(KV_LOOKUPS, workloads.mix64(p.seed + i))
        if p.workload == "scan":
            window = min(SCAN_WINDOW_MIB, p.scan_mib)
            offset = workloads.mix64(p.seed + i) % max(p.scan_mib - window + 1, 1)
            return workloads.scan_request(offset, window)
        raise ValueError(f"workload {p.workload!r} takes no invocations")

    def verify(self, request: bytes, reply: bytes) -> str:
        """Raise workloads.ReplyMismatch if the reply is wrong; return a one-line summary of it."""
        p = self.params
        if p.workload == "hello":
            parsed = workloads.verify_hello(request, reply, self.next_count)
            self.next_count += 1
            return f"hello #{parsed.count} random={parsed.random:016x}"
        if p.workload == "kv":
            found, total = workloads.verify_kv(p.seed, p.kv_mib, request, reply)
            return f"kv found={found} sum={total:016x}"
        words, total = workloads.verify_scan(p.seed, p.scan_mib, request, reply)
        return f"scan words={words} sum={total:016x}"


def invoke_verified(machine, driver: WorkloadDriver, count: int, timeout: float) -> list[dict]:
    """Make ``count`` invocations, verify each reply, and return one record per invocation (latency, summary)."""
    results = []
    for i in range(count):
        request = driver.request(i)
        t0 = time.perf_counter()
        reply = machine.invoke(request, timeout=timeout)
        latency_us = (time.perf_counter() - t0) * 1e6
        try:
            summary = driver.verify(request, reply)
        except workloads.ReplyMismatch as exc:
            raise InvocationError(f"invocation {i + 1}: the guest's reply is wrong: {exc}") from None
        results.append({"invocation": i + 1, "latency_us": round(latency_us, 1), "reply": summary})
    return results


def print_invocation_report(report: dict, headline: str, as_json: bool, extra_lines=()) -> None:
    """The `vmm run` / `vmm restore` output: one JSON document, or a headline and one line per invocation."""
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(headline)
    for line in extra_lines:
        print(line)
    for r in report["invocations"]:
        print(f"  invoke {r['invocation']}: {r['latency_us']:8.1f} us  {r['reply']}  (verified)")
