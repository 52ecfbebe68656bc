"""The daemon's HTTP/JSON API (docs/api/snapd-openapi.json), served on a Unix socket and optionally on TCP
127.0.0.1. Requests and replies go through snapd.http_wire (a lean HTTP/1.1 reader/writer: http.server's
email-based header parsing was a tenth of a restore's latency); body validation is the VMM API's
(vmm.api.fields), and so are the server socket helpers (vmm.api.server.UnixHttpServer).

The Unix socket is guarded by its mode and group (snapd.serve). TCP is open to every local user and to every web
page a local browser shows, so each TCP request must carry ``Authorization: Bearer <token>`` (401 otherwise),
name the listener in ``Host`` (421 otherwise: a DNS-rebound page sends its own host name), and send a body only as
``Content-Type: application/json`` (415 otherwise: the one kind of body a cross-origin page cannot send without a
preflight, which this API never answers). TCP connections never go through the restore lane (which would answer
before these checks); the Unix socket's do.

Connections (``Connections``, snapd/csrc/lane_server.c; docs/reliability.md): the listeners' threads only accept;
every connection then waits in one epoll set shared by a bounded pool of handler threads, the one that gets its
event serves it (the lane in C, or Python here, reading without blocking until a request is whole), so idle and
slow clients hold no thread. ``Limits``: a cap on connections (503 and close beyond it), an idle timeout, a
deadline for a request's head and body from its first byte (408), and a bound on requests served at once (503).
"""
from __future__ import annotations

import hmac
import json
import logging
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

from snapd import http_wire
from snapd._lane_native import ffi, lib
from snapd.daemon import images as image_routes
from snapd.daemon import lane as restore_lane
from snapd.daemon.lane import LaneBuffer
from snapd.daemon.core import SERVER, Daemon
from snapd.daemon.errors import ApiError
from vmm.api.fields import Field, ObjectSpec, parse_body
from vmm.api.server import Router, UnixHttpServer, error_reply

log = logging.getLogger("snapd")

IMAGE_REGISTER = ObjectSpec("images", {
    "state_path": Field("string", required=True, path=True),
    "mem_path": Field("string", required=True, path=True),
    "chunk_size": Field("integer", minimum=4096),
    "codec": Field("string", enum=("lz4", "zstd", "raw")),
    "loading_set": Field("string", path=True),  # a loading-set file: pre-filled into the shared memfd
})
LOADING_SET = ObjectSpec("loading_set", {"path": Field("string", path=True)})  # {}: record from the clones' faults
MAX_TIMEOUT_MS = 3_600_000  # an hour: also what the restore lane takes (snapd/csrc/lane_http.c LANE_MAX_TIMEOUT_MS)
CLONES_CREATE = ObjectSpec("clones", {
    "image": Field("string", required=True),
    "count": Field("integer", minimum=1),
    "payload": Field("string"),  # base64: a first invocation, answered in the same reply
    "timeout_ms": Field("integer", minimum=1, maximum=MAX_TIMEOUT_MS),
})
INVOKE = ObjectSpec("invoke", {
    "payload": Field("string", required=True),
    "timeout_ms": Field("integer", minimum=1, maximum=MAX_TIMEOUT_MS),
})
SNAPSHOT = ObjectSpec("snapshot", {
    "state_path": Field("string", path=True),
    "mem_path": Field("string", path=True),
})


class Text(str):
    """A reply that is plain text (the Prometheus exposition), not JSON."""


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # OpenAPI path template
    call: Callable  # call(daemon, [body,] **path_parameters) -> dict (200/201), Text, or None (204)
    body: ObjectSpec | None = None
    status: int = 200

    def handle(self, daemon: Daemon, body: bytes, params: dict):
        if self.body is None:
            return self.call(daemon, **params)
        return self.call(daemon, parse_body(body, self.body), **params)


