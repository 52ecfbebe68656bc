"""The daemon's side of the restore lane (snapd/csrc/lane_daemon.c), driven over real sockets with a stand-in
worker: what it answers, where it stops and hands over, and that what it does not take stays Python's."""
import base64
import json
import socket
import threading

import pytest

from snapd import http_wire
from snapd.daemon import lane as restore_lane
from snapd.daemon.lane import DaemonLane, render_fields
from snapd.pool import protocol
from snapd.pool.worker_handle import ChannelLock
from snapd._lane_native import lib

IMAGE = "i-lanetest"
FIELDS = render_fields("c-0123456789ab", IMAGE, 4242, "/run/snapd.sock", {"prepare_us": 12.25})


class StandInWorker:
    """The worker's end of a channel: answers each LANE_RESTORE with ``answer(header, payload)`` -> bytes."""

    def __init__(self, answer):
        self.daemon_end, self.end = protocol.channel_pair()
        self.answer = answer
        self.seen = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                header, payload, _ = protocol.recv(self.end)
            except (protocol.PeerGone, OSError):
                return
            self.seen.append((header, payload))
            for message in self.answer(header, payload):
                protocol.send_raw(self.end, message)

    def close(self):
        self.end.close()
        self.daemon_end.close()


def ok_reply(header, payload):
    return [protocol.encode_lane_reply({"ok": True, "id": header["id"], "generation": 77,
                                        "timings": {"new_generation_us": 3.0}, "invoke": {"ok": True, "latency_us": 5.0},
                                        "total_us": 9.0}, payload[::-1])]


@pytest.fixture
def lane():
    return DaemonLane(capacity=8, server="snapd/test", socket_path="/run/snapd.sock")


def offer(lane, worker, token=1, request_id=100, req_cap=4096, image=IMAGE):
    data = FIELDS.encode()
    assert lib.lane_board_offer(lane.board, token, image.encode(), worker.daemon_end.fileno(), req_cap, request_id,
                                data, len(data)) == 0


def clone_request(body: dict, extra_headers: str = "") -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/clones HTTP/1.1\r\nHost: localhost\r\n{extra_headers}Content-Length: {len(data)}\r\n\r\n"
            .encode() + data)


def read_response(sock) -> tuple[int, dict, dict]:
    stream = http_wire.Stream(sock)
    lines = stream.read_head()
    status = int(lines[0].split(" ")[1])
    headers = http_wire.parse_headers(lines)
    body = stream.read_exactly(int(headers["content-length"]))
    return status, headers, json.loads(body)


def test_a_restore_with_a_ticket_is_answered_in_c(lane):
    worker = StandInWorker(ok_reply)
    client, server = socket.socketpair()
    try:
        offer(lane, worker)
        client.sendall(clone_request({"image": IMAGE, "payload": "aGVsbG8=", "timeout_ms": 250}))
        conn = lane.connection(server.fileno())
        assert conn.serve() == restore_lane.SERVED
        out = conn.out
        assert (out.token, out.request_id, out.keep_alive, out.generation, out.timeout_ms) == (1, 100, 1, 77, 250)
        header, payload = worker.seen[0]
        assert header == {"op": "restore", "prepared": True, "lane": True, "id": 100, "timeout": 0.25,
                          "image": IMAGE, "invoke": True} and payload == b"hello"
        status, headers, body = read_response(client)
        assert status == 201 and headers["server"] == "snapd/test" and "connection" not in headers
        (clone,) = body["clones"]
        assert clone["id"] == "c-0123456789ab" and clone["pid"] == 4242 and clone["state"] == "running"
        assert clone["timings_us"] == {"prepare_us": 12.2, "new_generation_us": 3.0}
        assert clone["result"] == "b2xsZWg=" and clone["invoke_latency_us"] == 5.0
        assert clone["restore_us"] == round(out.restore_us, 1) and clone["created"] > 1e9
        assert lib.lane_board_room(lane.board) == 7  # the clone counts against the limit
        assert lib.lane_board_taken(lane.board, 1) == 1
        lane.settle(1)
        assert lib.lane_board_taken(lane.board, 1) == 0
    finally:
        client.close()
        server.close()
        worker.close()


