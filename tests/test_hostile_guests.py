"""Hostile guests (issue #12): each one a real snapshot registered with a real daemon, each hostile clone beside a
normal hello clone that must keep answering correctly. The guest is tests/guests/hostile.c (what each request
makes it do is listed there); tests/guests/hostile_guest.py builds and snapshots it.

Contained means: the worker never dies of the guest's data (a guest-caused failure is a clean clone failure or a
refused invocation), the VMM and the C lane range-check every value the guest controls, the API stays
responsive, an invocation with timeout_ms T ends within T + REPLY_GRACE_S, and a flooding guest buffers
nothing without bound. A state file that carries such a mailbox is refused at registration (400) or the clone
that would run it fails cleanly.
"""
import base64
import dataclasses
import os
import struct
import threading
import time

import pytest

from snapd.client import SnapdClient, SnapdError
from snapd.daemon.clones import REPLY_GRACE_S
from snapd.snapfile import save_state
from tests.conftest import requires_kvm
from tests.daemon_helpers import RunningDaemon, hello_snapshot
from tests.guests import hostile_guest
from vmm import workloads
from vmm.config import MachineConfig
from vmm.devices import serial
from vmm.devices.bus import PortIoBus
from vmm.devices.fnport import FN_ID_VALUE, FunctionPort, FunctionPortState
from vmm.devices.i8042 import I8042State
from vmm.devices.serial import SerialState
from vmm.errors import InvocationError
from vmm.machine import Microvm
from vmm.snapshot import SnapshotError, load_snapshot_file_backed, read_snapshot

pytestmark = requires_kvm
MEM_PAGES = (64 << 20) >> 12  # the guests' 64 MiB, in pages


# -- the checks themselves, without a guest
def forged(cls, **fields):
    """A state dataclass with ``fields`` as given, past its own validation (what a crafted state file holds)."""
    obj = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    return obj


GOOD_PORT = dict(mailbox_pfn=0x105, req_cap=8064, resp_cap=8192, seq=3, generation=7, in_flight_seq=0,
                 in_flight_payload=b"", queued=())
BAD_PORTS = {
    "caps past the mailbox limit": dict(req_cap=0xFFFFFFFF),
    "a negative capacity": dict(resp_cap=-1),
    "caps that wrap 32 bits": dict(req_cap=0x80000000, resp_cap=0x80000000),
    "a pfn past 32 bits": dict(mailbox_pfn=1 << 40),
    "a negative pfn": dict(mailbox_pfn=-1),
    "caps without a mailbox": dict(mailbox_pfn=0),
    "a negative generation": dict(generation=-1),
    "a sequence number about to wrap": dict(seq=(1 << 64) - 1),
    "an in-flight seq past seq": dict(in_flight_seq=9),
    "a payload longer than any mailbox": dict(queued=(b"x" * (1 << 20),)),
}


@pytest.mark.parametrize("bad", BAD_PORTS.values(), ids=BAD_PORTS.keys())
def test_a_function_port_state_out_of_range_is_refused(bad):
    FunctionPortState(**GOOD_PORT)
    with pytest.raises(ValueError):
        FunctionPortState(**{**GOOD_PORT, **bad})


def test_uart_and_i8042_states_out_of_range_are_refused():
    good = dict(dll=12, dlm=0, ier=0, lcr=3, mcr=8, scr=0, fcr=0, thr_interrupt_pending=False, rx_buffer=b"")
    SerialState(**good)
    for bad in (dict(lcr=0x100), dict(ier=-1), dict(rx_buffer=b"x" * (64 * 1024 + 1))):
        with pytest.raises(ValueError):
            SerialState(**{**good, **bad})
    with pytest.raises(ValueError):
        I8042State(0xFE + 0x100)