# The tests check this table against docs/api/snapd-openapi.json (paths, methods, request schemas).
ROUTES = [
    Route("GET", "/v1/images", Daemon.list_images),
    Route("POST", "/v1/images", image_routes.register_image, IMAGE_REGISTER, 201),
    Route("GET", "/v1/images/{image_id}", Daemon.get_image),
    Route("DELETE", "/v1/images/{image_id}", Daemon.delete_image),
    Route("GET", "/v1/images/{image_id}/loading-set", image_routes.get_loading_set),
    Route("POST", "/v1/images/{image_id}/loading-set", image_routes.set_loading_set, LOADING_SET),
    Route("GET", "/v1/clones", Daemon.list_clones),
    Route("POST", "/v1/clones", Daemon.create_clones, CLONES_CREATE, 201),
    Route("GET", "/v1/clones/{clone_id}", Daemon.get_clone),
    Route("DELETE", "/v1/clones/{clone_id}", Daemon.delete_clone),
    Route("POST", "/v1/clones/{clone_id}/invoke", Daemon.invoke, INVOKE),
    Route("POST", "/v1/clones/{clone_id}/snapshot", Daemon.snapshot_clone, SNAPSHOT),
    Route("GET", "/metrics", lambda daemon: Text(daemon.metrics_text())),
]

ROUTER = Router(ROUTES, parameter=r"[A-Za-z0-9_-]{1,64}", convert=str)  # image and clone ids


@dataclass(frozen=True)
class Limits:
    """What one client can hold of the daemon (docs/reliability.md, "Limits and timeouts"; the options of snapd
    serve). Connections beyond max_connections get a 503 and are closed; an idle kept-alive connection is closed
    after idle_timeout seconds; a request whose head and body have not all come request_timeout seconds after
    its first byte gets a 408 and is closed (and a reply the client does not take within it ends the
    connection); at most max_inflight requests are served at once (one handler thread each): more wait, and
    get a 503 once every thread has been busy QUEUE_WAIT seconds without finishing one."""
    max_connections: int = 1024
    idle_timeout: float = 60.0
    request_timeout: float = 10.0
    max_inflight: int = 256


INITIAL_THREADS = 4  # handler threads started with the server; more are started as requests overlap
QUEUE_WAIT = 1.0     # s: every handler thread busy and none finishing this long: requests waiting get a 503


class Conn:
    """One client connection, as Python sees it: its socket, what Python has read of a request (``stream``,
    ``request`` once the head is parsed), the lane's buffer (None on TCP) and the TCP checks."""
    __slots__ = ("handle", "sock", "stream", "lane", "guard", "request", "started", "continued")

    def __init__(self, handle: int, sock: socket.socket, lane, guard):
        self.handle, self.sock, self.lane, self.guard = handle, sock, lane, guard
        self.stream = http_wire.Stream(sock)
        self.request: http_wire.Request | None = None
        self.started = 0        # time.monotonic_ns() when the request being read began arriving
        self.continued = False  # 100 Continue sent for it


