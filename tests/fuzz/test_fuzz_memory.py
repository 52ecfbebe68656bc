"""No unbounded allocation: hostile inputs with length and count fields at their extremes (tests/fuzz/hostile.py)
are refused before anything of that size is allocated. Checked twice: the peak of Python allocations of each decode
(tracemalloc), and every input in a subprocess whose address space is capped at what it maps plus 384 MiB, where
an allocation past the cap is a MemoryError, which no target allows."""
import os
import subprocess
import sys

import pytest

from tests.fuzz.hostile import cases, peak_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("what, target, data, bound", cases(), ids=[c[0] for c in cases()])
def test_hostile_lengths_allocate_at_most_their_bound(what, target, data, bound):
    peak = peak_of(target, data)
    assert peak <= bound, f"{what}: decoding allocated {peak >> 10} KiB, more than {bound >> 10} KiB"


def test_every_hostile_input_decodes_under_an_address_space_cap():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "tests.fuzz.hostile", "384"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert f"{len(cases())} hostile inputs decoded under RLIMIT_AS" in run.stdout
