"""The VMM's HTTP API against real /dev/kvm and real VMM processes (`python -m vmm.cli --api-sock PATH`)."""
import base64
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.conftest import requires_kvm, subprocess_env, vmm_command
from vmm.api.client import ApiClient, VmmProcess
from vmm.workloads import verify_hello

pytestmark = requires_kvm


@pytest.fixture
def spawn(tmp_path):
    """Start VMM processes; at the end stop them and check none printed a traceback."""
    started = []

    def start(name: str = "vmm", extra_args=()) -> VmmProcess:
        err = open(tmp_path / f"{name}.stderr", "w+b")
        vmm = VmmProcess(str(tmp_path / f"{name}.sock"), extra_args, stdout=subprocess.DEVNULL, stderr=err)
        vmm.stderr_file = err
        started.append(vmm)
        return vmm

    yield start
    for vmm in started:
        if vmm.process.poll() is None:
            assert vmm.stop() == 0
        vmm.stderr_file.seek(0)
        stderr = vmm.stderr_file.read().decode(errors="replace")
        vmm.stderr_file.close()
        assert "Traceback" not in stderr, stderr


def started_hello(vmm: VmmProcess, vcpu_count: int = 1) -> ApiClient:
    client = vmm.client
    client.call("PUT", "/machine-config", {"vcpu_count": vcpu_count, "mem_size_mib": 128})
    client.start()
    return client


def hello(client: ApiClient, text: str, count: int) -> dict:
    request = text.encode()
    reply, meta = client.invoke(request)
    verify_hello(request, reply, count)
    assert meta["seq"] == count and meta["latency_us"] > 0
    return meta


def fault(reply) -> str:
    body = reply.json()
    assert set(body) == {"fault_message"}, body
    return body["fault_message"]


def test_configure_start_and_invoke_hello(spawn):
    vmm = spawn()
    client = vmm.client
    assert client.instance_info()["state"] == "Not started"
    client.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
    assert client.call("GET", "/machine-config")["mem_size_mib"] == 64
    client.start()
    info = client.instance_info()
    assert info["state"] == "Running" and info["app_name"] == "vmm" and info["id"] == "anonymous-instance"
    for count in (1, 2, 3):
        hello(client, f"call {count}", count)
    reply, _ = client.invoke(b"x")
    assert len(reply) == 32 and reply[:4] == b"HELO"
    config = client.call("GET", "/vm/config")
    assert config["machine-config"]["mem_size_mib"] == 64
    assert config["boot-source"]["kernel_image_path"].endswith("guest.elf")


def test_pause_queues_invocations_and_resume_answers_them(spawn):
    client = started_hello(spawn())
    hello(client, "before", 1)
    client.pause()
    client.pause()  # idempotent, as the state is already the one asked for
    assert client.instance_info()["state"] == "Paused"
    reply = client.request("PUT", "/invoke", {"payload": base64.b64encode(b"while paused").decode(),
                                              "timeout_ms": 50})
    assert reply.status == 504 and "stays pending" in fault(reply)
    assert client.invocations() == [{"seq": 2, "payload_size": 12, "state": "queued"}]
    client.resume()
    assert client.instance_info()["state"] == "Running"
    result, meta = client.wait_invocation(2)
    verify_hello(b"while paused", result, 2)
    assert client.invocations()[0]["state"] == "answered"
    hello(client, "after", 3)