def test_the_bus_cuts_every_value_to_its_size_and_the_function_port_takes_only_single_4_byte_accesses():
    class Wide:  # a device that answers more bits than asked, and records what it is given
        def __init__(self):
            self.writes = []

        def io_read(self, offset, size):
            return 0x1234_5678_9ABC

        def io_write(self, offset, size, value):
            self.writes.append((size, value))

    bus, wide = PortIoBus(), Wide()
    bus.register(wide, 0x100, 1)
    assert [bus.read(0x100, size) for size in (1, 2, 4)] == [0xBC, 0x9ABC, 0x5678_9ABC]
    bus.write(0x100, 1, 0x1FF)
    assert wide.writes == [(1, 0xFF)]

    port = FunctionPort(memory=None)
    bus.register(port, 0xF40, 16)
    assert bus.read(0xF40, 4) == FN_ID_VALUE
    assert (bus.read(0xF40, 1), bus.read(0xF40, 2), bus.read(0xF41, 2)) == (0xFF, 0xFFFF, 0xFFFF)
    assert bus.read(0xF40, 4, count=2) == 0xFFFFFFFF  # string I/O is not the protocol
    bus.write(0xF44, 1, 0x12)  # an outb of FN_MAILBOX: not a registration (it would need memory)
    bus.write(0xF4C, 2, 0x20)  # an outw of FN_DONE: nothing in flight, nothing happens either way
    assert port.mailbox_error is None and not port.mailbox_gpa


# -- the VMM alone: a flood held to its console allowance, a silent guest's callers not piling up
@pytest.fixture
def hostile_vm():
    out = bytearray()
    machine = Microvm(MachineConfig(mem_size_mib=64, kernel_image=hostile_guest.build()), serial_sink=out.extend)
    try:
        machine.boot()
        machine.wait_ready(10)
        yield machine, out
    finally:
        machine.close()


def test_a_flooding_guest_is_held_to_its_console_allowance(monkeypatch, hostile_vm):
    monkeypatch.setattr(serial, "TX_BURST", 8192)  # a smaller burst than 256 KiB, so the test needs no minute
    monkeypatch.setattr(serial, "TX_RATE", 4096)
    machine, out = hostile_vm
    machine.serial.tx_tokens = serial.TX_BURST  # the UART was built with the real one
    with pytest.raises(InvocationError, match="no reply within"):
        machine.invoke(b"flood", timeout=0.2)
    time.sleep(1.5)  # past its burst
    before, t0 = len(out), time.monotonic()
    time.sleep(2.0)
    rate = (len(out) - before) / (time.monotonic() - t0)
    assert 1024 < rate < 2 * serial.TX_RATE, rate  # unthrottled it writes ~20 KB/s here, one exit per byte
    t0 = time.monotonic()
    machine.pause()  # a throttled vCPU still pauses at once
    assert time.monotonic() - t0 < 0.1


def test_callers_that_give_up_on_a_silent_guest_leave_nothing_queued(hostile_vm):
    machine, _ = hostile_vm
    with pytest.raises(InvocationError, match="no reply within"):
        machine.invoke(b"spin", timeout=0.1)
    for i in range(50):
        with pytest.raises(InvocationError, match="no reply within"):
            machine.invoke(b"echo %d" % i, timeout=0.005)
    assert not machine.fnport.queue and machine.fnport.in_flight is not None


# -- real guests, a real daemon
@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    hostile_guest.build()
    return {"dir": tmp, "hostile": hostile_guest.snapshot(str(tmp), "hostile"),
            "nomailbox": hostile_guest.snapshot(str(tmp), "nomailbox", "workload=nomailbox"),
            "hello": hello_snapshot(tmp)}


