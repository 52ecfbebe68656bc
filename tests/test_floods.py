"""Floods and bad input against a real `snapd serve` process (issue #12, "Floods and bad input";
docs/reliability.md): the connection cap, the idle timeout, the request deadline (slowloris), a bounded thread
count, a client served quickly with 3000 idle connections open, JSON depth and size limits, and random input
that never gets a 500. The daemon runs as its own process (snapd.daemon_process), so the thread counts read from
/proc are the daemon's own."""
import base64
import json
import os
import re
import resource
import socket
import statistics
import threading
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from snapd import http_wire
from snapd.client import SnapdClient
from snapd.daemon.http import ROUTES
from snapd.daemon_process import DaemonProcess, wait_pool
from tests.conftest import requires_kvm, wait_until
from tests.daemon_helpers import hello_snapshot, thread_count

pytestmark = requires_kvm

GET = b"GET /v1/images HTTP/1.1\r\nHost: localhost\r\n\r\n"
CAP = 40
REQUEST_TIMEOUT = 2.0
IDLE_TIMEOUT = 1.0
INFLIGHT = 16


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return hello_snapshot(tmp_path_factory.mktemp("floods-snapshot"))


def start(tmp_path_factory, snapshot, name, *args):
    return DaemonProcess(str(tmp_path_factory.mktemp(name) / "state"), *args,
                         import_roots=[os.path.dirname(snapshot[0])])


@pytest.fixture(scope="module")
def capped(tmp_path_factory, snapshot):
    with start(tmp_path_factory, snapshot, "floods-capped", "--max-connections", str(CAP), "--request-timeout",
               str(REQUEST_TIMEOUT), "--max-inflight", "8") as daemon:
        yield daemon


@pytest.fixture(scope="module")
def idle(tmp_path_factory, snapshot):
    with start(tmp_path_factory, snapshot, "floods-idle", "--idle-timeout", str(IDLE_TIMEOUT)) as daemon:
        image = daemon.client.register_image(*snapshot)["id"]
        yield daemon, image


@pytest.fixture(scope="module")
def big(tmp_path_factory, snapshot):
    with start(tmp_path_factory, snapshot, "floods-big", "--max-connections", "4000", "--max-inflight",
               str(INFLIGHT)) as daemon:
        image = daemon.client.register_image(*snapshot)["id"]
        yield daemon, image


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)  # blocking: waits while the listen backlog is full (a timeout would make it EAGAIN)
    sock.settimeout(timeout)
    return sock