@pytest.mark.parametrize("case", ["no ticket", "other image", "count 2", "payload over req_cap", "GET", "no room"])
def test_what_the_lane_does_not_take_stays_pythons_byte_for_byte(lane, case):
    worker = StandInWorker(ok_reply)
    client, server = socket.socketpair()
    try:
        body = {"image": IMAGE, "payload": "aGVsbG8="}
        if case != "no ticket":
            offer(lane, worker, req_cap=4 if case == "payload over req_cap" else 4096)
        if case == "other image":
            body["image"] = "i-other"
        if case == "count 2":
            body["count"] = 2
        if case == "no room":
            while lane.reserve():
                pass
        request = b"GET /v1/clones HTTP/1.1\r\n\r\n" if case == "GET" else clone_request(body)
        client.sendall(request)
        conn = lane.connection(server.fileno())
        assert conn.serve() == restore_lane.SLOW
        assert conn.take() == request
        assert worker.seen == [] and lib.lane_board_withdraw(lane.board, 1) != lib.LANE_TICKET_TAKEN
    finally:
        client.close()
        server.close()
        worker.close()


def test_pipelined_requests_are_read_one_at_a_time_and_eof_ends(lane):
    worker = StandInWorker(ok_reply)
    client, server = socket.socketpair()
    try:
        offer(lane, worker, token=1, request_id=100)
        offer(lane, worker, token=2, request_id=101)
        client.sendall(clone_request({"image": IMAGE}) + b"GET /metrics HTTP/1.1\r\n\r\n"
                       + clone_request({"image": IMAGE}, "Connection: close\r\n"))
        conn = lane.connection(server.fileno())
        assert conn.serve() == restore_lane.SERVED and "result" not in read_response(client)[2]["clones"][0]
        assert conn.serve() == restore_lane.SLOW
        rest = conn.take()
        assert rest.startswith(b"GET /metrics HTTP/1.1\r\n\r\nPOST")
        conn.push(rest[len(b"GET /metrics HTTP/1.1\r\n\r\n"):])  # as the handler does after Python's request
        assert conn.serve() == restore_lane.SERVED and conn.out.keep_alive == 0
        assert read_response(client)[1]["connection"] == "close"
        assert [h["invoke"] for h, _ in worker.seen] == [False, False]
        client.shutdown(socket.SHUT_WR)
        assert conn.serve() == restore_lane.EOF_
    finally:
        client.close()
        server.close()
        worker.close()


def refusing(kind: str, error: str):
    """A stand-in worker's answer: the worker's refusal of kind ``kind``."""
    def answer(header, payload):
        return [protocol.encode_lane_reply({"ok": False, "id": header["id"], "kind": kind, "error": error}, b"")]
    return answer


def event_first(header, payload):
    """A stand-in worker's answer: an unasked event, then the reply."""
    return [protocol.encode({"event": "failed", "error": "page server gone"})] + ok_reply(header, payload)


def handed_over_workers() -> list:
    """Stand-in workers that refuse, send an event first, and answer (to be shut down: a gone worker)."""
    return [StandInWorker(refusing("timeout", "no reply within 0.1 s")), StandInWorker(event_first),
            StandInWorker(ok_reply)]


def test_a_refusal_an_early_event_and_a_gone_worker_are_handed_over(lane):
    client, server = socket.socketpair()
    conn = lane.connection(server.fileno())
    workers = handed_over_workers()
    try:
        for token, (worker, stage) in enumerate(zip(workers, ("REFUSED", "SENT", "UNSENT")), 1):
            offer(lane, worker, token=token, request_id=100 + token)
            if stage == "UNSENT":
                worker.close()
            client.sendall(clone_request({"image": IMAGE, "payload": "eA=="}))
            assert conn.serve() == restore_lane.HANDOFF
            out = conn.out
            assert out.token == token and out.stage == getattr(lib, f"LANE_STAGE_{stage}")
            if stage == "REFUSED":
                assert out.status == protocol.LANE_STATUS["timeout"] and conn.data() == b"no reply within 0.1 s"
            else:
                assert conn.data() == b"x"  # the payload, for Python to send again or wait on
            if stage == "SENT":  # the event is left for Python's reader, the reply after it
                event, _, _ = protocol.recv(worker.daemon_end)
                reply, result, _ = protocol.recv(worker.daemon_end)
                assert event["event"] == "failed" and reply["id"] == 102 and result == b"x"
            lane.settle(token)
        assert lib.lane_board_room(lane.board) == 8 - 3  # Python releases what it does not keep
    finally:
        client.close()
        server.close()
        for worker in workers:
            worker.close()


class Handle:
    """What the lane needs of a WorkerHandle."""

    def __init__(self, fd):
        self.pid, self.lane_token, self.prepared, self.fd = 7, 0, {"held": True, "req_cap": 64, "timings": {}}, fd
        self.ids = iter(range(1, 100))

    def fileno(self):
        return self.fd

    def next_request_id(self):
        return next(self.ids)