class Env:
    def __init__(self, daemon: RunningDaemon, images: dict, snapshots: dict):
        self.daemon, self.client, self.images, self.snapshots = daemon, daemon.client, images, snapshots
        self.hello = self.client.create_clones(images["hello"], payload=b"hello 0")[0]
        workloads.verify_hello(b"hello 0", self.hello["result"], 1)
        self.hello_count = 1
        self.lock = threading.Lock()

    def hello_answers(self, client: SnapdClient | None = None) -> float:
        """The hello clone answers correctly: seconds it took."""
        with self.lock:
            self.hello_count += 1
            request = f"hello {self.hello_count}".encode()
            t0 = time.monotonic()
            reply = (client or self.client).invoke(self.hello["id"], request)
            elapsed = time.monotonic() - t0
            workloads.verify_hello(request, reply, self.hello_count)
        return elapsed

    def clone(self) -> dict:
        return self.client.create_clones(self.images["hostile"])[0]

    def invoke(self, clone_id: str, request: str, timeout_ms: int = 2000) -> tuple[int, dict, float]:
        """(status, body, seconds) of one invocation of ``clone_id``."""
        body = {"payload": base64.b64encode(request.encode()).decode(), "timeout_ms": timeout_ms}
        t0 = time.monotonic()
        reply = self.client.request("POST", f"/v1/clones/{clone_id}/invoke", body)
        return reply.status, reply.json() or {}, time.monotonic() - t0

    def create(self, request: str, timeout_ms: int = 2000) -> tuple[int, dict, float]:
        """(status, body, seconds) of POST /v1/clones whose first invocation is ``request`` (a clone made is
        deleted)."""
        body = {"image": self.images["hostile"], "payload": base64.b64encode(request.encode()).decode(),
                "timeout_ms": timeout_ms}
        t0 = time.monotonic()
        reply = self.client.request("POST", "/v1/clones", body)
        elapsed = time.monotonic() - t0
        out = reply.json() or {}
        if reply.status == 201:
            self.client.delete_clone(out["clones"][0]["id"])
            out = out["clones"][0]
        return reply.status, out, elapsed

    def state(self, clone_id: str) -> str:
        return self.client.clone(clone_id)["state"]


@pytest.fixture(scope="module", params=["lane", "python"])
def env(request, snapshots):
    """One daemon per mode: the restore lane on (first and later invocations answered in C where they can be) or
    off (Python all the way)."""
    daemon = RunningDaemon(str(snapshots["dir"] / f"state-{request.param}"), pool_size=1,
                           lane=request.param == "lane")
    try:
        images = {name: daemon.client.register_image(*snapshots[name])["id"]
                  for name in ("hostile", "nomailbox", "hello")}
        yield Env(daemon, images, snapshots)
    finally:
        daemon.close()


def result_of(body: dict) -> bytes:
    return base64.b64decode(body["result"])


def worker_status(pid: int) -> tuple[int, float]:
    """(resident KiB, CPU seconds) of a worker process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Requests that corrupt the function port's protocol; each leaves the guest working (it registers its real
# mailbox again where it broke it). Expected: (status, what the reply or error holds).
ODD_VALUES = struct.pack("<9I", 0xFF, 0xFFFF, 0xFF, 0xFFFF, 0xFFFF, 0xFF, 0xFFFFFFFF, 0xFFFFFFFF, FN_ID_VALUE)
PROTOCOL_ABUSE = {
    "odd": (201, b"ODD!" + ODD_VALUES),  # odd-sized and string accesses read all ones, do nothing
    "done 0xffffffff": (400, "more than its 8192-byte reply area"),
    "done 0x80000000": (400, "more than its 8192-byte reply area"),
    "done 8193": (400, "more than its 8192-byte reply area"),
    "done 8192": (201, b"DONE"),
    "done-twice": (201, b"TWO1"),  # the two FN_DONE after it (no FN_NEXT before them) are ignored
    "caps": (201, b"CAPS"),  # capacities rewritten in guest memory: the registered ones still hold
    "abandon": (400, "guest abandoned invocation"),
    "mbox 0xffffffff 8064 8192": (400, "outside guest memory"),
    f"mbox {MEM_PAGES} 8064 8192": (400, "outside guest memory"),
    f"mbox {MEM_PAGES - 1} 8064 8192": (400, "which do not fit"),  # crosses the end of guest memory
    "mbox 0x300 0x80000000 0x80000000": (400, "which do not fit"),
    "mbox 0x300 0xffffffff 0": (400, "which do not fit"),
    "mbox 0x300 0 0xfffffff0": (400, "which do not fit"),
    "mbox 0x300 0x7fff0 0x7fff0": (400, "which do not fit"),  # under 4 GiB, over the 1 MiB limit
    "mbox 0x300 8064 8192 0x12345678": (400, "has magic 0x12345678"),
    "mbox 0 8064 8192": (400, "page 0"),
    "mbox 0x300 0 0": (400, "more than its 0-byte reply area"),  # a valid, empty mailbox: no room to reply
}


def check_answer(status: int, body: dict, expected: tuple[int, object], what: str) -> None:
    """``expected``'s 201 (a clone made) stands for 200 too (an invocation answered)."""
    want_status, want = expected
    if want_status == 201:
        assert status in (200, 201) and result_of(body).startswith(want), (what, status, body)
    else:
        assert status == want_status and want in body.get("fault_message", ""), (what, status, body)