def test_snapshot_needs_a_paused_vm_and_restores_in_a_new_process(spawn, tmp_path):
    client = started_hello(spawn("source"))
    for count in (1, 2):
        hello(client, f"before {count}", count)
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")
    reply = client.request("PUT", "/snapshot/create", {"snapshot_path": snap, "mem_file_path": mem})
    assert reply.status == 400 and "must be paused" in fault(reply)
    client.pause()
    reply = client.request("PUT", "/snapshot/create",
                           {"snapshot_type": "Diff", "snapshot_path": snap, "mem_file_path": mem})
    assert reply.status == 400 and "dirty page tracking" in fault(reply)
    client.create_snapshot(snap, mem)
    assert os.path.getsize(snap) > 0 and os.path.getsize(mem) >= 128 << 20
    client.resume()
    hello(client, "source continues", 3)

    restored = spawn("restored").client
    restored.load_snapshot(snap, mem, resume_vm=True)
    assert restored.instance_info()["state"] == "Running"
    assert restored.call("GET", "/machine-config")["mem_size_mib"] == 128
    hello(restored, "after restore", 3)  # the count continues from the snapshot, not from the source's 3
    hello(restored, "again", 4)
    second = restored.request("PUT", "/snapshot/load", {"snapshot_path": snap, "mem_file_path": mem})
    assert second.status == 400 and "fresh VMM process" in fault(second)
    start = restored.request("PUT", "/actions", {"action_type": "InstanceStart"})
    assert start.status == 400 and "restored" in fault(start)

    paused = spawn("paused").client
    paused.call("PUT", "/snapshot/load", {"snapshot_path": snap, "mem_file_path": mem})  # deprecated field
    assert paused.instance_info()["state"] == "Paused"
    paused.resume()
    hello(paused, "resumed later", 3)


def test_snapshot_load_is_refused_by_a_used_process(spawn, tmp_path):
    client = started_hello(spawn("source"))
    client.pause()
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")
    client.create_snapshot(snap, mem)
    reply = client.request("PUT", "/snapshot/load", {"snapshot_path": snap, "mem_backend":
                                                     {"backend_type": "File", "backend_path": mem}})
    assert reply.status == 400 and "already started its VM" in fault(reply)

    configured = spawn("configured").client
    configured.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
    reply = configured.request("PUT", "/snapshot/load", {"snapshot_path": snap, "mem_file_path": mem})
    assert reply.status == 400 and "boot-specific resources" in fault(reply)

    fresh = spawn("fresh").client
    missing = fresh.request("PUT", "/snapshot/load", {"snapshot_path": snap + ".nope", "mem_file_path": mem})
    assert missing.status == 400 and "does not exist" in fault(missing)
    both = fresh.request("PUT", "/snapshot/load", {"snapshot_path": snap, "mem_file_path": mem,
                                                   "mem_backend": {"backend_type": "File", "backend_path": mem}})
    assert both.status == 400 and "not both" in fault(both)
    uffd = fresh.request("PUT", "/snapshot/load", {"snapshot_path": snap, "mem_backend":
                                                   {"backend_type": "Uffd", "backend_path": "/nonexistent.sock"}})
    assert uffd.status == 400
    assert "page server at /nonexistent.sock" in fault(uffd)
    fresh.load_snapshot(snap, mem)  # the failed loads left the process fresh
    hello(fresh, "loaded after failures", 1)


def test_diff_snapshot_of_a_tracked_vm(spawn, tmp_path):
    client = spawn().client
    client.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": True})
    client.start()
    hello(client, "one", 1)
    client.pause()
    paths = {kind: (str(tmp_path / f"{kind}.snap"), str(tmp_path / f"{kind}.mem")) for kind in ("full", "diff")}
    client.create_snapshot(*paths["full"])
    client.resume()
    hello(client, "two", 2)
    client.pause()
    client.call("PUT", "/snapshot/create", {"snapshot_type": "Diff", "snapshot_path": paths["diff"][0],
                                            "mem_file_path": paths["diff"][1]})
    assert os.stat(paths["diff"][1]).st_blocks * 512 < os.stat(paths["full"][1]).st_blocks * 512
    fresh = spawn("fresh").client
    reply = fresh.request("PUT", "/snapshot/load", {"snapshot_path": paths["diff"][0],
                                                    "mem_file_path": paths["diff"][1]})
    assert reply.status == 400 and "Diff snapshot" in fault(reply)


def test_two_vcpu_snapshot_loads(spawn, tmp_path):
    client = started_hello(spawn("source"), vcpu_count=2)
    hello(client, "two vcpus", 1)
    client.pause()
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")
    client.create_snapshot(snap, mem)
    restored = spawn("restored").client
    restored.load_snapshot(snap, mem)
    assert restored.call("GET", "/machine-config")["vcpu_count"] == 2
    hello(restored, "restored two vcpus", 2)