def test_claims_withdraw_offered_tickets_and_closing_an_image_counts_taken_ones(lane):
    worker = StandInWorker(ok_reply)
    client, server = socket.socketpair()
    try:
        first, second = Handle(worker.daemon_end.fileno()), Handle(worker.daemon_end.fileno())
        lane.offer(first, IMAGE)
        lane.offer(second, IMAGE)
        assert first.lane_token and second.lane_token and len(lane.by_clone) == 2
        assert lane.claim(first) and first.lane_token == 0 and len(lane.by_clone) == 1
        client.sendall(clone_request({"image": IMAGE}))
        conn = lane.connection(server.fileno())
        assert conn.serve() == restore_lane.SERVED
        assert not lane.claim(second), "a worker the lane has taken must not be handed out again"
        assert lane.close_image(IMAGE) == 1  # a restore of it in flight: the daemon refuses to delete it
        lane.reopen_image(IMAGE)
        lane.settle(conn.out.token)
        assert lane.close_image(IMAGE) == 0 and lane.by_clone == {}
    finally:
        client.close()
        server.close()
        worker.close()


def test_settling_an_old_ticket_leaves_the_reused_workers_new_one_alone(lane):
    """A clone's record can settle after its worker was deleted, reused and offered again: the late settle must
    not wipe the new ticket's token, or Python would hand the worker out while the lane can still take it."""
    worker = StandInWorker(ok_reply)
    client, server = socket.socketpair()
    try:
        handle = Handle(worker.daemon_end.fileno())
        lane.offer(handle, IMAGE)
        old = handle.lane_token
        client.sendall(clone_request({"image": IMAGE}))
        assert lane.connection(server.fileno()).serve() == restore_lane.SERVED
        lane.offer(handle, IMAGE)  # reused and prepared again before the old record settled
        new = handle.lane_token
        lane.settle(old)
        assert handle.lane_token == new
        assert lane.claim(handle) and lib.lane_board_withdraw(lane.board, new) == lib.LANE_TICKET_UNKNOWN
    finally:
        client.close()
        server.close()
        worker.close()


def test_an_image_being_deleted_gets_no_new_tickets_and_a_refused_offer_leaves_no_trace(lane):
    worker = StandInWorker(ok_reply)
    try:
        handle = Handle(worker.daemon_end.fileno())
        assert lane.close_image(IMAGE) == 0
        lane.offer(handle, IMAGE)
        assert handle.lane_token == 0 and lane.tickets == {}
        lane.reopen_image(IMAGE)
        lane.offer(handle, "i-" + "x" * 80)  # the board refuses an image id it cannot hold
        assert handle.lane_token == 0 and lane.tickets == {} and lane.by_clone == {}
        lane.offer(handle, IMAGE)
        assert handle.lane_token and len(lane.tickets) == 1
    finally:
        worker.close()


# -- live clones' invocations
class LiveHandle:
    """What the lane needs of a live clone's WorkerHandle: its channel, the channel's lock, its req_cap."""

    def __init__(self, worker: StandInWorker, req_cap: int = 4096):
        self.worker, self.prepared, self.lock = worker, {"req_cap": req_cap}, ChannelLock()

    def fileno(self):
        return self.worker.daemon_end.fileno()


class LiveClone:
    """What the lane needs of a Clone: its id and its worker."""

    def __init__(self, clone_id: str, worker):
        self.id, self.worker = clone_id, worker


def invoke_request(clone: str, body: dict, extra_headers: str = "") -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/clones/{clone}/invoke HTTP/1.1\r\nHost: localhost\r\n{extra_headers}"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


@pytest.fixture
def live(lane):
    """(lane, stand-in worker, its handle offered as clone c-1, client socket, lane connection)"""
    worker = StandInWorker(ok_reply)
    handle = LiveHandle(worker)
    client, server = socket.socketpair()
    lane.offer_clone(LiveClone("c-1", handle), IMAGE)
    try:
        yield lane, worker, handle, client, lane.connection(server.fileno())
    finally:
        client.close()
        server.close()
        worker.close()