def test_protocol_abuse_is_refused_or_answered_and_the_guest_goes_on(env):
    clone = env.clone()
    try:
        for request, expected in PROTOCOL_ABUSE.items():
            # As a live clone's invocation, then as the first invocation of a restore (the lane's two paths).
            status, body, elapsed = env.invoke(clone["id"], request)
            check_answer(status, body, expected, request)
            assert elapsed < 2.0, (request, elapsed)
            # A request that broke or shrank the mailbox is answered (refused) at once; the guest registers its
            # real one again right after, and until it has, an invocation is refused too: asked again until then.
            deadline = time.monotonic() + 2.0
            while True:
                status, body, _ = env.invoke(clone["id"], f"echo after {request}")
                if status != 400 or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            assert status == 200 and result_of(body) == f"ECHOecho after {request}".encode(), (request, body)
            status, body, _ = env.create(request)
            check_answer(status, {"result": body.get("result", "")} if status == 201 else body, expected, request)
        # The capacities taken at registration hold, whatever the guest wrote over them.
        assert env.invoke(clone["id"], "echo " + "x" * (8064 - 5))[0] == 200
        status, body, _ = env.invoke(clone["id"], "echo " + "x" * (8064 - 4))
        assert status == 400 and "at most 8064" in body["fault_message"], body
        assert env.state(clone["id"]) == "running"
        env.hello_answers()
    finally:
        env.client.delete_clone(clone["id"])


def test_a_guest_without_a_mailbox_has_every_invocation_refused_at_once(env):
    # The nomailbox guest registered only a mailbox the VMM refused (its snapshot holds none).
    request = {"image": env.images["nomailbox"], "payload": base64.b64encode(b"echo").decode(), "timeout_ms": 5000}
    t0 = time.monotonic()
    reply = env.client.request("POST", "/v1/clones", request)
    assert reply.status == 400 and "mailbox" in reply.json()["fault_message"], reply.json()
    assert time.monotonic() - t0 < 2.0
    clone = env.client.create_clones(env.images["nomailbox"])[0]
    try:
        status, body, elapsed = env.invoke(clone["id"], "echo", timeout_ms=5000)
        assert status == 400 and "mailbox" in body["fault_message"] and elapsed < 2.0, (status, body, elapsed)
    finally:
        env.client.delete_clone(clone["id"])
    env.hello_answers()


PORT_RANGES = [(0, 0x100), (0x3F0, 0x10), (0xCF8, 8), (0xF40, 0x10), (0xFFF0, 0x10)]