def test_invocation_queued_at_snapshot_is_answered_by_the_restored_vm(spawn, tmp_path):
    source = spawn("source")
    client = started_hello(source)
    hello(client, "first", 1)
    client.pause()  # the guest answers in microseconds: pause first so the next invocation stays queued
    outcome = {}

    def invoke_in_background():
        with ApiClient(source.socket_path) as other:
            outcome["reply"] = other.request("PUT", "/invoke", {"payload": base64.b64encode(b"in the snapshot")
                                                                .decode(), "timeout_ms": 60_000})

    waiter = threading.Thread(target=invoke_in_background)
    waiter.start()
    deadline = time.monotonic() + 5
    while not client.invocations():
        assert time.monotonic() < deadline, "the background invocation never queued"
        time.sleep(0.005)
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")
    client.create_snapshot(snap, mem)
    assert source.stop() == 0  # the source VM never answers: its caller gets an error, not a hang
    waiter.join(10)
    assert not waiter.is_alive()

    restored = spawn("restored").client
    restored.load_snapshot(snap, mem, resume_vm=False)
    assert restored.invocations() == [{"seq": 2, "payload_size": 15, "state": "queued"}]
    restored.resume()
    result, meta = restored.wait_invocation(2, timeout_ms=5000)
    verify_hello(b"in the snapshot", result, 2)
    assert meta["seq"] == 2
    assert restored.invocations() == [{"seq": 2, "payload_size": 15, "state": "answered"}]
    hello(restored, "next", 3)
    missing = restored.request("PUT", "/invocations/99/wait", {"timeout_ms": 10})
    assert missing.status == 404 and "99" in fault(missing)


@pytest.mark.parametrize("method, path, body, status, words", [
    ("PUT", "/machine-config", b'{"vcpu_count": 1,', 400, "not valid JSON"),
    ("PUT", "/machine-config", b'[1, 2]', 400, "must be a JSON object"),
    ("PUT", "/machine-config", b'', 400, "no body"),
    ("PUT", "/machine-config", b'{"vcpu_count": 1, "mem_size_mib": 64, "vcpus": 2}', 400, "unknown field vcpus"),
    ("PUT", "/machine-config", b'{"mem_size_mib": 64}', 400, "missing required field vcpu_count"),
    ("PUT", "/machine-config", b'{"vcpu_count": true, "mem_size_mib": 64}', 400, "vcpu_count must be an integer"),
    ("PUT", "/machine-config", b'{"vcpu_count": 1, "mem_size_mib": 99999999}', 400, "mem_size_mib"),
    ("PUT", "/machine-config", b'{"vcpu_count": 0, "mem_size_mib": 64}', 400, "vcpu_count must be at least 1"),
    ("PUT", "/machine-config", b'{"vcpu_count": 1, "mem_size_mib": 64, "smt": true}', 400, "smt"),
    ("PUT", "/boot-source", b'{"kernel_image_path": "/nonexistent/vmlinux"}', 400, "does not exist"),
    ("PUT", "/actions", b'{"action_type": "Reboot"}', 400, "must be one of"),
    ("PUT", "/actions", b'{"action_type": "SendCtrlAltDel"}', 400, "not supported"),
    ("PATCH", "/vm", b'{"state": "Paused"}', 400, "not started"),
    ("PATCH", "/vm", b'{"state": "Stopped"}', 400, "vm.state must be one of Paused, Resumed"),
    ("PUT", "/invoke", b'{"payload": "aGk="}', 400, "not started"),
    ("PUT", "/invoke", b'{"payload": "not base64!"}', 400, "invoke.payload is not valid base64"),
    ("PUT", "/snapshot/create", b'{"snapshot_path": "a", "mem_file_path": "b"}', 400, "not started"),
    ("PUT", "/snapshot/load", b'{"snapshot_path": "a"}', 400, "missing required field mem_backend"),
    ("PUT", "/snapshot/load", b'{"snapshot_path": "a", "mem_backend": {"backend_type": "File"}}', 400,
     "snapshot/load.mem_backend: missing required field backend_path"),
    ("GET", "/nonexistent", None, 404, "no such path"),
    ("PUT", "/invocations/abc/wait", b'{}', 404, "no such path"),
    ("DELETE", "/vm", None, 405, "allowed: PATCH"),
    ("GET", "/vm", None, 405, "allowed: PATCH"),
])
def test_bad_requests_answer_a_fault_message(spawn_once, method, path, body, status, words):
    client = spawn_once.client
    reply = client.request(method, path, raw=body)
    assert reply.status == status
    assert words in fault(reply)
    if status == 405:
        assert reply.headers["Allow"] == "PATCH"
    assert client.instance_info()["state"] == "Not started"  # nothing above changed the VMM


