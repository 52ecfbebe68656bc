"""The VMM API's own limits (issue #12, floods): a cap on connections, an idle timeout and a deadline for a whole
request, against a real `vmm --api-sock` process."""
import json
import socket
import time

import pytest

from vmm.api.client import VmmProcess

MAX_CONNECTIONS = 8


@pytest.fixture
def vmm(tmp_path):
    process = VmmProcess(str(tmp_path / "vmm.sock"), ["--api-max-connections", str(MAX_CONNECTIONS),
                                                      "--api-idle-timeout", "1", "--api-request-timeout", "1"])
    yield process
    process.stop()


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_connections_beyond_the_cap_get_a_503_and_the_rest_are_served(vmm):
    vmm.client.close()  # the fixture's own client holds no slot during the test
    held = [connect(vmm.socket_path) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.2)  # accepted, each by its thread
    extra = connect(vmm.socket_path)
    reply = read_all(extra)
    assert reply.startswith(b"HTTP/1.1 503") and b"at most 8 connections" in reply
    held[0].sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert held[0].recv(65536).startswith(b"HTTP/1.1 200")
    for sock in held:
        sock.close()


def test_an_idle_connection_is_closed_after_the_idle_timeout(vmm):
    sock = connect(vmm.socket_path)
    t0 = time.monotonic()
    assert read_all(sock) == b""  # closed, no reply
    assert 0.8 < time.monotonic() - t0 < 4


def test_a_request_dribbled_byte_by_byte_is_cut_at_the_deadline_and_others_are_served(vmm):
    slow = connect(vmm.socket_path)
    t0 = time.monotonic()
    reply = b""
    try:
        for byte in b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100:
            slow.sendall(bytes([byte]))
            time.sleep(0.05)
            assert vmm.client.request("GET", "/").status == 200  # another client, meanwhile
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = read_all(slow)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["fault_message"].startswith("the request was not whole")
    assert time.monotonic() - t0 < 4


def test_a_slow_handler_is_not_cut_once_its_request_is_read(vmm):
    """The deadline covers reading the request, not serving it."""
    reply = vmm.client.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
    assert reply.status == 204
    time.sleep(1.2)  # past the idle timeout: the client reconnects on its own for a GET
    assert vmm.client.request("GET", "/machine-config").status == 200
