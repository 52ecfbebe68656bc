"""The VMM's API as Firecracker's clients use it (issue #12), held to Firecracker's own published API document
(tests/firecracker/firecracker.yaml, v1.16.1; tests/firecracker/README.md says where it comes from).

Two parts. schemathesis drives every operation of that document this VMM serves against a started
`vmm --api-sock` (over its Unix socket), bounded in examples and time: no 5xx, every status one the document
declares for the operation (or 405 with an Allow header for a method it does not declare), bodies that validate,
schema-invalid requests refused with a 4xx, and the VMM still answering afterwards. Then direct tests of each
point of the issue: Firecracker's ranges (vcpu_count 1..32, also in a state file), GET /version, every field
of snapshot/load and machine-config accepted, honoured or refused as "not supported by this VMM", 405/404.
"""
import base64
import importlib.metadata
import json
import os
import socket
import subprocess
import time

import pytest

from tests.conftest import ROOT, requires_kvm
from vmm.api.client import VmmProcess

schemathesis = pytest.importorskip("schemathesis")  # the test extra (pyproject.toml)
import jsonschema_rs  # noqa: E402  (schemathesis's validator)
import requests  # noqa: E402  (schemathesis's transport)
import urllib3  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402

FIRECRACKER_YAML = os.path.join(ROOT, "tests", "firecracker", "firecracker.yaml")
GUEST = os.path.join(ROOT, "vmm", "guest", "guest.elf")

# The operations of Firecracker's document this VMM serves. The others are skipped: it has no block, pmem,
# network, vsock, entropy or serial-output device (/drives, /pmem, /network-interfaces, /vsock, /entropy,
# /serial), no balloon (/balloon...), no memory hot-plug (/hotplug/memory), no MMDS (/mmds...), no logger or
# metrics configuration (/logger, /metrics) and no custom CPU templates (/cpu-config): each answers 404 here.
SERVED = {("GET", "/"), ("GET", "/version"), ("PUT", "/actions"), ("PUT", "/boot-source"),
          ("GET", "/machine-config"), ("PUT", "/machine-config"), ("PATCH", "/machine-config"),
          ("PUT", "/snapshot/create"), ("PUT", "/snapshot/load"), ("PATCH", "/vm"), ("GET", "/vm/config")}
# Operations fuzzed against a VM that is started and paused (the others against a fresh process, where
# configuration and snapshot/load are allowed).
ON_A_STARTED_VM = {("PUT", "/snapshot/create"), ("PATCH", "/vm"), ("GET", "/"), ("GET", "/version"),
                   ("GET", "/machine-config"), ("GET", "/vm/config")}
# The file paths of the bodies: what the fuzzer invents is put inside the test's directory (characters kept, a
# '/' made '_'), so a snapshot it creates lands there and is removed, and nothing outside is touched.
PATH_FIELDS = {"snapshot_path", "mem_file_path", "kernel_image_path", "initrd_path", "backend_path", "uds_path"}
MAX_EXAMPLES = 25  # per operation, in the fuzzing phase (the coverage phase adds its own deterministic cases)
TIME_BOUND_S = 45  # the whole schemathesis run, every operation, VMM start-ups included
CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance, st_checks.content_type_conformance,
          st_checks.response_headers_conformance, st_checks.response_schema_conformance,
          st_checks.negative_data_rejection, st_checks.unsupported_method, st_checks.allow_header_conformance]
# positive_data_acceptance is not among them: a schema-valid request is refused (400, a status the document
# declares for it) when the VM's state does not allow it or when it names a file that does not exist.

schema = schemathesis.openapi.from_path(FIRECRACKER_YAML).include(
    lambda ctx: (ctx.operation.method.upper(), ctx.operation.path) in SERVED)


def partial_machine_config_validator():
    """Firecracker's MachineConfiguration with no field required (what its PATCH takes), at least one field."""
    definitions = schema.raw_schema["definitions"]
    body = json.loads(json.dumps(definitions["MachineConfiguration"]))
    body.pop("required")
    body["properties"]["cpu_template"] = definitions["CpuTemplate"]
    body["minProperties"] = 1
    return jsonschema_rs.validator_for(body)


