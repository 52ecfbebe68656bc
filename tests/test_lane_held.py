"""The worker's side of the restore lane (snapd/csrc/lane_held.c) against a real held guest: what it serves,
what it leaves untouched for Python, and the state it hands Python when it stops half-way."""
import array
import os
import socket
import struct
import time

import pytest

from snapd.pool import protocol
from tests.conftest import requires_kvm
from snapd.pool.held_lane import EOF, FALLBACK, MESSAGE, SERVED, HeldLane
from vmm import workloads
from vmm.config import MachineConfig
from vmm.devices.fnport import FN_NEXT, FN_PORT_BASE, OFF_GENERATION
from vmm.machine import PAUSED, Microvm

IMAGE = "i-lanetest"
pytestmark = requires_kvm  # a real guest, held as worker._prepare leaves it


@pytest.fixture
def held():
    """A hello guest parked in its FN_NEXT read with the read left pending (as worker._prepare leaves it), and a
    lane armed for it on a fresh channel: (machine, lane, the daemon's end)."""
    machine = Microvm(MachineConfig(mem_size_mib=32, boot_args="workload=hello"), serial_sink=lambda d: None)
    daemon_end, worker_end = protocol.channel_pair()
    try:
        machine.boot()
        machine.wait_ready(30)
        machine.pause(complete_io=False)
        lane = HeldLane(worker_end.fileno())
        lane.arm(machine, IMAGE)
        yield machine, lane, daemon_end
    finally:
        daemon_end.close()
        worker_end.close()
        machine.close()


def generation_field(machine) -> bytes:
    return machine.memory.read(machine.fnport.mailbox_gpa + OFF_GENERATION, 40)


def test_a_lane_restore_is_answered_in_c_with_a_new_generation_and_the_first_reply(held):
    machine, lane, daemon = held
    before = generation_field(machine)
    request = workloads.hello_request("lane")
    protocol.send_raw(daemon, protocol.encode_lane_restore(7, IMAGE, 5.0, request))
    assert lane.next() == SERVED
    reply, result, fds = protocol.recv(daemon)
    assert reply["ok"] and reply["id"] == 7 and fds == []
    generation = reply["generation"]
    assert generation == lane.result.generation != 0
    field = generation_field(machine)
    assert field != before and struct.unpack_from("<Q", field)[0] == generation
    workloads.verify_hello(request, result, 1, generation)
    assert reply["invoke"]["latency_us"] > 0 and reply["total_us"] >= reply["invoke"]["latency_us"]
    assert lane.held.armed == 0, "a served clone is the request's: the lane must not serve it twice"
    # Python's records brought up to date, the vCPU given back to its thread: the guest carries on normally.
    machine.fnport.adopt(lane.result.generation, lane.result.seq)
    machine.resume()
    again = workloads.hello_request("after the lane")
    workloads.verify_hello(again, machine.invoke(again, 10), 2, generation)


def test_a_restore_without_a_payload_leaves_the_guest_held_for_its_first_invocation(held):
    machine, lane, daemon = held
    protocol.send_raw(daemon, protocol.encode_lane_restore(8, IMAGE, 5.0, None))
    assert lane.next() == SERVED
    reply, result, _ = protocol.recv(daemon)
    assert reply["ok"] and result == b""
    machine.fnport.adopt(lane.result.generation, lane.result.seq)
    request = workloads.hello_request("first")
    invocation = machine.invoke_paused(request, 5.0)  # the FN_NEXT read is still the one it parked in
    workloads.verify_hello(request, invocation.wait(0), 1, reply["generation"])