def test_random_values_to_the_ports_of_every_device(env):
    """In and out, widths 1, 2 and 4, on every port of the devices the VMM and KVM model (PIC, PIT, i8042, port
    0x61, COM1, PCI config, the function port) and the last ports below 0x10000; then the guest still answers.
    (All 65536 ports: test_random_values_to_every_port, marked slow.)"""
    clone = env.clone()
    try:
        for first, count in PORT_RANGES:
            status, body, _ = env.invoke(clone["id"], f"ports {first} {count}", timeout_ms=10_000)
            assert status == 200, (first, body)
            reply = result_of(body)
            assert reply[:4] == b"PORT" and struct.unpack_from("<I", reply, 4)[0] == hostile_guest.sweep_accesses(
                first, count), reply
        assert env.invoke(clone["id"], "echo still")[0] == 200
        assert env.state(clone["id"]) == "running"
        env.hello_answers()
    finally:
        env.client.delete_clone(clone["id"])


@pytest.mark.slow
def test_random_values_to_every_port(env):
    clone = env.clone()
    try:
        status, body, elapsed = env.invoke(clone["id"], "ports 0 65536", timeout_ms=120_000)
        assert status == 200, body
        assert struct.unpack_from("<I", result_of(body), 4)[0] == hostile_guest.sweep_accesses(0, 0x10000)
        assert env.invoke(clone["id"], "echo still")[0] == 200
        env.hello_answers()
    finally:
        env.client.delete_clone(clone["id"])


@pytest.mark.parametrize("request_", ["triple", "halt"])
def test_a_triple_fault_fails_that_clone_only(env, request_):
    status, body, elapsed = env.create(request_)
    assert status == 502 and "triple-faulted" in body["fault_message"], body
    clone = env.clone()
    try:
        status, body, elapsed = env.invoke(clone["id"], request_)
        # The worker answers "the VM stopped" (kind vmm): the clone is failed with that reason, and every later
        # invocation is refused at once.
        assert status == 502 and "triple-faulted" in body["fault_message"], body
        assert env.client.request("GET", f"/v1/clones/{clone['id']}").json()["state"] == "failed"
        status, body, elapsed = env.invoke(clone["id"], "echo")
        assert status == 502 and "triple-faulted" in body["fault_message"] and elapsed < 1.0, body
    finally:
        env.client.delete_clone(clone["id"])
    env.hello_answers()


@pytest.mark.parametrize("request_", ["spin", "silent", "flood", "flood-rep"])
def test_a_guest_that_never_answers_is_bounded_by_the_timeout_and_the_api_stays_responsive(env, request_):
    """The first invocation (restore) and a live clone's: each ends within timeout_ms + REPLY_GRACE_S; meanwhile
    the hello clone answers and the API lists clones; afterwards the clone, still misbehaving on its own vCPU
    thread, holds no growing buffer, and its next invocation is bounded the same way."""
    timeout_ms = 400
    bound = timeout_ms / 1e3 + REPLY_GRACE_S
    status, body, elapsed = env.create(request_, timeout_ms=timeout_ms)
    assert status == 504 and elapsed < bound, (status, body, elapsed)
    clone = env.clone()
    try:
        outcome = {}

        def hostile_call():
            with SnapdClient(env.daemon.socket_path) as other:
                body = {"payload": base64.b64encode(request_.encode()).decode(), "timeout_ms": timeout_ms}
                t0 = time.monotonic()
                reply = other.request("POST", f"/v1/clones/{clone['id']}/invoke", body)
                outcome.update(status=reply.status, elapsed=time.monotonic() - t0)

        thread = threading.Thread(target=hostile_call)
        thread.start()
        answers = []
        with SnapdClient(env.daemon.socket_path) as mine:
            while thread.is_alive():
                answers.append(env.hello_answers(mine))
                t0 = time.monotonic()
                mine.clones()
                answers.append(time.monotonic() - t0)
        thread.join()
        assert outcome["status"] == 504 and outcome["elapsed"] < bound, outcome
        assert answers and max(answers) < 0.5, answers
        # Still misbehaving on its vCPU thread: nothing it does is kept.
        rss0, cpu0 = worker_status(clone["pid"])
        time.sleep(1.0)
        rss1, cpu1 = worker_status(clone["pid"])
        assert rss1 - rss0 < 2048, (rss0, rss1)  # KiB
        status, body, elapsed = env.invoke(clone["id"], "echo", timeout_ms=timeout_ms)
        assert status == 504 and elapsed < bound, (status, body, elapsed)
        env.hello_answers()
    finally:
        t0 = time.monotonic()
        env.client.delete_clone(clone["id"])
        assert time.monotonic() - t0 < 5.0