PARTIAL_MACHINE_CONFIG = partial_machine_config_validator()
RUN = {"requests": 0, "operations": set(), "statuses": {}, "by_operation": {}, "started": None, "seconds": 0.0}


# -- requests (schemathesis's transport) over the VMM's Unix socket
class UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, *args, socket_path: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.socket_path)
        return sock


class UnixPool(urllib3.HTTPConnectionPool):
    ConnectionCls = UnixConnection


class UnixAdapter(requests.adapters.HTTPAdapter):
    """Every request of the session it is mounted on goes to one Unix socket, whatever the URL's host."""

    def __init__(self, socket_path: str):
        super().__init__(max_retries=0)
        self.pool = UnixPool("localhost", socket_path=socket_path, maxsize=2)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return self.pool

    def close(self) -> None:
        self.pool.close()
        super().close()


BASE_URL = "http://vmm"


def unix_session(socket_path: str) -> requests.Session:
    session = requests.Session()
    session.mount(BASE_URL + "/", UnixAdapter(socket_path))
    return session


def contain_paths(value, directory: str):
    if isinstance(value, dict):
        return {k: (os.path.join(directory, "fz-" + v.replace("/", "_")) if k in PATH_FIELDS and isinstance(v, str)
                    else contain_paths(v, directory)) for k, v in value.items()}
    if isinstance(value, list):
        return [contain_paths(v, directory) for v in value]
    return value


def start_vmm(directory, started: bool) -> VmmProcess:
    err = open(os.path.join(directory, "stderr"), "w+b")
    vmm = VmmProcess(os.path.join(directory, "fc.sock"), stdout=subprocess.DEVNULL, stderr=err)
    vmm.stderr_file = err
    if started:
        vmm.client.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
        vmm.client.start()
        vmm.client.pause()
    return vmm


def stop_vmm(vmm: VmmProcess) -> str:
    assert vmm.process.poll() is None, "the VMM exited during the run"
    assert vmm.stop() == 0
    vmm.stderr_file.seek(0)
    stderr = vmm.stderr_file.read().decode(errors="replace")
    vmm.stderr_file.close()
    return stderr


@pytest.fixture
def fuzzed_vmm(request, tmp_path):
    """A VMM process for one operation's run: fresh, or with a started and paused 32 MiB VM."""
    operation = request.node.callspec.id if hasattr(request.node, "callspec") else request.node.name
    started = any(f"{method} {path}]" in request.node.name for method, path in ON_A_STARTED_VM)
    if RUN["started"] is None:
        RUN["started"] = time.monotonic()
    vmm = start_vmm(str(tmp_path), started)
    session = unix_session(vmm.socket_path)
    yield vmm, session, str(tmp_path)
    session.close()
    reply = vmm.client.request("GET", "/")
    assert reply.status == 200, f"{operation}: the VMM stopped answering ({reply.status})"
    stderr = stop_vmm(vmm)
    assert "Traceback" not in stderr, stderr
    RUN["seconds"] = time.monotonic() - RUN["started"]


