"""An invocation's timeout holds whatever its worker does (issue #12): answered within timeout_ms plus the reply
grace (snapd/csrc/lane_proto.h LANE_REPLY_GRACE_MS), and the clone is then failed, never left running."""
import os
import signal
import time

import pytest

from snapd.client import SnapdError
from snapd.daemon.clones import REPLY_GRACE_S
from tests.daemon_helpers import RunningDaemon, hello_snapshot
from vmm import workloads


@pytest.fixture(scope="module", params=["on", "off"], ids=["lane", "python"])
def daemon(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"timeouts-{request.param}")
    state, mem = hello_snapshot(tmp)
    running = RunningDaemon(str(tmp / "state"), pool_size=1, lane=request.param == "on")
    try:
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
    if how == "SIGSTOP":  # killed by the daemon, not left stopped
        assert not os.path.exists(f"/proc/{clone['pid']}") or open(f"/proc/{clone['pid']}/stat").read().split(
            ")")[1].split()[0] in "ZX"