@pytest.mark.parametrize("case", ["other image", "disarmed", "payload too large", "json"])
def test_what_the_lane_cannot_take_reaches_python_untouched(held, case):
    machine, lane, daemon = held
    before = generation_field(machine)
    payload = workloads.hello_request("x")
    if case == "other image":
        protocol.send_raw(daemon, protocol.encode_lane_restore(9, "i-another", 5.0, payload))
    elif case == "disarmed":
        lane.disarm()
        protocol.send_raw(daemon, protocol.encode_lane_restore(9, IMAGE, 5.0, payload))
    elif case == "payload too large":
        payload = b"p" * (machine.fnport.req_cap + 1)
        protocol.send_raw(daemon, protocol.encode_lane_restore(9, IMAGE, 5.0, payload))
    else:
        r, w = os.pipe()
        daemon.sendmsg([protocol.encode({"op": "status", "id": 9})],
                       [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
        os.close(w)
    assert lane.next() == MESSAGE
    header, data, fds = lane.message()
    assert header["id"] == 9
    if case == "json":
        assert header["op"] == "status" and len(fds) == 1
        os.close(fds[0])
        os.close(r)
    else:
        assert header["op"] == "restore" and header["lane"] and data == payload and fds == []
    assert generation_field(machine) == before, "the lane wrote guest memory for a message it did not take"
    assert machine.state == PAUSED and machine.io_left_pending


def test_an_exit_the_lane_does_not_handle_goes_to_python_with_the_invocation_in_flight(held):
    machine, lane, daemon = held
    lane.held.fn_done_port = FN_PORT_BASE + 0xE  # the guest's real FN_DONE is now an exit the lane leaves
    request = workloads.hello_request("fallback")
    protocol.send_raw(daemon, protocol.encode_lane_restore(10, IMAGE, 5.0, request))
    assert lane.next() == FALLBACK
    res = lane.result
    assert res.exit_pending == 1 and res.run_errno == 0 and res.id == 10
    invocation = machine.fnport.adopt(res.generation, res.seq, lane.payload())
    machine.continue_paused(invocation, res.deadline_ns / 1e9, machine.runners[0].dispatch_pending_exit)
    workloads.verify_hello(request, invocation.wait(0), 1, res.generation)


def test_a_deadline_already_past_hands_the_undisturbed_invocation_to_python(held):
    machine, lane, daemon = held
    request = workloads.hello_request("late")
    protocol.send_raw(daemon, protocol.encode_lane_restore(11, IMAGE, 0.0, request))
    assert lane.next() == FALLBACK
    res = lane.result
    assert res.exit_pending == 0
    invocation = machine.fnport.adopt(res.generation, res.seq, lane.payload())
    machine.continue_paused(invocation, time.monotonic() + 5.0)
    workloads.verify_hello(request, invocation.wait(0), 1, res.generation)


def restore_served(machine, lane, daemon, request: bytes) -> int:
    """A lane restore with ``request`` as the first invocation, its records taken as worker._lane_served does;
    the clone's generation."""
    protocol.send_raw(daemon, protocol.encode_lane_restore(1, IMAGE, 5.0, request))
    assert lane.next() == SERVED
    reply, result, _ = protocol.recv(daemon)
    workloads.verify_hello(request, result, 1, reply["generation"])
    machine.fnport.adopt(lane.result.generation, lane.result.seq)
    return reply["generation"]


def test_after_its_reply_the_guest_is_parked_in_fn_next_again_and_later_invocations_are_served_in_c(held):
    machine, lane, daemon = held
    generation = restore_served(machine, lane, daemon, workloads.hello_request("first"))
    assert lane.result.parked == 1 and lane.result.exit_pending == 0
    assert machine.runners[0].pending_port_read() == FN_PORT_BASE + FN_NEXT, "not parked in its FN_NEXT read"
    lane.arm(machine, IMAGE, live=True)
    field = generation_field(machine)
    requests = [workloads.hello_request(f"live {i}" + "x" * i) for i in range(3)]
    for i, request in enumerate(requests):
        protocol.send_raw(daemon, protocol.encode_lane_invoke(20 + i, IMAGE, 5.0, request))
    protocol.send_raw(daemon, protocol.encode({"op": "status", "id": 30}))
    assert lane.next() == MESSAGE, "the lane must serve the live invocations in a row and stop at the status"
    assert lane.message()[0]["op"] == "status"
    for i, request in enumerate(requests):
        reply, result, _ = protocol.recv(daemon)
        assert reply["ok"] and reply["id"] == 20 + i and reply["generation"] == generation
        workloads.verify_hello(request, result, 2 + i, generation)
    assert generation_field(machine) == field, "an invocation must not change the clone's generation or entropy"
    served, seq, written = lane.take_live()
    assert (served, seq, written) == (3, machine.fnport.seq + 3, max(map(len, requests)))
    assert lane.take_live()[0] == 0, "taken records are zeroed"
    machine.fnport.adopt(generation, seq)
    # Python's own path takes over from the parked read: the guest carries on with the right sequence numbers.
    last = workloads.hello_request("python")
    workloads.verify_hello(last, machine.invoke_paused(last, 5.0).wait(0), 5, generation)


@pytest.mark.parametrize("case", ["not live", "a restore for a live clone"])
def test_a_live_invocation_the_lane_cannot_take_reaches_python(held, case):
    machine, lane, daemon = held
    request = workloads.hello_request("x")
    if case == "not live":  # armed for the prepared clone's restore, not for invocations
        protocol.send_raw(daemon, protocol.encode_lane_invoke(40, IMAGE, 5.0, request))
    else:
        restore_served(machine, lane, daemon, workloads.hello_request("first"))
        lane.arm(machine, IMAGE, live=True)
        protocol.send_raw(daemon, protocol.encode_lane_restore(40, IMAGE, 5.0, request))
    assert lane.next() == MESSAGE
    header, data, _ = lane.message()
    assert header["id"] == 40 and data == request
    assert header["op"] == ("invoke" if case == "not live" else "restore")


def test_a_live_invocation_past_its_deadline_is_handed_to_python_in_flight(held):
    machine, lane, daemon = held
    generation = restore_served(machine, lane, daemon, workloads.hello_request("first"))
    lane.arm(machine, IMAGE, live=True)
    request = workloads.hello_request("late")
    protocol.send_raw(daemon, protocol.encode_lane_invoke(50, IMAGE, 0.0, request))
    assert lane.next() == FALLBACK
    res = lane.result
    assert res.flags & protocol.LANE_FLAG_LIVE and res.generation == generation
    invocation = machine.fnport.adopt(res.generation, res.seq, lane.payload())
    machine.continue_paused(invocation, time.monotonic() + 5.0)
    workloads.verify_hello(request, invocation.wait(0), 2, generation)


def test_python_parks_a_held_guest_in_fn_next_again_after_an_invocation(held):
    """Microvm.hold_at_next, the worker's way back to the parked read after an invocation it ran itself."""
    machine, _, _ = held
    for count in (1, 2, 3):
        request = workloads.hello_request(f"held {count}")
        workloads.verify_hello(request, machine.invoke_paused(request, 5.0).wait(0), count)
        assert machine.runners[0].pending_port_read() is None  # left after its FN_DONE
        assert machine.hold_at_next(time.monotonic() + 5.0)
        assert machine.state == PAUSED and machine.io_left_pending
        assert machine.runners[0].pending_port_read() == FN_PORT_BASE + FN_NEXT
    machine.resume()  # the parked read answers "retry": the guest asks again, through its vCPU thread
    request = workloads.hello_request("thread")
    workloads.verify_hello(request, machine.invoke(request, 10), 4)


def test_the_daemon_closing_the_channel_is_eof(held):
    _, lane, daemon = held
    daemon.close()
    assert lane.next() == EOF


def test_the_lane_structs_match_the_python_codecs():
    from snapd._lane_native import ffi
    assert ffi.sizeof("struct lane_restore_msg") == protocol.LANE_RESTORE.size
    assert ffi.sizeof("struct lane_reply_msg") == protocol.LANE_REPLY.size
    message = protocol.encode_lane_restore(5, IMAGE, 1.5, b"abc")
    header, data, _ = protocol.decode(message, [])
    assert header == {"op": "restore", "prepared": True, "lane": True, "id": 5, "timeout": 1.5, "image": IMAGE,
                      "invoke": True} and data == b"abc"
    failed = protocol.encode_lane_reply({"ok": True, "id": 3, "invoke": {"ok": False, "kind": "timeout",
                                                                         "error": "no reply"}}, b"")
    assert protocol.decode(failed, [])[0] == {"ok": False, "id": 3, "kind": "timeout", "error": "no reply"}
    header, data, _ = protocol.decode(protocol.encode_lane_invoke(6, IMAGE, 2.0, b"xyz"), [])
    assert header == {"op": "invoke", "lane": True, "id": 6, "timeout": 2.0} and data == b"xyz"
    invoked = protocol.encode_lane_reply({"ok": True, "id": 6, "latency_us": 12.0}, b"out")
    reply, data, _ = protocol.decode(invoked, [])
    assert reply["ok"] and reply["invoke"]["latency_us"] == 12.0 and data == b"out"