class Wire:
    """One kept-alive connection, requests written by hand."""

    def __init__(self, path: str):
        self.sock = connect(path)
        self.stream = http_wire.Stream(self.sock)

    def ask(self, data: bytes = GET, method: str = "GET") -> tuple[int, dict, bytes]:
        self.sock.sendall(data)
        return self.stream.read_response(method)[:3]

    def close(self):
        self.sock.close()


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the daemon writes until it closes (a reset after its last reply counts as the close)."""
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


# -- connections


def test_connections_beyond_the_cap_get_a_503_and_are_closed(capped):
    capped.client.close()  # its connection would be one of the CAP
    time.sleep(0.3)
    first = [Wire(capped.socket_path) for _ in range(CAP)]
    for wire in first:  # each accepted and served, and kept open
        assert wire.ask()[0] == 200
    extra = [connect(capped.socket_path) for _ in range(5)]
    for sock in extra:  # refused at once, without being asked: a 503 and the close
        data = read_to_close(sock)
        assert data.startswith(b"HTTP/1.1 503 "), data[:100]
        assert b"Connection: close" in data and b"--max-connections" in data
        sock.close()
    for wire in first:  # the first CAP are served still
        assert wire.ask()[0] == 200
    first.pop().close()

    def served_again():
        wire = Wire(capped.socket_path)
        try:
            return wire.ask()[0] == 200
        except (OSError, http_wire.WireError):
            return False
        finally:
            wire.close()
    assert wait_until(served_again, 5), "a connection was closed, yet a new one is not served"
    for wire in first:
        wire.close()


def test_an_idle_kept_alive_connection_is_closed_after_the_idle_timeout(idle):
    daemon, _ = idle
    wire = Wire(daemon.socket_path)
    assert wire.ask()[0] == 200
    t0 = time.monotonic()
    assert read_to_close(wire.sock) == b""  # closed without a word: no request was out
    elapsed = time.monotonic() - t0
    silent = connect(daemon.socket_path)  # one that never sent a byte goes the same way
    t1 = time.monotonic()
    assert read_to_close(silent) == b""
    silent_elapsed = time.monotonic() - t1
    for took in (elapsed, silent_elapsed):
        assert IDLE_TIMEOUT * 0.9 <= took <= IDLE_TIMEOUT + 2.0, took
    wire.close()
    silent.close()


def test_the_client_sends_a_post_once_after_an_idle_close(idle):
    """The daemon closed the client's kept-alive connection while it was idle: the client sees that before it
    sends and uses a fresh connection; the restore is done exactly once."""
    daemon, image = idle
    client = SnapdClient(daemon.socket_path)
    wait_pool(client, 1, prepared=1)
    assert client.clones() == []
    time.sleep(IDLE_TIMEOUT + 0.6)  # the reaper has closed it by now
    (clone,) = client.create_clones(image, payload=b"once")
    assert [c["id"] for c in client.clones()] == [clone["id"]]
    client.delete_clone(clone["id"])
    client.close()


def dribble(path: str, data: bytes, gap: float, results: dict, name: str) -> None:
    """Send ``data`` a byte every ``gap`` seconds until the daemon stops taking it; then read what it says."""
    sock = connect(path, timeout=REQUEST_TIMEOUT + 10)
    t0 = time.monotonic()
    try:
        for byte in data:
            sock.send(bytes([byte]))
            time.sleep(gap)
    except OSError:
        pass
    try:
        reply = read_to_close(sock)
    except OSError as exc:  # e.g. no close within the socket's timeout: reported by the test
        reply = repr(exc).encode()
    results[name] = (time.monotonic() - t0, reply)
    sock.close()


def test_a_request_dribbled_byte_by_byte_is_cut_with_408_at_the_deadline(capped):
    slow = {
        # a head that never ends, a GET (read by Python)
        "head": b"GET /v1/images HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 400,
        # a restore whose body never completes (read by the lane, in C)
        "lane body": b"POST /v1/clones HTTP/1.1\r\nHost: localhost\r\nContent-Length: 300\r\n\r\n{" + b" " * 300,
        # a body that never completes, read by Python
        "python body": b"POST /v1/images HTTP/1.1\r\nContent-Length: 300\r\n\r\n{" + b" " * 300,
    }
    results = {}
    threads = [threading.Thread(target=dribble, args=(capped.socket_path, data, 0.02, results, name))
               for name, data in slow.items()]
    for thread in threads:
        thread.start()
    wire = Wire(capped.socket_path)  # meanwhile a client is served as ever
    latencies = []
    deadline = time.monotonic() + REQUEST_TIMEOUT
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        assert wire.ask()[0] == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.05)
    for thread in threads:
        thread.join(REQUEST_TIMEOUT + 15)
    wire.close()
    assert set(results) == set(slow), results
    assert max(latencies) < 0.2, latencies
    for name, (elapsed, reply) in results.items():
        assert reply.startswith(b"HTTP/1.1 408 "), (name, reply[:200])
        assert b"--request-timeout" in reply and b"Connection: close" in reply, name
        # cut at the deadline, give or take the reaper's tick (a tenth of the timeout) and a loaded machine
        assert REQUEST_TIMEOUT * 0.9 <= elapsed <= REQUEST_TIMEOUT + 3, (name, elapsed)


def test_the_daemons_threads_stay_bounded_whatever_clients_do(big):
    daemon, _ = big
    raise_fd_limit()
    pid = daemon.process.pid
    before = thread_count(pid)
    idle_conns = [connect(daemon.socket_path) for _ in range(600)]
    slow = [connect(daemon.socket_path) for _ in range(100)]
    for sock in slow:
        sock.send(b"GET /v1/images HTTP/1.1\r\nX-Slow: ")  # a head begun and never finished
    peak, statuses = [before], []

    def ask():
        with SnapdClient(daemon.socket_path) as client:
            for _ in range(5):
                statuses.append(client.request("GET", "/v1/clones").status)
                peak.append(thread_count(pid))
    askers = [threading.Thread(target=ask) for _ in range(64)]
    for thread in askers:
        thread.start()
    for thread in askers:
        thread.join(60)
    assert Wire(daemon.socket_path).ask()[0] == 200
    peak.append(thread_count(pid))
    for sock in idle_conns + slow:
        sock.close()
    assert set(statuses) == {200}, sorted(set(statuses))  # a burst beyond the threads waits and is served
    assert len(statuses) == 64 * 5  # every one of them (a thread that raised appended nothing)
    # INITIAL_THREADS (4) handler threads at the start, at most INFLIGHT ever: whatever 764 clients did
    assert max(peak) <= before - 4 + INFLIGHT + 2, (before, max(peak))
    print(f"\ndaemon threads: {before} before, at most {max(peak)} with 600 idle, 100 slow and 64 busy clients")


def test_requests_waiting_on_busy_handler_threads_get_a_503_after_a_second(capped):
    """Every handler thread of a daemon (capped: --max-inflight 8) is held by a client that pipelines
    requests and never read the replies (each thread blocks writing to them, up to --request-timeout): a request
    that comes meanwhile waits, and gets a 503 once the threads have made no progress for QUEUE_WAIT (1 s), not
    after the request timeout. When they let go, requests are served again."""
    stuffers = []
    for _ in range(8):  # capped: --max-inflight 8
        sock = connect(capped.socket_path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuffers.append(sock)
    pipelined = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n" * 20000

    def stuff(sock):
        try:
            sock.sendall(pipelined)
        except OSError:
            pass
    threads = [threading.Thread(target=stuff, args=(sock,), daemon=True) for sock in stuffers]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # every handler thread is now stuck writing replies nobody reads
    waiting = connect(capped.socket_path, timeout=REQUEST_TIMEOUT + 10)
    t0 = time.monotonic()
    waiting.sendall(GET)
    data = read_to_close(waiting)
    waited = time.monotonic() - t0
    waiting.close()
    assert data.startswith(b"HTTP/1.1 503 ") and b"--max-inflight" in data, data[:300]
    assert waited < REQUEST_TIMEOUT, waited  # QUEUE_WAIT and a reaper tick, not the write deadline
    for sock in stuffers:
        sock.close()
    for thread in threads:
        thread.join(10)

    def served():
        wire = Wire(capped.socket_path)
        try:
            return wire.ask()[0] == 200
        finally:
            wire.close()
    assert wait_until(served, REQUEST_TIMEOUT + 5)
    print(f"\na request waiting on 8 stuck handler threads: 503 after {waited:.2f} s")


def test_a_client_is_served_in_milliseconds_with_3000_idle_connections(big):
    daemon, image = big
    raise_fd_limit()
    idle_conns = [connect(daemon.socket_path) for _ in range(3000)]
    last = Wire(daemon.socket_path)
    assert last.ask()[0] == 200  # so all 3000 before it were accepted too
    client = SnapdClient(daemon.socket_path)
    wait_pool(client, 1, prepared=1)
    gets, restores = [], []
    for i in range(40):
        t0 = time.perf_counter()
        client.images()
        gets.append(time.perf_counter() - t0)
        time.sleep(0.01)
    for i in range(10):
        wait_pool(client, 0, prepared=1)
        t0 = time.perf_counter()
        (clone,) = client.create_clones(image, payload=f"busy {i}".encode())
        restores.append(time.perf_counter() - t0)
        client.delete_clone(clone["id"])
    client.close()
    last.close()
    for sock in idle_conns:
        sock.close()
    ms = lambda xs: f"p50 {statistics.median(xs) * 1e3:.2f} ms, max {max(xs) * 1e3:.2f} ms"  # noqa: E731
    print(f"\nwith 3000 idle connections open: GET /v1/images {ms(gets)}; POST /v1/clones (restore + first "
          f"invocation) {ms(restores)}")
    assert max(gets) < 0.2 and max(restores) < 0.2, (gets, restores)


# -- bad input


def post(path: str, target: str, body: bytes) -> tuple[int, dict, bytes]:
    """POST ``body`` on a fresh connection: (status, headers, body)."""
    sock = connect(path)
    stream = http_wire.Stream(sock)
    sock.sendall(http_wire.request("POST", target, body, {"Content-Type": "application/json"}))
    status, headers, reply, _ = stream.read_response("POST")
    sock.close()
    return status, headers, reply


@pytest.mark.parametrize("target", ["/v1/clones", "/v1/images"])
@pytest.mark.parametrize("body, words", [
    (b"[" * 100_000, "deeper than 32 levels"),
    (b'{"image": ' + b"[" * 40 + b"]" * 40 + b"}", "deeper than 32 levels"),
    (b'{"state_path": ' + b'{"a": ' * 33 + b"1" + b"}" * 34, "deeper than 32 levels"),
    (b'{"count": 1' + b"0" * 5000 + b"}", "4300 digits"),
    (b"\xff\xfe{", "not UTF-8"),
])
def test_deep_nesting_and_unusable_json_get_400_naming_the_limit(big, target, body, words):
    daemon, _ = big
    status, _, reply = post(daemon.socket_path, target, body)
    assert status == 400 and words in json.loads(reply)["fault_message"], reply[:300]


def test_nesting_within_the_limit_reaches_the_field_checks(big):
    daemon, _ = big
    status, _, reply = post(daemon.socket_path, "/v1/clones", b'{"image": ' + b"[" * 31 + b"]" * 31 + b"}")
    assert status == 400 and "clones.image must be a string" in json.loads(reply)["fault_message"]


def test_a_body_over_the_size_limit_is_refused_before_it_is_read(big):
    daemon, _ = big
    sock = connect(daemon.socket_path)
    sock.sendall(b"POST /v1/clones HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2097152\r\n\r\n"
                 + b"[" * 65536)
    data = read_to_close(sock)
    sock.close()
    assert data.startswith(b"HTTP/1.1 400 ") and b"1048576-byte limit" in data and b"Connection: close" in data


# -- random input: never a 500


SERVED_STATUSES = {200, 201, 204} | set(range(400, 500)) | {503, 504}
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4),
                    max_leaves=12)
ID_TEXT = st.from_regex(r"[A-Za-z0-9_%.~-]{0,70}", fullmatch=True)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, snapshot):
    with start(tmp_path_factory, snapshot, "floods-fuzz") as daemon:
        image = daemon.client.register_image(*snapshot)["id"]
        wait_pool(daemon.client, 1, prepared=1)
        (clone,) = daemon.client.create_clones(image, payload=b"first")
        yield daemon, image, clone["id"]


def field_values(image: str) -> dict:
    """Values for the API's fields: valid ones often enough that requests get through to the daemon's work (a
    restore, an invocation), and every kind of wrong one. An invocation's timeout is never short enough to
    time out (that fails the clone, as documented; the other examples need it)."""
    return {
        "image": st.sampled_from([image, image, "img-nope", "", "x" * 70]) | JSON,
        "payload": st.sampled_from(["aGVsbG8=", "", "%%%", "aGk", "aGk=\n", "x" * 40]) | JSON,
        "timeout_ms": st.sampled_from([0, -1, 1000, 10_000, 3_600_000, 3_600_001, "5", 1.5, None, True, []]),
        "count": st.sampled_from([0, -1, 1, 2, 65, "1", 1.0, None, 2 ** 70]),
    }


def body_for(route, image: str, draw):
    """A body for ``route``: its own fields with any values (and maybe an unknown one), any JSON, or bytes."""
    kind = draw(st.sampled_from(["fields", "fields", "fields", "json", "bytes", "none"]))
    if kind == "none":
        return None
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json" or route.body is None:
        return json.dumps(draw(JSON)).encode()
    values = field_values(image)
    names = list(route.body.fields)
    chosen = draw(st.lists(st.sampled_from(names), max_size=len(names), unique=True))
    value = {name: draw(values.get(name, JSON)) for name in chosen}
    if draw(st.integers(0, 4)) == 0:
        value[draw(st.text(max_size=8))] = draw(JSON)
    return json.dumps(value).encode()


def exchange(path: str, data: bytes) -> list[int]:
    """``data`` on a fresh connection, half-closed; the statuses of every reply until the daemon closes."""
    sock = connect(path, timeout=60)
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # it answered (and closed) before taking all of it
        pass
    out = read_to_close(sock)
    sock.close()
    return statuses_of(out)


def statuses_of(out: bytes) -> list[int]:
    """The status of each reply in a byte stream of replies (each with a Content-Length, or none for 1xx)."""
    statuses = []
    while out:
        head, sep, rest = out.partition(b"\r\n\r\n")
        assert sep, f"a reply cut short: {out[:200]!r}"
        lines = head.split(b"\r\n")
        match = re.match(rb"HTTP/1\.1 (\d{3}) ", lines[0])
        assert match, f"not a reply: {out[:200]!r}"
        statuses.append(int(match.group(1)))
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        out = rest[length:]
    return statuses


def check_alive(daemon) -> None:
    status, _, _ = Wire(daemon.socket_path).ask()
    assert status == 200


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_requests_to_every_route_never_get_a_500(fuzzed, data):
    daemon, image, clone = fuzzed
    if data.draw(st.integers(0, 2)) == 0:  # near-valid: a restore or an invocation, one field maybe wrong
        invoke = data.draw(st.booleans())
        route = next(r for r in ROUTES if r.method == "POST" and r.path == (
            "/v1/clones/{clone_id}/invoke" if invoke else "/v1/clones"))
        method, target = "POST", f"/v1/clones/{clone}/invoke" if invoke else "/v1/clones"
        fields = {"payload": base64.b64encode(data.draw(st.binary(max_size=64))).decode()}
        if not invoke:
            fields["image"] = image
        values = field_values(image)
        for name in data.draw(st.lists(st.sampled_from(list(route.body.fields)), max_size=2, unique=True)):
            fields[name] = data.draw(values.get(name, JSON))
        body = json.dumps(fields).encode()
    else:  # any route, any method, any ids, any body
        route = data.draw(st.sampled_from(ROUTES))
        method = data.draw(st.sampled_from([route.method] * 4 + ["GET", "POST", "PUT", "DELETE", "PATCH"]))
        keep = method == "DELETE" or route.path.endswith("/snapshot")  # the image and clone the others use stay
        ids = {"image_id": [data.draw(ID_TEXT)] + ([] if keep else [image, image]),
               "clone_id": [data.draw(ID_TEXT)] + ([] if keep else [clone, clone])}
        target = re.sub(r"\{(\w+)\}", lambda m: data.draw(st.sampled_from(ids[m.group(1)])), route.path)
        body = body_for(route, image, data.draw)
    request = http_wire.request(method, target, body, {"Content-Type": "application/json"})
    statuses = exchange(daemon.socket_path, request)
    assert statuses and set(statuses) <= SERVED_STATUSES, (request[:300], statuses)
    event(f"{method} {route.path} -> {statuses[0]}")  # what was covered: --hypothesis-show-statistics
    for clone_record in daemon.client.clones():  # what a random request restored goes (the first one stays)
        if clone_record["id"] != clone:
            daemon.client.delete_clone(clone_record["id"])


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(prefix=st.sampled_from([b"", b"POST /v1/clones HTTP/1.1\r\n", b"GET /v1/images HTTP/1.1\r\n",
                               b"POST /v1/clones/CLONE/invoke HTTP/1.1\r\n"]),
       junk=st.binary(max_size=300))
def test_random_bytes_never_get_a_500_and_the_daemon_answers_after(fuzzed, prefix, junk):
    daemon, _, clone = fuzzed
    statuses = exchange(daemon.socket_path, prefix.replace(b"CLONE", clone.encode()) + junk)
    assert set(statuses) <= SERVED_STATUSES, (prefix + junk, statuses)


def test_the_fuzzed_daemon_still_serves_and_its_clone_still_answers(fuzzed):
    daemon, image, clone = fuzzed
    check_alive(daemon)
    assert daemon.client.invoke(clone, b"after the fuzz")
    assert [c["id"] for c in daemon.client.clones()] == [clone]


def test_every_malformed_field_gets_a_400_naming_it(fuzzed):
    daemon, image, clone = fuzzed
    targets = {"/v1/images/{image_id}/loading-set": f"/v1/images/{image}/loading-set",
               "/v1/clones/{clone_id}/invoke": f"/v1/clones/{clone}/invoke",
               "/v1/clones/{clone_id}/snapshot": f"/v1/clones/{clone}/snapshot"}
    wrong = {"string": 5, "integer": "5", "boolean": "yes", "object": [], "array": {}}
    for route in ROUTES:
        if route.body is None:
            continue
        for name, rule in route.body.fields.items():
            body = {n: {"string": "x", "integer": 1}.get(r.json_type) for n, r in route.body.fields.items()
                    if r.required}
            body[name] = wrong[rule.json_type]
            status, _, reply = post(daemon.socket_path, targets.get(route.path, route.path), json.dumps(body).encode())
            message = json.loads(reply)["fault_message"]
            assert status == 400 and f"{route.body.name}.{name}" in message, (route.path, name, status, message)
    assert [c["id"] for c in daemon.client.clones()] == [clone]  # nothing was restored or deleted
