"""Clones of one image share its memory copy-on-write, start from exactly the snapshot, and are unique."""
import base64
import os
import select
import signal
import threading
import time

import pytest

from vmm.snapshot import snapshot_builtin_guest
from snapd._lane_native import lib
from snapd.client import SnapdClient, SnapdError
from snapd.hugetmpfs import HugeTmpfsError, mount_huge_tmpfs, unmount
from tests.conftest import requires_kvm, wait_until
from tests.daemon_helpers import (MEM_MIB, RunningDaemon, clone_memory, hello_snapshot, thread_count,
                                  write_process_memory)
from tests.vm_helpers import assert_equals_snapshot, snapshot_memory
from vmm import workloads
from vmm.snapshot import read_snapshot

pytestmark = requires_kvm
PAGE = 4096


@pytest.fixture(scope="module", params=["memfd", "huge"])
def running(request, tmp_path_factory):
    """A daemon serving a hello image; "huge": its shared copy on 2 MiB pages (a huge-page tmpfs, as
    `snapd serve --huge-pages` mounts it; here in the host's namespace, detached afterwards)."""
    tmp = tmp_path_factory.mktemp("clones")
    state, mem = hello_snapshot(tmp)
    huge_dir = None
    if request.param == "huge":
        try:
            huge_dir = mount_huge_tmpfs(str(tmp / "huge"), size="256m")
        except HugeTmpfsError as exc:
            pytest.skip(f"no huge-page tmpfs here: {exc}")
    daemon = RunningDaemon(str(tmp / "state"), pool_size=2, huge_dir=huge_dir)
    try:
        record = daemon.client.register_image(state, mem, chunk_size=None if huge_dir else 64 << 10)
        assert record["huge_pages"] == bool(huge_dir), record
        yield daemon, record["id"], state, mem
    finally:
        daemon.close()
        if huge_dir:
            unmount(huge_dir)


def test_clone_memory_equals_the_snapshot_before_and_after_other_clones_write(running):
    daemon, image, state_path, mem_path = running
    expected = snapshot_memory(mem_path, MEM_MIB << 20)
    mailbox_gpa = read_snapshot(state_path).devices.fnport.mailbox_pfn << 12
    a, b = daemon.client.create_clones(image, count=2)
    try:
        assert_equals_snapshot(clone_memory(daemon, a["id"]), expected, mailbox_gpa)
        # Clone b writes: through its guest (invocations) and, like a guest store, into pages all over memory.
        for i in range(3):
            daemon.client.invoke(b["id"], f"write {i}".encode())
        worker_b = daemon.daemon._clone(b["id"])
        written = list(range(0, MEM_MIB << 20, 1 << 20))
        for gpa in written:
            write_process_memory(worker_b.worker.pid, worker_b.regions[0][2] + gpa, b"\xee" * PAGE)
        b_memory = clone_memory(daemon, b["id"])
        assert all(b_memory[gpa:gpa + PAGE] == b"\xee" * PAGE for gpa in written)
        assert_equals_snapshot(clone_memory(daemon, a["id"]), expected, mailbox_gpa)
        memfd = daemon.daemon.images[image].shards[0].image.memfd
        assert all(os.pread(memfd, PAGE, gpa) == expected[gpa:gpa + PAGE] for gpa in written)  # shared copy intact
        # A clone restored after the writes starts from the snapshot too.
        (c,) = daemon.client.create_clones(image)
        try:
            assert_equals_snapshot(clone_memory(daemon, c["id"]), expected, mailbox_gpa)
        finally:
            daemon.client.delete_clone(c["id"])
    finally:
        daemon.client.delete_clone(a["id"])
        daemon.client.delete_clone(b["id"])