def declared_statuses(case) -> set[int]:
    responses = schema.raw_schema["paths"][case.operation.path].get(case.method.lower(), {}).get("responses", {})
    return {int(code) for code in responses if str(code).isdigit()}


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_firecracker_document_against_the_vmm(case, fuzzed_vmm):
    vmm, session, directory = fuzzed_vmm
    if isinstance(case.body, (dict, list)):
        case.body = contain_paths(case.body, directory)
    response = case.call(session=session, base_url=BASE_URL)
    RUN["requests"] += 1
    RUN["operations"].add(f"{case.operation.method.upper()} {case.operation.path}")
    RUN["statuses"][response.status_code] = RUN["statuses"].get(response.status_code, 0) + 1
    counts = RUN["by_operation"].setdefault((case.operation.method.upper(), case.operation.path), {})
    counts[response.status_code] = counts.get(response.status_code, 0) + 1
    for name in os.listdir(directory):  # a snapshot the fuzzer made: 32 MiB each, not kept
        if name.startswith("fz-"):
            os.unlink(os.path.join(directory, name))
    # A 204 has no body, so no Content-Type; the Swagger 2.0 document's global `produces` would ask for one.
    checks = [c for c in CHECKS if c is not st_checks.content_type_conformance or response.status_code != 204]
    if (case.method, case.path) == ("PATCH", "/machine-config"):
        # The document gives PATCH the PUT body (vcpu_count and mem_size_mib required), but Firecracker's PATCH
        # takes every field as optional (MachineConfigUpdate): a partial body is the point of PATCH. Here a body
        # the document calls invalid must be refused unless it is the document's body with fields left out.
        checks.remove(st_checks.negative_data_rejection)
        if 200 <= response.status_code < 300:
            assert PARTIAL_MACHINE_CONFIG.is_valid(case.body), (case.body, response.status_code)
    case.validate_response(response, checks=checks, transport_kwargs={"session": session, "base_url": BASE_URL})
    if response.status_code == 204:
        assert response.content == b"" and "Content-Type" not in response.headers
    # Stricter than status_code_conformance (every operation declares `default`, which admits anything): a
    # status the document names for this operation, or 405 (with Allow, checked above) for a method it does not.
    declared = declared_statuses(case)
    if declared:
        assert response.status_code in declared, (case.method, case.path, response.status_code, response.text)
    else:
        assert response.status_code == 405, (case.method, case.path, response.status_code, response.text)
    body = response.json() if response.content else None
    if response.status_code >= 400:
        assert isinstance(body, dict) and isinstance(body.get("fault_message"), str), response.text


def test_the_schemathesis_run_was_bounded_and_covered_every_served_operation():
    if not RUN["requests"]:
        pytest.skip("the schemathesis run did not take place in this session")
    print(f"schemathesis: {RUN['requests']} requests over {len(RUN['operations'])} operations in "
          f"{RUN['seconds']:.1f} s; statuses {dict(sorted(RUN['statuses'].items()))}")
    for (method, path), counts in sorted(RUN["by_operation"].items()):
        print(f"  {method} {path}: {dict(sorted(counts.items()))}")
    assert RUN["operations"] == {f"{m} {p}" for m, p in SERVED}
    assert RUN["seconds"] < TIME_BOUND_S
    assert not [status for status in RUN["statuses"] if status >= 500]


# -- direct tests of each point of the issue
@pytest.fixture
def fresh(tmp_path):
    vmm = start_vmm(str(tmp_path), started=False)
    yield vmm
    stderr = stop_vmm(vmm)
    assert "Traceback" not in stderr, stderr


def fault(reply) -> str:
    body = reply.json()
    assert set(body) == {"fault_message"}, body
    return body["fault_message"]


def raw_request(socket_path: str, data: bytes) -> tuple[str, dict, bytes]:
    """One request as bytes (any method name); (status line, headers, body) of the answer."""
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(socket_path)
        raw.sendall(data)
        raw.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


def test_vcpu_count_is_firecrackers_1_to_32(fresh):
    client = fresh.client
    for method, body in (("PUT", {"vcpu_count": 33, "mem_size_mib": 64}), ("PUT", {"vcpu_count": 64, "mem_size_mib": 64}),
                         ("PATCH", {"vcpu_count": 33}), ("PUT", {"vcpu_count": 0, "mem_size_mib": 64})):
        reply = client.request(method, "/machine-config", body)
        assert reply.status == 400 and "machine-config.vcpu_count must be" in fault(reply), (body, reply.body)
    assert client.call("GET", "/machine-config")["vcpu_count"] == 1  # nothing refused was kept
    client.call("PUT", "/machine-config", {"vcpu_count": 32, "mem_size_mib": 64})
    client.call("PATCH", "/machine-config", {"vcpu_count": 2})
    assert client.call("GET", "/machine-config")["vcpu_count"] == 2


def test_version_is_this_projects(fresh):
    version = importlib.metadata.version("microvm-snap")
    assert fresh.client.call("GET", "/version") == {"firecracker_version": version}
    info = fresh.client.call("GET", "/")
    assert info["vmm_version"] == version and info["state"] == "Not started"