# -- state files that carry such a mailbox
STATE_FILE_PORTS = {  # refused when the image is registered
    "caps past the mailbox limit": dict(req_cap=0xFFFFFFFF),
    "a negative capacity": dict(resp_cap=-1),
    "a pfn past 32 bits": dict(mailbox_pfn=1 << 40),
    "an in-flight invocation past seq": dict(in_flight_seq=1 << 62),
}
STATE_FILE_MEMORY = {  # needs guest memory's size: the mailbox is dropped at restore, every invocation refused
    "a mailbox past guest memory": dict(mailbox_pfn=MEM_PAGES + 16),
    "a mailbox across its end": dict(mailbox_pfn=MEM_PAGES - 1),
}


def forged_state(snapshots: dict, name: str, **port) -> tuple[str, str]:
    """The hostile snapshot's state with its function port's fields replaced, written with the real writer
    (checksummed); the memory file is the snapshot's."""
    state_path, mem_path = snapshots["hostile"]
    state = read_snapshot(state_path)
    fnport = forged(FunctionPortState, **{**dataclasses.asdict(state.devices.fnport), **port})
    path = str(snapshots["dir"] / f"{name.replace(' ', '-')}.state")
    save_state(path, dataclasses.replace(state, devices=dataclasses.replace(state.devices, fnport=fnport)))
    return path, mem_path


def test_a_state_file_with_a_bad_mailbox_is_refused_or_contained_by_the_vmm(snapshots):
    for name, port in STATE_FILE_PORTS.items():
        state, mem = forged_state(snapshots, "vmm " + name, **port)
        with pytest.raises(SnapshotError) as refused:
            load_snapshot_file_backed(state, mem, resume=False, serial_sink=lambda data: None)
        assert "FunctionPortState" in str(refused.value), (name, refused.value)
    for name, port in STATE_FILE_MEMORY.items():
        state, mem = forged_state(snapshots, "vmm " + name, **port)
        machine = load_snapshot_file_backed(state, mem, serial_sink=lambda data: None)
        try:
            with pytest.raises(InvocationError, match="not inside guest memory"):
                machine.invoke(b"echo", timeout=5)
        finally:
            machine.close()


def test_a_state_file_with_a_bad_mailbox_is_refused_or_contained_by_the_daemon(env):
    client = env.client
    for name, port in STATE_FILE_PORTS.items():
        state, mem = forged_state(env.snapshots, name, **port)
        reply = client.request("POST", "/v1/images", {"state_path": state, "mem_path": mem})
        assert reply.status == 400 and "FunctionPortState" in reply.json()["fault_message"], (name, reply.json())
    for name, port in STATE_FILE_MEMORY.items():
        state, mem = forged_state(env.snapshots, name, **port)
        image = client.register_image(state, mem)["id"]
        try:
            payload = base64.b64encode(b"echo").decode()
            t0 = time.monotonic()
            reply = client.request("POST", "/v1/clones", {"image": image, "payload": payload})
            assert reply.status == 400 and "not inside guest memory" in reply.json()["fault_message"], reply.json()
            clone = client.create_clones(image)[0]
            try:
                status, body, _ = env.invoke(clone["id"], "echo")
                assert status == 400 and "not inside guest memory" in body["fault_message"], body
            finally:
                client.delete_clone(clone["id"])
            assert time.monotonic() - t0 < 5.0, name
        finally:
            client.delete_image(image)
        env.hello_answers()
