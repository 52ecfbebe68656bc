"""Shared helpers of the benchmark harness: percentiles, markdown tables, the machine's description."""
import os
import platform
import statistics


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sample."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary(samples: list[float]) -> dict:
    return {"n": len(samples), "p50": percentile(samples, 50), "p90": percentile(samples, 90),
            "p99": percentile(samples, 99), "mean": statistics.fmean(samples), "min": min(samples)}


def table(headers: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    return f"{os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}, Python {platform.python_version()}"
