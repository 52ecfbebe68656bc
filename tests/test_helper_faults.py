"""Faults of the daemon's helper processes (issue #12). An invocation's timeout holds whatever its worker does:
answered within timeout_ms plus the reply grace (snapd/csrc/lane_proto.h LANE_REPLY_GRACE_MS), and the clone is
then failed, never left running. A dead zygote or idle worker is replaced, and the daemon goes on serving."""
import os
import signal
import time

import pytest

from snapd.client import SnapdError
from snapd.daemon.clones import REPLY_GRACE_S
from tests.daemon_helpers import RunningDaemon, hello_snapshot
from vmm import workloads
from snapd.pool.worker_handle import proc_stat
from tests.conftest import wait_until


def process_state(pid: int) -> str:
    """R, S, T, Z... from /proc/PID/stat; X once the process is gone."""
    fields = proc_stat(pid)
    return fields[0].decode() if fields else "X"


@pytest.fixture(scope="module", params=["on", "off"], ids=["lane", "python"])
def daemon(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"timeouts-{request.param}")
    state, mem = hello_snapshot(tmp)
    running = RunningDaemon(str(tmp / "state"), pool_size=1, lane=request.param == "on")
    try:
        running.snapshot = (state, mem)
        yield running, running.client.register_image(state, mem)["id"]
    finally:
        running.close()


@pytest.mark.parametrize("how", ["SIGSTOP", "SIGKILL"])
def test_an_invocation_ends_within_its_timeout_plus_the_grace(daemon, how):
    running, image = daemon
    (clone,) = running.client.create_clones(image, payload=b"first")
    workloads.verify_hello(b"first", clone["result"], 1)
    os.kill(clone["pid"], getattr(signal, how))
    t0 = time.monotonic()
    with pytest.raises(SnapdError) as refused:
        running.client.invoke(clone["id"], b"never answered", timeout_ms=1000)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0 + REPLY_GRACE_S + 1.0, elapsed  # (1 s of slack for a loaded machine)
    assert refused.value.status in (502, 504)
    record = running.client.request("GET", f"/v1/clones/{clone['id']}").json()
    assert record["state"] == "failed", record
    running.client.delete_clone(clone["id"])
    if how == "SIGSTOP":  # killed by the daemon, not left stopped (its exit, a VM's teardown, takes a while)
        assert wait_until(lambda: process_state(clone["pid"]) in "ZX", timeout=10), process_state(clone["pid"])


def test_a_dead_zygote_is_replaced_and_the_daemon_keeps_serving(daemon):
    running, image = daemon
    pool = running.daemon.pool
    zygote = running.daemon.zygote
    old = zygote.pid
    os.kill(old, signal.SIGKILL)
    time.sleep(0.05)
    second = running.client.register_image(*running.snapshot)["id"]  # while (or just after) it is gone: whole
    assert second in {i["id"] for i in running.client.images()}
    deadline = time.monotonic() + 5
    while (zygote.pid == old or not zygote.alive()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert zygote.pid != old and zygote.alive(), "the zygote was not replaced"
    # Workers are forked from the new one: more clones than the pool held must come.
    clones = running.client.create_clones(image, count=4, payload=b"after")
    for clone in clones:
        workloads.verify_hello(b"after", clone["result"], 1)
        running.client.delete_clone(clone["id"])
    recorded = {int(name.split(".")[0]) for name in os.listdir(running.daemon.records.dir)}
    assert old not in recorded and zygote.pid in recorded
    assert pool.failures == 0 or "zygote" not in pool.last_error
    assert second in zygote.preloads  # told to the new zygote too
    running.client.delete_image(second)


def test_a_dead_idle_worker_is_replaced(daemon):
    running, image = daemon
    pool = running.daemon.pool
    assert wait_until(lambda: pool.settled() and pool.idle_workers())
    victim = pool.idle_workers()[0]
    os.kill(victim.pid, signal.SIGKILL)
    assert wait_until(lambda: victim not in pool.idle_workers(), timeout=2), "the dead idle worker stayed in the pool"
    assert wait_until(lambda: pool.settled() and pool.idle_workers(), timeout=10)
