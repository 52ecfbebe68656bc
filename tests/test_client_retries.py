"""The clients (snapd.client.SnapdClient, vmm.api.client.ApiClient) never send a request twice unless that cannot
do anything twice: a GET, or a request not a byte of which was written (issue #12). Each case runs against a
real Unix-socket server scripted per connection (what a daemon does when it drops a connection at each moment);
tests/test_floods.py has the real daemon's idle close. No KVM needed."""
import socket
import threading

import pytest

from snapd import http_wire
from snapd.client import SnapdClient
from vmm.api.client import ApiClient

OK = http_wire.response(200, b'{"images": [], "clones": []}')


class ScriptedServer:
    """Accepts connections on a Unix socket; connection i behaves as ``script[i]`` (the last one repeats):
    "answer": answers every request, keeping the connection open; "answer-once": answers one, then closes
    while idle; "drop": reads one whole request, then closes without a reply; "answer-then-drop": answers
    one, then reads the next and closes without a reply; "answer-then-no-read": answers
    one, then shuts its reading side (a send to it fails with EPIPE before a byte is taken) and closes once the
    client does. ``seen``: each request's (connection number, request line)."""

    def __init__(self, path: str, script: list[str]):
        self.script = script
        self.seen: list[tuple[int, str]] = []
        self.shut = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        number = 0
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            behaviour = self.script[min(number, len(self.script) - 1)]
            threading.Thread(target=self._serve, args=(sock, number, behaviour), daemon=True).start()
            number += 1

    def _serve(self, sock: socket.socket, number: int, behaviour: str):
        stream = http_wire.Stream(sock)
        try:
            while True:
                request = stream.read_request()
                if request is None:
                    return
                stream.read_body(request)
                self.seen.append((number, f"{request.method} {request.path}"))
                if behaviour == "drop" or (behaviour == "answer-then-drop" and len(self.seen) > 1):
                    return
                sock.sendall(OK)
                if behaviour == "answer-once":
                    return
                if behaviour == "answer-then-no-read":
                    sock.shutdown(socket.SHUT_RD)
                    self.shut.set()
                    threading.Event().wait(2)
                    return
        except OSError:
            return
        finally:
            sock.close()

    def close(self):
        self.listener.close()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "api.sock")


def snapd_post(client):
    return client.request("POST", "/v1/clones", {"image": "img-x"})


def vmm_put(client):
    return client.request("PUT", "/actions", {"action_type": "InstanceStart"})


CLIENTS = {"snapd": (SnapdClient, snapd_post), "vmm": (ApiClient, vmm_put)}


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("first", ["fresh", "kept-alive"])
def test_a_request_whose_connection_drops_after_it_was_sent_is_not_sent_again(path, kind, first):
    make, non_idempotent = CLIENTS[kind]
    server = ScriptedServer(path, ["drop" if first == "fresh" else "answer-then-drop", "answer"])
    client = make(path)
    if first == "kept-alive":
        assert client.request("GET", "/v1/images").status == 200
    with pytest.raises((ConnectionError, OSError)):
        non_idempotent(client)
    assert len(server.seen) == (1 if first == "fresh" else 2), server.seen  # sent once: it may have been done
    client.close()
    server.close()


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_get_whose_connection_drops_after_it_was_sent_is_sent_again(path, kind):
    make, _ = CLIENTS[kind]
    server = ScriptedServer(path, ["drop", "answer"])
    client = make(path)
    assert client.request("GET", "/v1/images").status == 200
    assert [n for n, _ in server.seen] == [0, 1]  # once on the dropped connection, once on a fresh one
    client.close()
    server.close()


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_request_after_the_server_closed_the_idle_connection_goes_once_on_a_fresh_one(path, kind):
    make, non_idempotent = CLIENTS[kind]
    server = ScriptedServer(path, ["answer-once", "answer"])
    client = make(path)
    assert client.request("GET", "/v1/images").status == 200
    threading.Event().wait(0.2)  # the server has closed the kept-alive connection by now
    assert non_idempotent(client).status == 200
    assert [n for n, _ in server.seen] == [0, 1], server.seen
    client.close()
    server.close()


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_request_not_a_byte_of_which_was_written_is_sent_once_on_a_fresh_connection(path, kind):
    """The kept-alive connection looks open (nothing to read on it) but the server takes no more bytes on it:
    the send fails before a byte is written, so the request provably was not sent and goes on a fresh
    connection, once."""
    make, non_idempotent = CLIENTS[kind]
    server = ScriptedServer(path, ["answer-then-no-read", "answer"])
    client = make(path)
    assert client.request("GET", "/v1/images").status == 200
    assert server.shut.wait(5)
    assert non_idempotent(client).status == 200
    assert [n for n, _ in server.seen] == [0, 1], server.seen  # connection 0 took no byte of the second one
    client.close()
    server.close()
