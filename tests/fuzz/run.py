"""Long fuzz runs, outside pytest: coverage-guided with atheris (libFuzzer) when it is installed, else the suite's own
mutator (tests/fuzz/mutate.py) driven by a seeded random generator.

    .venv/bin/python -m tests.fuzz.run --seconds 300                  # every target in turn, 300 s each
    .venv/bin/python -m tests.fuzz.run --seconds 600 index_signed     # one target
    .venv/bin/python -m tests.fuzz.run --engine mutate --seconds 60   # without atheris
    .venv/bin/python -m tests.fuzz.run --list

atheris runs each target in a child process (libFuzzer exits the process when it is done), with its seeds and the
checksum-fixing variants as the starting corpus, ``-timeout`` per input (a hang is a crash) and ``-rss_limit_mb``
(an oversized allocation is a crash). A crash input is written to ``--artifacts`` (default
/tmp/fuzz-artifacts/TARGET/): replay it with ``--replay FILE TARGET``. Prints executions per target; exit status 1
if any target found something.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
        return True
    except ImportError:
        return False


def _atheris_child(name: str, seconds: int, corpus_dir: str, artifacts: str, timeout: int, rss_mb: int) -> int:
    """Runs in the child: instrument the project's modules, then libFuzzer on one target."""
    import atheris
    with atheris.instrument_imports(include=["snapd", "vmm"]):
        from tests.fuzz.targets import targets
        target = targets()[name]
        for seed in target.seeds():  # import and warm everything the target touches, under instrumentation
            target.check(seed)
    runs = [0]

    def one(data: bytes) -> None:
        runs[0] += 1
        target.check(data)

    os.makedirs(artifacts, exist_ok=True)
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", f"-timeout={timeout}", f"-rss_limit_mb={rss_mb}",
                   "-max_len=262144", f"-artifact_prefix={artifacts}/", "-print_final_stats=1", corpus_dir], one)
    atheris.Fuzz()
    return 0


def run_atheris(name: str, seconds: int, artifacts: str, timeout: int, rss_mb: int) -> tuple[bool, str]:
    from tests.fuzz.targets import targets
    target = targets()[name]
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as corpus_dir:
        for i, seed in enumerate(target.seeds()):
            with open(os.path.join(corpus_dir, f"seed{i}"), "wb") as f:
                f.write(seed)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        child = subprocess.run([sys.executable, "-m", "tests.fuzz.run", "--atheris-child", name, "--seconds",
                                str(seconds), "--artifacts", artifacts, "--timeout", str(timeout), "--rss-mb",
                                str(rss_mb), "--corpus-dir", corpus_dir], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=seconds + 120)
    out = child.stdout + child.stderr
    stats = [line for line in out.splitlines() if line.startswith(("stat::number_of_executed_units", "#"))]
    summary = next((line for line in reversed(stats) if line.startswith("stat::number_of_executed_units")),
                   stats[-1] if stats else "no libFuzzer statistics")
    found = child.returncode != 0
    if found:
        summary += "\n" + out[-6000:]
    return found, summary


def run_mutate(name: str, seconds: int, artifacts: str, seed: int) -> tuple[bool, str]:
    from tests.fuzz.mutate import apply, random_ops
    from tests.fuzz.targets import targets
    target = targets()[name]
    seeds = target.seeds()
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    runs = slow = 0
    while time.monotonic() < deadline:
        data = apply(rng.choice(seeds), random_ops(rng, target.fields), target.fields)
        start = time.monotonic()
        try:
            target.check(data)
        except Exception:
            os.makedirs(artifacts, exist_ok=True)
            path = os.path.join(artifacts, f"crash-{runs}")
            with open(path, "wb") as f:
                f.write(data)
            return True, f"{runs} executions; crash written to {path}\n{traceback.format_exc()}"
        slow = max(slow, time.monotonic() - start)
        runs += 1
    return False, f"{runs} executions in {seconds} s (slowest {slow * 1e3:.1f} ms)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="*", help="target names (default: all; --list shows them)")
    p.add_argument("--seconds", type=int, default=60, help="per target")
    p.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto")
    p.add_argument("--artifacts", default=os.path.join(tempfile.gettempdir(), "fuzz-artifacts"))
    p.add_argument("--timeout", type=int, default=10, help="seconds one input may take (atheris)")
    p.add_argument("--rss-mb", type=int, default=2048, help="memory limit of the fuzzing process (atheris)")
    p.add_argument("--seed", type=int, default=0, help="random seed (mutate)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--replay", metavar="FILE", help="run one input through the target(s) and show what it raises")
    p.add_argument("--atheris-child", help=argparse.SUPPRESS)
    p.add_argument("--corpus-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.atheris_child:
        return _atheris_child(args.atheris_child, args.seconds, args.corpus_dir, args.artifacts, args.timeout,
                              args.rss_mb)
    from tests.fuzz.targets import targets
    names = args.targets or list(targets())
    if args.list:
        print("\n".join(f"{n}: allows {', '.join(e.__name__ for e in targets()[n].allowed)}" for n in targets()))
        return 0
    unknown = [n for n in names if n not in targets()]
    if unknown:
        p.error(f"unknown targets {unknown}; --list shows them")
    if args.replay:
        with open(args.replay, "rb") as f:
            data = f.read()
        for name in names:
            targets()[name].check(data)
            print(f"{name}: only documented errors")
        return 0
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if have_atheris() else "mutate"
    failed = False
    for name in names:
        artifacts = os.path.join(args.artifacts, name)
        if engine == "atheris":
            found, summary = run_atheris(name, args.seconds, artifacts, args.timeout, args.rss_mb)
        else:
            found, summary = run_mutate(name, args.seconds, artifacts, args.seed)
        failed |= found
        print(f"{name} [{engine}]: {'FOUND' if found else 'ok'}: {summary}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