def test_a_live_clones_invocations_are_answered_in_c_one_request_id_each(live):
    lane, worker, handle, client, conn = live
    token = lane.clone_tickets["c-1"]
    for i, text in enumerate([b"hello", b"again"]):
        client.sendall(invoke_request("c-1", {"payload": base64.b64encode(text).decode(), "timeout_ms": 250}))
        assert conn.serve() == restore_lane.SERVED and conn.out.kind == restore_lane.INVOKE
        header, payload = worker.seen[i]
        assert header == {"op": "invoke", "lane": True, "id": (1 << 62) + (token << 32) + i, "timeout": 0.25}
        assert payload == text
        status, headers, body = read_response(client)
        assert status == 200 and headers["server"] == "snapd/test"
        assert body == {"result": base64.b64encode(text[::-1]).decode(), "latency_us": 5.0}
        assert lib.lane_board_taken(lane.board, token) == 0, "the clone must be on the board again at once"
    assert lib.lane_board_room(lane.board) == 8, "an invocation is no clone: the count is untouched"
    assert handle.lock.acquire(blocking=False), "the lane left the worker channel's lock held"
    handle.lock.release()
    lane.withdraw_clone("c-1")
    assert lane.clone_tickets == {} and lane.live_tokens == {}
    client.sendall(invoke_request("c-1", {"payload": "eA=="}))
    assert conn.serve() == restore_lane.SLOW, "a withdrawn clone's invocation is Python's"


def test_the_lane_waits_for_the_worker_channels_lock_held_by_python(live):
    lane, worker, handle, client, conn = live
    handle.lock.acquire()  # a Python request to the same worker is in flight
    served = []
    thread = threading.Thread(target=lambda: served.append(conn.serve()))
    client.sendall(invoke_request("c-1", {"payload": "eA=="}))
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and worker.seen == [], "the lane sent on a channel Python was using"
    handle.lock.release()
    thread.join(5)
    assert served == [restore_lane.SERVED] and read_response(client)[0] == 200


@pytest.mark.parametrize("case", ["unknown clone", "withdrawn", "payload over req_cap", "not canonical base64"])
def test_an_invocation_the_lane_does_not_take_stays_pythons_byte_for_byte(live, case):
    lane, worker, handle, client, conn = live
    clone, payload = "c-1", "aGVsbG8="
    if case == "unknown clone":
        clone = "c-2"
    elif case == "withdrawn":
        lane.withdraw_clone("c-1")
    elif case == "payload over req_cap":
        payload = base64.b64encode(b"x" * 4097).decode()
    else:
        payload = "Zh=="
    request = invoke_request(clone, {"payload": payload})
    client.sendall(request)
    assert conn.serve() == restore_lane.SLOW and conn.take() == request and worker.seen == []
    token = lane.clone_tickets.get("c-1", 0)
    assert not token or lib.lane_board_taken(lane.board, token) == 0


def test_a_live_invocation_refused_early_answered_or_unsent_is_handed_over(lane):
    client, server = socket.socketpair()
    conn = lane.connection(server.fileno())
    workers = handed_over_workers()
    try:
        for n, (worker, stage) in enumerate(zip(workers, ("REFUSED", "SENT", "UNSENT"))):
            handle = LiveHandle(worker)
            lane.offer_clone(LiveClone(f"c-{n}", handle), IMAGE)
            token = lane.clone_tickets[f"c-{n}"]
            if stage == "UNSENT":
                worker.end.shutdown(socket.SHUT_RDWR)  # the worker is gone: its channel refuses
            client.sendall(invoke_request(f"c-{n}", {"payload": "eA=="}))
            assert conn.serve() == restore_lane.HANDOFF
            out = conn.out
            assert out.kind == restore_lane.INVOKE and out.token == token
            assert out.stage == getattr(lib, f"LANE_STAGE_{stage}")
            assert lane.clone_ticket(token).worker is handle
            held = not handle.lock.acquire(blocking=False)
            assert held == (stage == "SENT"), "only at SENT does the lane leave the channel's lock to Python"
            if stage == "REFUSED":
                assert out.status == protocol.LANE_STATUS["timeout"] and conn.data() == b"no reply within 0.1 s"
                handle.lock.release()
            elif stage == "SENT":  # Python reads on from the event, with the lock the lane left it
                event, _, _ = protocol.recv(worker.daemon_end)
                reply, result, _ = protocol.recv(worker.daemon_end)
                assert event["event"] == "failed" and reply["id"] == out.request_id and result == b"x"
                handle.lock.release()
            else:
                handle.lock.release()
            if n == 0:  # withdrawn while taken: it goes when Python is done, never offered again
                lane.withdraw_clone(f"c-{n}")
                assert lib.lane_board_taken(lane.board, token) == 1 and token in lane.live_tokens
                lane.untake_clone(token)
                assert lib.lane_board_withdraw(lane.board, token) == lib.LANE_TICKET_UNKNOWN
                assert token not in lane.live_tokens and token not in lane.closing
            else:  # offered again once Python is done
                lane.untake_clone(token)
                assert lib.lane_board_taken(lane.board, token) == 0 and lane.clone_tickets[f"c-{n}"] == token
    finally:
        client.close()
        server.close()
        for worker in workers:
            worker.close()