class Connections:
    """Every API connection of the daemon (its Unix socket's and its TCP listener's), in one epoll set that a
    bounded pool of handler threads waits on together (snapd/csrc/lane_server.c). The thread that gets a
    connection's event serves its request itself: in C for what the restore lane takes (no Python and no
    hand-off between the request's bytes and its reply), else here. A connection holds no thread while it is
    idle or while its request is still arriving; one reaper thread closes idle ones and cuts slow requests.
    So the daemon's threads are INITIAL_THREADS to max_inflight handlers and the reaper, whatever clients do. A
    request that finds no other handler thread waiting starts one, up to max_inflight. Beyond that, requests
    wait in the kernel (their connections stay readable in the epoll set) until a thread is free: a burst is
    served, late; if every thread stays busy QUEUE_WAIT seconds without finishing a request (invocations that
    block, clients that do not read their replies), the reaper answers the waiting ones 503."""

    def __init__(self, daemon: Daemon, limits: Limits):
        self.daemon = daemon
        self.limits = limits
        self.server = lib.lane_server_new(limits.max_connections, daemon.lane.board,
                                          max(1, int(limits.request_timeout * 1000)),
                                          max(1, int(limits.idle_timeout * 1000)))
        if self.server == ffi.NULL:
            raise OSError("could not set up the connection server (epoll)")
        self.conns: dict[int, Conn] = {}
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.max_threads = limits.max_inflight
        self.finished = 0  # requests and events handled (the reaper's sign that the handlers make progress)
        self.stopping = threading.Event()
        self.users = 0  # listeners served (SnapdUnixServer, SnapdTcpServer)
        self.refused = {"connections": 0, "busy": 0, "request_timeout": 0, "idle_closed": 0}
        timeout = max(limits.request_timeout, 0.001)
        self.send_timeout = struct.pack("ll", int(timeout), int(timeout % 1 * 1e6))
        for _ in range(min(INITIAL_THREADS, self.max_threads)):
            self._start_thread()
        self.reaper = threading.Thread(target=self._reap, name="snapd-http-reaper", daemon=True)
        self.reaper.start()

    # -- connections
    def add(self, sock: socket.socket, guard: "TcpGuard | None") -> None:
        """A connection just accepted (by the listener's thread): watched from now on, or refused at the cap."""
        if self.stopping.is_set():
            sock.close()
            return
        lane = self.daemon.lane.enabled and guard is None
        try:
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self.send_timeout)  # a reply not taken: cut
        except OSError:
            sock.close()
            return
        handle = lib.lane_server_add(self.server, sock.fileno(), int(lane))
        if handle < 0:
            self.refused["connections"] += 1
            refuse(sock, 503, f"too many connections: the daemon serves at most {self.limits.max_connections} at "
                              f"once (snapd serve --max-connections); close idle ones or retry later")
            return
        conn = Conn(handle, sock, LaneBuffer(lib.lane_server_conn(self.server, handle)) if lane else None, guard)
        self.conns[handle] = conn  # before it is armed: its first event may come at once
        if lib.lane_server_arm(self.server, handle, int(lane), 0) < 0:
            self._close(conn)

    def count(self) -> int:
        return lib.lane_server_count(self.server)

    def _close(self, conn: Conn) -> None:
        """The connection's owner (its handler thread, or the reaper) closes it."""
        if self.conns.pop(conn.handle, None) is None:
            return
        lib.lane_server_remove(self.server, conn.handle)
        conn.lane = None
        conn.sock.close()

    def _refuse(self, conn: Conn, status: int, message: str) -> None:
        self._close_after(conn, fault(status, message))

    def _close_after(self, conn: Conn, reply: bytes) -> None:
        """Write a last reply without blocking (a client that does not read loses it) and close."""
        if self.conns.pop(conn.handle, None) is None:
            return
        lib.lane_server_remove(self.server, conn.handle)
        conn.lane = None
        last_words(conn.sock, reply)

    # -- handler threads
    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._run, name=f"snapd-http-{len(self.threads)}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def _grow(self) -> bool:
        """Another handler thread, so that one stays waiting for events; False at max_inflight."""
        with self.lock:
            if self.stopping.is_set() or len(self.threads) >= self.max_threads:
                return False
            self._start_thread()
        return True

    def _busy(self, conn: Conn) -> None:
        self.refused["busy"] += 1
        self._refuse(conn, 503, f"the daemon's {self.limits.max_inflight} handler threads (snapd serve "
                                f"--max-inflight) have all been busy for {QUEUE_WAIT:g} s without finishing a "
                                f"request: retry later")

    def _run(self) -> None:
        ev = ffi.new("struct lane_event *")
        while True:
            kind = lib.lane_server_wait(self.server, -1, ev)  # the GIL released; the lane serves here, in C
            if kind == lib.LANE_EV_STOP:
                return
            if kind == lib.LANE_EV_TIMEOUT:
                continue
            conn = self.conns.get(ev.handle)
            if conn is None:  # cannot be: a connection is recorded before it is first armed
                log.error("an event for unknown connection %#x", ev.handle)
                continue
            try:
                self._serve(conn, kind, ev)
                self.finished += 1
            except OSError:  # the client went away, or stopped reading its replies (SO_SNDTIMEO)
                self._close(conn)
            except Exception:  # noqa: BLE001 (a bug: reported, and only this connection pays)
                log.exception("connection handler failed")
                self._close(conn)

    def _serve(self, conn: Conn, kind: int, ev) -> None:
        """Everything this thread owes the connection, until it is armed again or closed."""
        while True:
            if kind == lib.LANE_EV_ARMED:
                return
            if kind == lib.LANE_EV_EOF:
                self._close(conn)
                return
            if kind in (lib.LANE_EV_SERVED, lib.LANE_EV_HANDOFF):
                if not self._after_lane(conn, kind, ev.served):
                    self._close(conn)
                    return
                kind = lib.lane_server_resume(self.server, conn.handle, 0, ev)
            elif kind == lib.LANE_EV_FULL:  # no thread left waiting: start one (if we may), then serve it here
                self._grow()
                kind = lib.lane_server_resume(self.server, conn.handle, 1, ev)
            elif kind == lib.LANE_EV_SLOW:  # the request is http_wire's, from the same bytes
                if not conn.stream.buf:
                    conn.started = time.monotonic_ns()
                conn.stream.buf += conn.lane.take()
                kind = self._python(conn, ev)
            elif kind == lib.LANE_EV_READY:
                kind = self._python(conn, ev)
            else:
                raise RuntimeError(f"unknown connection event {kind}")

    def _python(self, conn: Conn, ev) -> int:
        """Read (without blocking) and serve the connection's requests the Python way: the next event kind to
        handle (ARMED when it waits for bytes again, EOF when it is closed)."""
        stream, eof = conn.stream, False
        while True:
            try:
                if conn.request is None:
                    conn.request = stream.next_request()
                    if conn.request is not None and conn.guard is not None:
                        refused = conn.guard.refuse(conn.request)  # on the head: before the body is read
                        if refused is not None:
                            self._close_after(conn, refused)
                            return lib.LANE_EV_ARMED
                request = conn.request
                if request is not None and stream.body_ready(request):
                    conn.request, conn.continued, conn.started = None, False, 0
                    after = self._dispatch(conn, request, ev)
                    if after != lib.LANE_EV_READY:
                        return after
                    continue  # TCP: the next request, from what is buffered or what comes
                if request is not None and not conn.continued and stream.wants_continue(request):
                    conn.sock.sendall(http_wire.CONTINUE)
                    conn.continued = True
                if eof:
                    error = stream.eof_error(request)
                    if error is not None:
                        raise error
                    self._close(conn)
                    return lib.LANE_EV_ARMED
            except http_wire.WireError as exc:  # the stream cannot be trusted past this: answer, close
                self._close_after(conn, fault(exc.status, str(exc)))
                return lib.LANE_EV_ARMED
            try:
                data = conn.sock.recv(http_wire.RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:  # all that has come: wait for the rest (the reaper cuts it at the deadline)
                pending = conn.request is not None or stream.buf
                if pending and not conn.started:
                    conn.started = time.monotonic_ns()
                if lib.lane_server_arm(self.server, conn.handle, 0, conn.started if pending else 0) < 0:
                    self._close(conn)
                return lib.LANE_EV_ARMED
            except (ConnectionResetError, TimeoutError):
                data = b""
            if not data:
                eof = True
            else:
                if not stream.buf and conn.request is None:
                    conn.started = time.monotonic_ns()
                stream.buf += data

    def _dispatch(self, conn: Conn, request: http_wire.Request, ev) -> int:
        """Serve a whole request and write its reply: READY to read on (TCP), else the next event kind."""
        if lib.lane_server_waiting(self.server) == 0:
            self._grow()  # so that a thread stays waiting for the next connection's event (up to max_inflight)
        conn.sock.sendall(self.dispatch(request))
        self.finished += 1
        if not request.keep_alive:
            self._close(conn)
            return lib.LANE_EV_ARMED
        if conn.lane is None:
            return lib.LANE_EV_READY
        stream = conn.stream
        if stream.buf:  # pipelined bytes: the lane reads on from them
            conn.lane.push(bytes(stream.buf))
            stream.buf.clear()
        return lib.lane_server_resume(self.server, conn.handle, 0, ev)

    def _reap(self) -> None:
        """Close connections idle past idle_timeout; answer 408 to requests not whole request_timeout after
        their first byte; answer 503 to requests waiting while every handler thread has been busy QUEUE_WAIT
        without finishing one. Checked every tick (a tenth of the shorter timeout, 50 to 250 ms)."""
        handles = ffi.new("uint64_t[]", 512)
        kinds = ffi.new("int32_t[]", 512)
        tick = min(0.25, max(0.05, min(self.limits.request_timeout, self.limits.idle_timeout) / 10))
        stuck_since, finished = None, self.finished
        while not self.stopping.wait(tick):
            now = time.monotonic()
            if len(self.threads) < self.max_threads or lib.lane_server_waiting(self.server) > 0:
                stuck_since = None
            elif stuck_since is None or self.finished != finished:
                stuck_since, finished = now, self.finished
            elif now - stuck_since >= QUEUE_WAIT:
                for i in range(lib.lane_server_claim_queued(self.server, handles, 512)):
                    conn = self.conns.get(handles[i])
                    if conn is not None:
                        self._busy(conn)
            while True:
                n = lib.lane_server_expire(self.server, handles, kinds, 512)
                for i in range(n):
                    conn = self.conns.get(handles[i])
                    if conn is None:
                        continue
                    if kinds[i] == lib.LANE_EXPIRED_REQUEST:
                        self.refused["request_timeout"] += 1
                        self._refuse(conn, 408, f"the request did not arrive whole within "
                                                f"{self.limits.request_timeout:g} s of its first byte "
                                                f"(snapd serve --request-timeout)")
                    else:
                        self.refused["idle_closed"] += 1
                        self._close(conn)
                if n < 512:
                    break

    # -- what a request gets
    def _after_lane(self, conn: Conn, kind: int, out) -> bool:
        """What follows a request the lane took: a restore it answered is recorded, one it stopped (HANDOFF) is
        finished here and answered; an invocation it answered needs nothing (counted in C). False: the
        connection ends."""
        daemon = self.daemon
        invoke = out.kind == restore_lane.INVOKE
        if kind == lib.LANE_EV_SERVED and not invoke:
            try:
                daemon.lane_served(out)
            except ApiError as exc:  # answered, but the daemon could not keep the clone (stopping)
                log.warning("a clone the lane restored was dropped: %s", exc)
                return False
        elif kind == lib.LANE_EV_HANDOFF:
            finish = daemon.lane_invoke_handoff if invoke else daemon.lane_handoff
            path = "/v1/clones/{clone_id}/invoke" if invoke else "/v1/clones"
            data = conn.lane.data(out)
            conn.sock.sendall(answer(lambda: finish(out, data), 200 if invoke else 201, bool(out.keep_alive),
                                     "POST", path))
        return bool(out.keep_alive)

    def dispatch(self, request: http_wire.Request) -> bytes:
        def call():
            route, params = ROUTER.find(request.method, request.path)
            return route.handle(self.daemon, request.body, params), route.status
        return answer(call, None, request.keep_alive, request.method, request.path)

    # -- the end
    def release(self) -> None:
        """A listener is closed; with the last one, every connection and thread goes."""
        with self.lock:
            self.users -= 1
            last = self.users <= 0
        if last:
            self.close()

    def close(self, wait: float = 1.0) -> None:
        """Stop: waiting threads leave at once; one still serving a request (an invocation that blocks) is given
        ``wait`` seconds, then left to the process's end (its connection is shut down)."""
        with self.lock:
            if self.stopping.is_set():
                return
            self.stopping.set()
        lib.lane_server_stop(self.server)
        deadline = time.monotonic() + wait
        for thread in self.threads + [self.reaper]:
            thread.join(max(0.0, deadline - time.monotonic()))
        done = not any(t.is_alive() for t in self.threads + [self.reaper])
        for conn in list(self.conns.values()):
            if done:
                self._close(conn)
            else:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if done:  # no thread can be inside it any more
            lib.lane_server_free(self.server)
            self.server = ffi.NULL


def answer(call: Callable, status_ok: int | None, keep_alive: bool, method: str, path: str) -> bytes:
    """The reply to ``call()``: its result (and status), or the error it raised, as JSON (or Text)."""
    t0 = time.perf_counter()
    headers = {}
    try:
        result = call()
        if status_ok is None:
            result, status_ok = result
        status = 204 if result is None else status_ok
    except Exception as exc:  # noqa: BLE001 (as the VMM's API: error_reply tells mistakes from bugs)
        status, result, headers = error_reply(exc)
    if isinstance(result, Text):
        reply = http_wire.response(status, result.encode(), "text/plain; version=0.0.4; charset=utf-8",
                                   headers, not keep_alive, SERVER)
    else:
        body = b"" if status == 204 else json.dumps(result).encode()
        reply = http_wire.response(status, body, "application/json", headers, not keep_alive, SERVER)
    if log.isEnabledFor(logging.INFO):
        log.info("%s %s -> %d (%.0f us)", method, path, status, (time.perf_counter() - t0) * 1e6)
    return reply


def fault(status: int, message: str) -> bytes:
    """An error reply that ends the connection."""
    return http_wire.response(status, json.dumps({"fault_message": message}).encode(), close=True, server=SERVER)


def last_words(sock: socket.socket, reply: bytes) -> None:
    """Send ``reply`` without blocking, then close: the client reads it, then EOF (what it had sent and we did
    not read is dropped first, so that TCP does not answer it with a reset that could discard the reply)."""
    try:
        sock.send(reply, socket.MSG_DONTWAIT)
        sock.shutdown(socket.SHUT_WR)
        for _ in range(16):
            if not sock.recv(65536, socket.MSG_DONTWAIT):
                break
    except OSError:
        pass
    sock.close()


def refuse(sock: socket.socket, status: int, message: str) -> None:
    last_words(sock, fault(status, message))


class SnapdUnixServer(UnixHttpServer):
    """The API's Unix socket. Its listener's thread (serve_forever, or snapd serve's loop) only accepts: each
    connection goes to the daemon's Connections (shared with the TCP listener) and is served there."""
    request_queue_size = 512  # a burst of schedulers connecting at once must not be refused

    def __init__(self, path: str, daemon: Daemon, limits: Limits | None = None,
                 connections: Connections | None = None):
        super().__init__(path, daemon)
        self.RequestHandlerClass = None  # no handler per connection: Connections serves them
        self.connections = connections or Connections(daemon, limits or Limits())
        self.connections.users += 1

    def process_request(self, request, client_address) -> None:
        self.connections.add(request, None)

    def server_close(self) -> None:
        super().server_close()
        connections, self.connections = getattr(self, "connections", None), None
        if connections is not None:
            connections.release()


class TcpGuard:
    """The checks every request on the TCP listener passes before its body is read or it is routed: the listener's
    Host, the bearer token (compared in constant time), and a JSON body. Each refusal is a JSON error naming the
    rule, and the connection closes."""

    def __init__(self, port: int, token: str):
        if not token:
            raise ValueError("the TCP listener needs a token")
        self.token = token.encode()
        self.port = port
        self.hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}

    def refuse(self, request: http_wire.Request) -> bytes | None:
        host = request.headers.get("host", "").strip().lower()
        if host not in self.hosts:
            return self._reply(421, f"Host {host[:100]!r} is not this listener's: send Host: 127.0.0.1:{self.port} "
                                    f"or localhost:{self.port} (requests for other host names are refused)")
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), self.token):
            return self._reply(401, "the TCP API needs Authorization: Bearer <token> with the token of snapd serve "
                                    "--token-file", {"WWW-Authenticate": 'Bearer realm="snapd"'})
        if request.length:
            media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return self._reply(415, "a request body must be sent as Content-Type: application/json on the TCP "
                                        "API (other types are refused: cross-origin pages send them)")
        return None

    @staticmethod
    def _reply(status: int, message: str, headers: dict | None = None) -> bytes:
        return http_wire.response(status, json.dumps({"fault_message": message}).encode(), "application/json",
                                  headers or {}, True, SERVER)


class SnapdTcpServer(socketserver.TCPServer):
    """The API on 127.0.0.1:PORT, for clients that cannot reach the Unix socket; every request is checked by its
    TcpGuard (token, Host, JSON body) and none goes through the restore lane. Its connections are served by the
    daemon's Connections (pass the Unix socket's, so that the limits hold for both together)."""
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, port: int, daemon: Daemon, token: str, limits: Limits | None = None,
                 connections: Connections | None = None):
        self.controller = daemon
        self.guard = TcpGuard(port, token)
        super().__init__(("127.0.0.1", port), None)
        self.connections = connections or Connections(daemon, limits or Limits())
        self.connections.users += 1

    def process_request(self, request, client_address) -> None:
        self.connections.add(request, self.guard)

    def server_close(self) -> None:
        super().server_close()
        connections, self.connections = getattr(self, "connections", None), None
        if connections is not None:
            connections.release()
