"""A bounded run of the fault-injection harness (bench/faults.py): kill -9 of the daemon, the zygote or a worker
at random moments during restores, invocations, snapshots, image builds and deletes; after every round the
harness's invariants hold (nothing partial published, every clone accounted for, nothing leaked). The seed is
fixed so that a failure can be replayed: `python -m bench.faults --rounds 12 --seed 11 --verbose`."""
import os

import pytest

from bench import faults

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon jails its workers with uids of their own")


def test_kills_at_random_moments_leave_every_invariant_holding(tmp_path):
    run = faults.run(str(tmp_path), rounds=12, seed=11, max_seconds=150)
    assert sum(run.counts[op] for op in faults.OPERATIONS) >= 8, run.counts  # it did run
    assert run.counts["kill daemon"] + run.counts["kill zygote"] + run.counts["kill worker"] >= 4, run.counts
    assert run.violations == []
