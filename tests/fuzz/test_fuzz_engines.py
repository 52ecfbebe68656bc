"""The long-run entry point works as documented (docs/reliability.md, "Fuzzing"): a few seconds of each engine."""
import os
import re
import subprocess
import sys

import pytest

from tests.fuzz.run import have_atheris

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "tests.fuzz.run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_mutation_engine_runs_a_target(tmp_path):
    run = _run("--engine", "mutate", "--seconds", "1", "--artifacts", str(tmp_path), "index_signed")
    assert run.returncode == 0, run.stdout + run.stderr
    assert int(re.search(r"(\d+) executions", run.stdout).group(1)) > 50


@pytest.mark.skipif(not have_atheris(), reason="atheris is not installed (pip install -e '.[test]' brings it)")
def test_atheris_runs_a_target_coverage_guided(tmp_path):
    run = _run("--engine", "atheris", "--seconds", "2", "--artifacts", str(tmp_path), "loadset_signed")
    assert run.returncode == 0, run.stdout + run.stderr
    assert int(re.search(r"number_of_executed_units: (\d+)", run.stdout).group(1)) > 1000