def test_two_clones_of_one_image_draw_different_random_streams(running):
    daemon, image, _, _ = running
    request = workloads.hello_request("same request")
    clones = daemon.client.create_clones(image, count=2, payload=request)
    try:
        replies = [workloads.verify_hello(request, c["result"], 1) for c in clones]
        assert replies[0].generation != replies[1].generation
        assert replies[0].random != replies[1].random
        second = [workloads.verify_hello(request, daemon.client.invoke(c["id"], request), 2) for c in clones]
        assert second[0].random != second[1].random
    finally:
        for clone in clones:
            daemon.client.delete_clone(clone["id"])


def test_a_crashed_worker_marks_its_clone_failed_and_the_daemon_keeps_serving(running):
    daemon, image, _, _ = running
    (clone,) = daemon.client.create_clones(image)
    os.kill(clone["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while daemon.client.clone(clone["id"])["state"] != "failed":
        assert time.monotonic() < deadline, "the clone was not marked failed"
        time.sleep(0.02)
    with pytest.raises(SnapdError) as error:
        daemon.client.invoke(clone["id"], b"hello?")
    assert error.value.status == 502 and clone["id"] in error.value.fault_message
    (fresh,) = daemon.client.create_clones(image, payload=b"still serving")
    workloads.verify_hello(b"still serving", fresh["result"], 1)
    daemon.client.delete_clone(fresh["id"])
    daemon.client.delete_clone(clone["id"])


def test_the_zygote_is_single_threaded_and_the_daemon_reaps_its_jailed_workers(running):
    """Workers are forked from the zygote into pid namespaces of their own; the parent that forked them there
    leaves, so they come to the daemon, their subreaper, which reads why each one exited."""
    daemon, image, _, _ = running
    zygote = daemon.daemon.zygote.pid
    assert thread_count(zygote) == 1
    (clone,) = daemon.client.create_clones(image)
    try:
        with open(f"/proc/{clone['pid']}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()  # the daemon runs in this process
        with open(f"/proc/{clone['pid']}/cmdline", "rb") as f:
            assert b"snapd.pool.zygote" in f.read()
    finally:
        daemon.client.delete_clone(clone["id"])


def test_a_reused_worker_starts_from_the_snapshot_with_a_new_generation(running):
    """A deleted clone's worker is prepared again for the image (no fork): its next clone must see the
    snapshot's memory page for page (not the pages the old clone wrote), and a generation and entropy of its own."""
    daemon, image, state_path, mem_path = running
    expected = snapshot_memory(mem_path, MEM_MIB << 20)
    mailbox_gpa = read_snapshot(state_path).devices.fnport.mailbox_pfn << 12
    pool = daemon.daemon.pool
    request = workloads.hello_request("reuse")
    wait_settled(pool)
    pool.restore_started()  # holds the refill (as a restore in flight does): the deleted clone's worker is wanted
    try:
        old, other = daemon.client.create_clones(image, count=2, payload=request)
        first = workloads.verify_hello(request, old["result"], 1)
        daemon.client.invoke(old["id"], b"write more")
        worker = daemon.daemon._clone(old["id"])
        clone_memory(daemon, old["id"])  # every page faulted in (a write to a missing page fails with EIO)
        for gpa in range(0, MEM_MIB << 20, 1 << 20):  # dirty the old clone all over its memory
            write_process_memory(old["pid"], worker.regions[0][2] + gpa, b"\xee" * PAGE)
        daemon.client.delete_clone(old["id"])
        daemon.client.delete_clone(other["id"])
        wait_settled(pool)
        assert old["pid"] in {w.pid for w in pool.prepared_workers(image)}, pool.last_error
    finally:
        pool.restore_finished()
    taken = daemon.client.create_clones(image, count=len(pool.prepared_workers(image)))
    try:
        reused = next(c for c in taken if c["pid"] == old["pid"])
        assert reused["timings_us"]["reuses"] >= 1
        assert_equals_snapshot(clone_memory(daemon, reused["id"]), expected, mailbox_gpa)
        again = workloads.verify_hello(request, daemon.client.invoke(reused["id"], request), 1)
        assert again.generation != first.generation and again.random != first.random
    finally:
        for clone in taken:
            daemon.client.delete_clone(clone["id"])


def test_a_failed_clones_worker_is_not_reused(running):
    daemon, image, _, _ = running
    (clone,) = daemon.client.create_clones(image)
    os.kill(clone["pid"], signal.SIGSTOP)  # alive but failing: the daemon must not take it back
    try:
        daemon.daemon._mark_failed(daemon.daemon._clone(clone["id"]), "marked failed by the test")
        daemon.client.delete_clone(clone["id"])
        wait_settled(daemon.daemon.pool)
        assert clone["pid"] not in {w.pid for w in daemon.daemon.pool.warm_workers()}
    finally:
        try:
            os.kill(clone["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_settled(pool, timeout: float = 30.0) -> None:
    assert wait_until(pool.settled, timeout), "the pool did not settle"


@pytest.fixture(scope="module")
def kv_daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kv-clones")
    state, mem = snapshot_builtin_guest(str(tmp), MEM_MIB, "workload=kv kv_mib=1", "kv")
    daemon = RunningDaemon(str(tmp / "state"), pool_size=1)
    try:
        yield daemon, daemon.client.register_image(state, mem)["id"]
    finally:
        daemon.close()


def test_a_prepared_clone_answers_its_first_and_later_invocations(kv_daemon):
    """The first invocation of a prepared (held) clone runs on the worker's main thread, in C (the lane); the
    guest is then parked in FN_NEXT again, and later invocations are answered there too: all must be the guest's
    right answers, in order, and the clone reads as running."""
    daemon, image = kv_daemon
    wait_settled(daemon.daemon.pool)
    first = workloads.kv_request(1000, 7)
    (clone,) = daemon.client.create_clones(image, payload=first)
    worker = daemon.daemon._clone(clone["id"]).worker
    try:
        assert "prepare_us" in clone["timings_us"], "the clone was not served by a prepared worker"
        workloads.verify_kv(1, 1, first, clone["result"])
        status, _ = worker.request({"op": "status"})
        assert status["lane"]["served"] >= 1, "the held clone's restore was not answered by the lane (C)"
        served = status["lane"]["served"]
        for seed in (8, 9, 10):
            request = workloads.kv_request(5000, seed)
            workloads.verify_kv(1, 1, request, daemon.client.invoke(clone["id"], request))
        status, _ = worker.request({"op": "status"})
        assert status["lane"]["served"] == served + 3, "later invocations were not answered by the lane (C)"
        assert status["state"] == "Running" and daemon.client.clone(clone["id"])["state"] == "running"
    finally:
        daemon.client.delete_clone(clone["id"])


def non_canonical_b64(data: bytes) -> str:
    """``data`` (not a multiple of 3 bytes) in base64 with its unused trailing bits set: Python's decoder takes
    it, the lane's strict one hands it to Python."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    text = base64.b64encode(data).decode()
    last = len(text) - text.count("=") - 1
    assert text.count("=") and base64.b64decode(text[:last] + alphabet[alphabet.index(text[last]) | 1] + "=" *
                                                text.count("=")) == data
    return text[:last] + alphabet[alphabet.index(text[last]) | 1] + text[last + 1:]


def clone_token(daemon, clone_id: str) -> int:
    """The clone's ticket on the lane's board (offered as the daemon records it: after a lane restore's 201)."""
    lane = daemon.daemon.lane
    assert wait_until(lambda: clone_id in lane.clone_tickets, 5), f"clone {clone_id} never reached the lane"
    return lane.clone_tickets[clone_id]


def lane_invocations(daemon) -> int:
    return daemon.daemon.lane.invocations()


def test_a_live_clones_invocations_are_answered_by_the_lane_as_python_would(kv_daemon):
    """POST /v1/clones/{id}/invoke of a live clone: read, sent and answered in C on the daemon's side too. The
    same reply as the Python path's (which a non-canonical base64 payload still takes), in the same order."""
    daemon, image = kv_daemon
    wait_settled(daemon.daemon.pool)
    first = workloads.kv_request(100, 1)
    (clone,) = daemon.client.create_clones(image, payload=first)
    try:
        workloads.verify_kv(1, 1, first, clone["result"])
        clone_token(daemon, clone["id"])
        before = lane_invocations(daemon)
        for seed in (2, 3):
            request = workloads.kv_request(500, seed)
            reply = daemon.client.call("POST", f"/v1/clones/{clone['id']}/invoke",
                                       {"payload": base64.b64encode(request).decode(), "timeout_ms": 5000})
            assert set(reply) == {"result", "latency_us"} and reply["latency_us"] > 0
            workloads.verify_kv(1, 1, request, base64.b64decode(reply["result"]))
        assert lane_invocations(daemon) == before + 2, "the invocations did not go through the lane"
        assert f"snapd_lane_invocations_total {before + 2}" in daemon.client.metrics()
        # The Python path (which a non-canonical spelling of the payload takes): the same fields, the same guest.
        request = workloads.kv_request(500, 4)
        reply = daemon.client.call("POST", f"/v1/clones/{clone['id']}/invoke", {"payload": non_canonical_b64(request)})
        assert set(reply) == {"result", "latency_us"}
        workloads.verify_kv(1, 1, request, base64.b64decode(reply["result"]))
        assert lane_invocations(daemon) == before + 2
        request = workloads.kv_request(500, 5)
        workloads.verify_kv(1, 1, request, daemon.client.invoke(clone["id"], request))
        assert lane_invocations(daemon) == before + 3
    finally:
        daemon.client.delete_clone(clone["id"])


@pytest.mark.parametrize("step", ["delete", "mark failed"])
def test_an_invocation_in_flight_in_the_lane_finishes_and_the_clone_then_leaves_the_lane(kv_daemon, step):
    """A DELETE (or the clone's failure) while the lane has an invocation of it in flight: as on the Python path,
    the invocation finishes first (the worker channel's lock), and the clone's ticket is never offered again:
    no later invocation reaches its worker through the lane."""
    daemon, image = kv_daemon
    wait_settled(daemon.daemon.pool)
    (clone,) = daemon.client.create_clones(image, payload=workloads.kv_request(10, 1))
    lane = daemon.daemon.lane
    token = clone_token(daemon, clone["id"])
    errors = []

    def long_invocation():
        try:
            with SnapdClient(daemon.socket_path) as other:
                other.invoke(clone["id"], workloads.kv_request(0xFFFFFFFF, 1), timeout_ms=1500)
        except SnapdError as exc:
            errors.append(exc)
    thread = threading.Thread(target=long_invocation)
    thread.start()
    try:
        assert wait_until(lambda: lib.lane_board_taken(lane.board, token) == 1, 5)
        before = lane_invocations(daemon)
        if step == "delete":
            daemon.client.delete_clone(clone["id"])  # waits for the invocation, as a Python one would be waited for
        else:
            daemon.daemon._mark_failed(daemon.daemon._clone(clone["id"]), "marked failed by the test")
        thread.join(15)
        assert not thread.is_alive() and len(errors) == 1 and errors[0].status == 504, errors
        assert lib.lane_board_withdraw(lane.board, token) == lib.LANE_TICKET_UNKNOWN, "the ticket outlived its clone"
        assert token not in lane.live_tokens and clone["id"] not in lane.clone_tickets
        with pytest.raises(SnapdError) as error:
            daemon.client.invoke(clone["id"], workloads.kv_request(10, 2))
        assert error.value.status == (404 if step == "delete" else 502) and lane_invocations(daemon) == before
        request = workloads.kv_request(100, 5)
        (again,) = daemon.client.create_clones(image, payload=request)
        workloads.verify_kv(1, 1, request, again["result"])
        daemon.client.delete_clone(again["id"])
    finally:
        thread.join(15)
        if step != "delete":
            daemon.client.delete_clone(clone["id"])


def test_the_daemon_stops_at_once_with_an_invocation_in_flight(tmp_path):
    """Shutdown used to wait for a clone's invocation in flight (its worker's channel lock) up to its timeout."""
    state, mem = snapshot_builtin_guest(str(tmp_path), MEM_MIB, "workload=kv kv_mib=1", "kv")
    daemon = RunningDaemon(str(tmp_path / "state"), pool_size=1)
    ended = []
    try:
        image = daemon.client.register_image(state, mem)["id"]
        wait_settled(daemon.daemon.pool)
        (clone,) = daemon.client.create_clones(image, payload=workloads.kv_request(10, 1))
        token = clone_token(daemon, clone["id"])

        def long_invocation():
            try:
                with SnapdClient(daemon.socket_path) as other:
                    other.invoke(clone["id"], workloads.kv_request(0xFFFFFFFF, 1), timeout_ms=60_000)
            except (SnapdError, OSError) as exc:
                ended.append(exc)
        thread = threading.Thread(target=long_invocation)
        thread.start()
        assert wait_until(lambda: lib.lane_board_taken(daemon.daemon.lane.board, token) == 1, 5)
    finally:
        t0 = time.monotonic()
        daemon.close()
        stopped_in = time.monotonic() - t0
    thread.join(30)
    assert stopped_in < 10 and not thread.is_alive() and ended, (stopped_in, ended)


def test_a_later_invocation_past_its_timeout_is_a_504_that_names_it(kv_daemon):
    """Handed to Python by the lane (the worker's refusal): a 504 that names the request's timeout (it said
    "within 0.000 s", the time left when the worker's wait began), and the clone's ticket on the board again."""
    daemon, image = kv_daemon
    wait_settled(daemon.daemon.pool)
    (clone,) = daemon.client.create_clones(image, payload=workloads.kv_request(10, 1))
    try:
        before = lane_invocations(daemon)
        t0 = time.monotonic()
        with pytest.raises(SnapdError) as error:
            daemon.client.invoke(clone["id"], workloads.kv_request(0xFFFFFFFF, 1), timeout_ms=1000)
        assert error.value.status == 504 and 0.9 < time.monotonic() - t0 < 5
        assert "within 1.000 s" in str(error.value), error.value
        assert lane_invocations(daemon) == before, "a refused invocation is Python's answer, not a served one"
        token = clone_token(daemon, clone["id"])
        assert lib.lane_board_taken(daemon.daemon.lane.board, token) == 0, "the ticket was left taken"
    finally:
        daemon.client.delete_clone(clone["id"])


def test_a_first_invocation_past_its_timeout_is_a_504_and_the_daemon_keeps_serving(kv_daemon):
    daemon, image = kv_daemon
    wait_settled(daemon.daemon.pool)
    endless = workloads.kv_request(0xFFFFFFFF, 1)  # ~4e9 lookups: minutes of guest work
    t0 = time.monotonic()
    with pytest.raises(SnapdError) as error:
        daemon.client.create_clones(image, payload=endless, timeout_ms=2000)
    assert error.value.status == 504, error.value
    assert "did not answer" in str(error.value)
    # The timeout is the request's, once: the lane runs the guest up to it and Python must not start it again
    # (it did: 4 s for a 2 s timeout). The margin is for a loaded CI machine.
    assert 1.9 < time.monotonic() - t0 < 3.5
    with pytest.raises(SnapdError) as error:
        daemon.client.create_clones(image, payload=endless, timeout_ms=3_600_001)
    assert error.value.status == 400 and "at most 3600000" in str(error.value)
    request = workloads.kv_request(100, 3)
    (clone,) = daemon.client.create_clones(image, payload=request)
    try:
        workloads.verify_kv(1, 1, request, clone["result"])
    finally:
        daemon.client.delete_clone(clone["id"])


def test_a_first_invocation_the_guest_cannot_take_is_a_400(kv_daemon):
    daemon, image = kv_daemon
    with pytest.raises(SnapdError) as error:
        daemon.client.create_clones(image, payload=b"x" * 65536)
    assert error.value.status == 400, error.value
    assert "the guest accepts at most" in str(error.value)


def lane_restores(daemon) -> int:
    return daemon.daemon.counters["lane_restores"]


def assert_lane_restores(daemon, expected: int, why: str = "") -> None:
    """The lane writes its 201 before the daemon records the clone and counts it: the count is waited for."""
    wait_until(lambda: lane_restores(daemon) >= expected, 5.0)
    assert lane_restores(daemon) == expected, why or f"{lane_restores(daemon)} lane restores, not {expected}"


def test_the_lane_and_the_python_path_answer_a_restore_alike(running):
    """count 1 with a held prepared worker: the lane (C) answers; count 2: the Python path. Same fields, same
    guest behaviour, and the lane's clone is in the daemon's books like any other."""
    daemon, image, _, _ = running
    wait_settled(daemon.daemon.pool)
    before = lane_restores(daemon)
    request = workloads.hello_request("lane or not")
    (fast,) = daemon.client.create_clones(image, payload=request)
    slow = daemon.client.create_clones(image, count=2, payload=request)
    try:
        assert_lane_restores(daemon, before + 1, "the count-1 restore did not go through the lane")
        assert f"snapd_lane_restores_total {before + 1}" in daemon.client.metrics()
        replies = [workloads.verify_hello(request, clone["result"], 1) for clone in [fast, *slow]]
        assert len({r.generation for r in replies}) == 3 and len({r.random for r in replies}) == 3, \
            "a clone the lane restored must get its own generation and entropy, as every other does"
        assert set(fast) == set(slow[0])
        assert set(fast["timings_us"]) >= {"prepare_us", "populate_us", "new_generation_us"}
        listed = daemon.client.clone(fast["id"])
        for key in ("id", "image", "state", "error", "pid", "endpoints", "restore_us"):
            assert listed[key] == fast[key], key
        assert abs(listed["created"] - fast["created"]) < 1e-5
        assert listed["timings_us"] == fast["timings_us"]
        workloads.verify_hello(request, daemon.client.invoke(fast["id"], request), 2)
    finally:
        for clone in [fast, *slow]:
            daemon.client.delete_clone(clone["id"])


def test_prepared_workers_that_died_on_the_lane_are_replaced_without_an_error(running):
    daemon, image, _, _ = running
    wait_settled(daemon.daemon.pool)
    victims = [w for w in daemon.daemon.pool.prepared_workers(image) if w.lane_token]
    assert victims, "no prepared worker was offered to the lane"
    for worker in victims:
        os.kill(worker.pid, signal.SIGKILL)
    for worker in victims:  # its end of the channel hangs up once the process is gone
        poller = select.poll()
        poller.register(worker.fileno(), select.POLLHUP)
        assert poller.poll(10_000), f"worker {worker.pid} did not die"
    request = workloads.hello_request("after the kill")
    (clone,) = daemon.client.create_clones(image, payload=request)
    try:
        assert clone["pid"] not in {w.pid for w in victims}
        workloads.verify_hello(request, clone["result"], 1)
    finally:
        daemon.client.delete_clone(clone["id"])


def test_a_pool_is_settled_only_once_a_new_image_has_its_prepared_workers(tmp_path):
    """settled() used to mean "nothing in flight", which held between an image's registration and the refill
    thread's first look: a restore right after it found no prepared worker."""
    state, mem = hello_snapshot(tmp_path)
    daemon = RunningDaemon(str(tmp_path / "state"), pool_size=1)
    try:
        pool = daemon.daemon.pool
        wait_settled(pool)
        pool.restore_started()  # the refill thread prepares nothing while a restore runs
        try:
            image = daemon.client.register_image(state, mem, chunk_size=64 << 10)["id"]
            assert wait_until(lambda: pool.idle_count() >= pool.target), "the pool forked no worker"
            assert not pool.prepared_workers(image) and not pool.settled()
        finally:
            pool.restore_finished()
        wait_settled(pool)
        assert len(pool.prepared_workers(image)) >= pool.prepared_target > 0
    finally:
        daemon.close()


def test_a_restore_that_ends_after_the_pool_closed_wakes_nothing(tmp_path):
    """Daemon shutdown with a restore in flight: its end used to write to the pool's closed wake-up pipe (EBADF,
    a traceback; or, once the number was reused, a byte into someone else's file)."""
    daemon = RunningDaemon(str(tmp_path / "state"), pool_size=1)
    try:
        pool = daemon.daemon.pool
        pool.restore_started()
        pool.close()
        pool.restore_finished()  # raised OSError(EBADF)
        assert pool.wake_write == -1
    finally:
        daemon.close()


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "no-lane"])
def test_the_clone_limit_holds_on_both_paths(tmp_path, lane):
    state, mem = hello_snapshot(tmp_path)
    daemon = RunningDaemon(str(tmp_path / "state"), pool_size=1, max_clones=1, lane=lane)
    try:
        image = daemon.client.register_image(state, mem, chunk_size=64 << 10)["id"]
        wait_settled(daemon.daemon.pool)
        (first,) = daemon.client.create_clones(image, payload=b"one")
        assert_lane_restores(daemon, 1 if lane else 0)
        wait_settled(daemon.daemon.pool)
        with pytest.raises(SnapdError) as error:
            daemon.client.create_clones(image, payload=b"two")
        assert error.value.status == 409 and "limit" in error.value.fault_message
        daemon.client.delete_clone(first["id"])
        wait_settled(daemon.daemon.pool)
        (third,) = daemon.client.create_clones(image, payload=b"three")
        workloads.verify_hello(b"three", third["result"], 1)
        if lane:
            clone_token(daemon, third["id"])
        workloads.verify_hello(b"four", daemon.client.invoke(third["id"], b"four"), 2)
        assert daemon.daemon.lane.invocations() == (1 if lane else 0), "--lane off must keep invocations Python's"
        daemon.client.delete_clone(third["id"])
        daemon.client.delete_image(image)  # its prepared workers leave the lane's board with it
        assert daemon.daemon.lane.by_clone == {}
    finally:
        daemon.close()


class SlowEpoll:
    """The daemon's epoll with a slow register: the step of a record that used to follow its publication."""

    def __init__(self, epoll):
        self.epoll = epoll

    def register(self, fd, events):
        time.sleep(0.3)
        self.epoll.register(fd, events)

    def __getattr__(self, name):
        return getattr(self.epoll, name)


@pytest.mark.parametrize("slow_step", ["taking the worker", "watching it"])
def test_a_clone_asked_for_before_the_lane_recorded_it_is_waited_for(running, slow_step):
    """The lane writes the 201 before the daemon's Python records the clone: a request about it on another
    connection in between must wait for the whole record (a DELETE used to hold the lock the record needed,
    30 s then 404; or to come between the clone's publication and its epoll registration, leaving a deleted
    clone's worker watched: the worker's next clone then failed to register)."""
    daemon, image, _, _ = running
    wait_settled(daemon.daemon.pool)
    pool = daemon.daemon.pool
    original_discard, original_epoll = pool.discard_prepared, daemon.daemon.epoll

    def slow_discard(worker, image_id):
        time.sleep(0.3)
        original_discard(worker, image_id)

    if slow_step == "taking the worker":
        pool.discard_prepared = slow_discard
    else:
        daemon.daemon.epoll = SlowEpoll(original_epoll)
    other = SnapdClient(daemon.socket_path)
    try:
        before = lane_restores(daemon)
        for ask in ("delete", "get", "delete"):
            (clone,) = daemon.client.create_clones(image, payload=b"x")
            t0 = time.monotonic()
            if ask == "get":
                assert other.clone(clone["id"])["id"] == clone["id"]
            other.delete_clone(clone["id"])
            assert time.monotonic() - t0 < 5
            wait_settled(pool)
        assert_lane_restores(daemon, before + 3)
    finally:
        pool.discard_prepared, daemon.daemon.epoll = original_discard, original_epoll
        other.close()