@pytest.fixture(scope="module")
def spawn_once(tmp_path_factory):
    """One fresh VMM process shared by the bad-request cases (none of them changes its state)."""
    path = tmp_path_factory.mktemp("api")
    err = open(path / "stderr", "w+b")
    vmm = VmmProcess(str(path / "vmm.sock"), stdout=subprocess.DEVNULL, stderr=err)
    yield vmm
    assert vmm.stop() == 0
    err.seek(0)
    stderr = err.read().decode(errors="replace")
    err.close()
    assert "Traceback" not in stderr, stderr


def test_malformed_http_gets_a_json_error(spawn_once):
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(spawn_once.socket_path)
        raw.sendall(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")  # a request line too long
        answer = raw.recv(4096).decode()
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 414") and "fault_message" in json.loads(body)


def test_signal_stops_the_vm_and_removes_the_socket(tmp_path):
    path = str(tmp_path / "vmm.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on, as a killed VMM leaves behind
    vmm = VmmProcess(path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started_hello(vmm)
    taken = subprocess.run(vmm_command("--api-sock", path), env=subprocess_env(), capture_output=True, timeout=30)
    assert taken.returncode == 1 and b"another process is serving it" in taken.stderr
    vmm.client.close()
    vmm.process.send_signal(signal.SIGINT)
    assert vmm.process.wait(10) == 0
    assert b"Traceback" not in vmm.process.stderr.read()
    assert not os.path.exists(path)


def test_guest_reset_ends_the_process_and_a_fault_is_reported(spawn, tiny_guests):
    for name, status, words in (("reset", 0, ""), ("ud2", 1, "invalid opcode")):
        vmm = spawn(name)
        vmm.client.call("PUT", "/boot-source", {"kernel_image_path": tiny_guests[name]})
        vmm.client.start()
        assert vmm.process.wait(10) == status
        assert not os.path.exists(vmm.socket_path)
        vmm.stderr_file.seek(0)
        assert words in vmm.stderr_file.read().decode()


def test_cli_snapshot_restore_and_api(spawn, tmp_path):
    vmm = spawn()
    client = started_hello(vmm)
    hello(client, "one", 1)
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")

    def cli(*args):
        return subprocess.run(vmm_command(*args), env=subprocess_env(), capture_output=True, timeout=60, text=True)

    done = cli("snapshot", "--api-sock", vmm.socket_path, "--snapshot-path", snap, "--mem-file-path", mem, "--resume")
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stdout and os.path.exists(snap)
    hello(client, "source resumed", 2)

    restored = cli("restore", "--snapshot", snap, "--mem-file", mem, "--invoke", "2", "--json")
    assert restored.returncode == 0, restored.stderr
    report = json.loads(restored.stdout)
    assert report["verified"] and [r["reply"].split()[1] for r in report["invocations"]] == ["#2", "#3"]

    info = cli("api", "--api-sock", vmm.socket_path, "GET", "/")
    assert info.returncode == 0 and json.loads(info.stdout)["state"] == "Running"
    bad = cli("api", "--api-sock", vmm.socket_path, "PUT", "/machine-config", '{"vcpu_count": 1}')
    assert bad.returncode == 1 and "missing required field mem_size_mib" in bad.stdout
    spaced = cli("api", "--api-sock", vmm.socket_path, "GET", "/a b")
    assert spaced.returncode == 1 and "not a request path" in spaced.stderr and "Traceback" not in spaced.stderr
    missing = cli("restore", "--snapshot", snap + ".nope", "--mem-file", mem)
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