def test_cpu_template_and_huge_pages_none_accepted_others_refused_as_unsupported(fresh):
    client = fresh.client
    client.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "None",
                                           "huge_pages": "None", "smt": False})
    client.call("PATCH", "/machine-config", {"cpu_template": "None"})
    config = client.call("GET", "/machine-config")
    assert config["huge_pages"] == "None" and "cpu_template" not in config  # Firecracker reports no template
    for method, body, words in (
            ("PUT", {"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2"},
             "machine-config.cpu_template: not supported by this VMM: CPU template T2"),
            ("PATCH", {"cpu_template": "C3"}, "machine-config.cpu_template: not supported by this VMM"),
            ("PUT", {"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "2M"},
             "machine-config.huge_pages: not supported by this VMM: \"2M\""),
            ("PATCH", {"huge_pages": "2M"}, "machine-config.huge_pages: not supported by this VMM"),
            ("PATCH", {"smt": True}, "machine-config.smt: not supported by this VMM"),
            ("PUT", {"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T3"},
             "machine-config.cpu_template must be one of C3, T2, T2S, T2CL, T2A, V1N1, None"),
            ("PUT", {"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "1G"},
             "machine-config.huge_pages must be one of None, 2M")):
        reply = client.request(method, "/machine-config", body)
        assert reply.status == 400 and words in fault(reply), (body, reply.body)
    assert client.call("GET", "/machine-config") == config


def test_wrong_method_is_405_with_allow_and_unknown_path_404(fresh):
    for method, path, allow in (("DELETE", "/machine-config", "GET, PATCH, PUT"), ("POST", "/snapshot/load", "PUT"),
                                ("GET", "/actions", "PUT"), ("OPTIONS", "/version", "GET"), ("BREW", "/vm", "PATCH"),
                                ("TRACE", "/", "GET"), ("PUT", "/vm/config", "GET")):
        status, headers, body = raw_request(fresh.socket_path, f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
                                                               f"Content-Length: 0\r\n\r\n".encode())
        assert status == "HTTP/1.1 405 Method Not Allowed", (method, path, status)
        assert headers["Allow"] == allow
        assert f"{method} is not allowed on {path}" in json.loads(body)["fault_message"]
    # HEAD: the headers of the answer, no body (a client reading one would wait for it)
    status, headers, body = raw_request(fresh.socket_path, b"HEAD /version HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status.startswith("HTTP/1.1 405") and headers["Allow"] == "GET" and body == b""
    # paths Firecracker serves and this VMM does not, and paths nobody serves
    for method, path in (("PUT", "/drives/rootfs"), ("PUT", "/network-interfaces/eth0"), ("GET", "/balloon"),
                         ("PUT", "/logger"), ("BREW", "/nope"), ("GET", "/version/x"), ("PUT", "/snapshot")):
        reply = fresh.client.request(method, path, {} if method == "PUT" else None)
        assert reply.status == 404 and "no such path" in fault(reply), (method, path, reply.status)
    assert fresh.client.instance_info()["state"] == "Not started"


@pytest.mark.parametrize("body, words", [
    (b'{"vcpu_count": 1', "not valid JSON"),
    (b'{"vcpu_count": "2", "mem_size_mib": 64}', 'machine-config.vcpu_count must be an integer, not "2"'),
    (b'{"vcpu_count": 2.0, "mem_size_mib": 64}', "machine-config.vcpu_count must be an integer"),
    (b'{"vcpu_count": 2, "mem_size_mib": 64, "gdb_socket_path": "/x"}', "unknown field gdb_socket_path"),
])
def test_bad_bodies_are_400_with_a_fault_message(fresh, body, words):
    reply = fresh.client.request("PUT", "/machine-config", raw=body)
    assert reply.status == 400 and words in fault(reply)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A Full snapshot of the built-in guest (1 vCPU, 32 MiB) after one answered invocation."""
    directory = tmp_path_factory.mktemp("fc-snapshot")
    state, memory = str(directory / "vm.snap"), str(directory / "vm.mem")
    vmm = start_vmm(str(directory), started=False)
    try:
        vmm.client.configure(vcpu_count=1, mem_size_mib=32, kernel_image_path=GUEST)
        vmm.client.start()
        vmm.client.invoke(b"before", timeout_ms=10_000)
        vmm.client.pause()
        vmm.client.create_snapshot(state, memory)
    finally:
        stop_vmm(vmm)
    return state, memory


def invoke(client, text: bytes) -> dict:
    return client.call("PUT", "/invoke", {"payload": base64.b64encode(text).decode(), "timeout_ms": 10_000})


@requires_kvm
def test_firecracker_python_style_load_with_empty_network_overrides(snapshot, fresh):
    state, memory = snapshot
    # the body Firecracker clients send (firecracker-python among them): deprecated and empty fields included
    fresh.client.call("PUT", "/snapshot/load", {
        "snapshot_path": state, "mem_backend": {"backend_path": memory, "backend_type": "File"},
        "enable_diff_snapshots": False, "resume_vm": True, "network_overrides": []})
    assert fresh.client.instance_info()["state"] == "Running"
    assert invoke(fresh.client, b"after")["seq"] == 2


@requires_kvm
def test_load_accepts_fields_that_ask_for_nothing_and_refuses_what_it_cannot_do(snapshot, fresh):
    state, memory = snapshot
    base = {"snapshot_path": state, "mem_file_path": memory}
    for extra, words in (
            ({"network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap0"}]},
             'snapshot/load.network_overrides: not supported by this VMM: this VMM has no network devices, so no '
             'interface "eth0"'),
            ({"vsock_override": {"uds_path": "/tmp/v.sock"}},
             "snapshot/load.vsock_override: not supported by this VMM"),
            ({"clock_realtime": True}, "snapshot/load.clock_realtime: not supported by this VMM"),
            ({"network_overrides": [{"iface_id": "eth0"}]},
             "snapshot/load.network_overrides[0]: missing required field host_dev_name"),
            ({"network_overrides": {}}, "snapshot/load.network_overrides must be an array"),
            ({"vsock_override": {}}, "snapshot/load.vsock_override: missing required field uds_path"),
            ({"clock_realtime": 0}, "snapshot/load.clock_realtime must be a boolean")):
        reply = fresh.client.request("PUT", "/snapshot/load", {**base, **extra})
        assert reply.status == 400 and words in fault(reply), (extra, reply.body)
    assert fresh.client.instance_info()["state"] == "Not started"  # a refused load leaves the process fresh
    # what asks for nothing loads; enable_diff_snapshots (deprecated) turns dirty tracking on whatever
    # track_dirty_pages says, as in Firecracker (the two are or-ed)
    fresh.client.call("PUT", "/snapshot/load", {**base, "network_overrides": [], "clock_realtime": False,
                                                "track_dirty_pages": False, "enable_diff_snapshots": True})
    assert fresh.client.instance_info()["state"] == "Paused"
    assert fresh.client.call("GET", "/machine-config")["track_dirty_pages"] is True
    fresh.client.resume()
    assert invoke(fresh.client, b"after")["seq"] == 2


@requires_kvm
def test_a_state_file_claiming_33_vcpus_is_refused_naming_the_field(snapshot, fresh, tmp_path):
    import dataclasses

    from snapd.snapfile import save_state
    from vmm.snapshot import read_snapshot
    state_path, memory = snapshot
    state = read_snapshot(state_path)
    claimed = dataclasses.replace(state, config=dataclasses.replace(state.config, vcpu_count=33),
                                  vcpus=state.vcpus * 33)
    forged = str(tmp_path / "33.snap")
    save_state(forged, claimed)
    reply = fresh.client.request("PUT", "/snapshot/load", {"snapshot_path": forged, "mem_file_path": memory})
    assert reply.status == 400
    assert "vcpu_count must be between 1 and 32" in fault(reply) and "33" in fault(reply)
    assert fresh.client.instance_info()["state"] == "Not started"
    assert fresh.client.call("GET", "/machine-config")["vcpu_count"] == 1
