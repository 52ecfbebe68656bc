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
"""
from __future__ import annotations

import hmac
import json
import logging
import socket
import socketserver
import time
from dataclasses import dataclass
from typing import Callable

from snapd import http_wire
from snapd.daemon import images as image_routes
from snapd.daemon import lane as restore_lane
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


class SnapdRequestHandler(socketserver.BaseRequestHandler):
    """One connection (its own thread, so an invocation waiting for its guest blocks no other client): requests
    read and replies written by snapd.http_wire, kept alive until the client closes or asks to."""

    def handle(self) -> None:
        sock = self.request
        guard = getattr(self.server, "guard", None)  # TCP: every request checked (TcpGuard), none through the lane
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        daemon = self.server.controller
        lane = daemon.lane.connection(sock.fileno()) if daemon.lane.enabled and guard is None else None
        stream = http_wire.Stream(sock)
        try:
            while True:
                if lane is not None:
                    kind = lane.serve()  # a restore it can take never reaches the Python below
                    if kind == restore_lane.EOF_:
                        return
                    if kind in (restore_lane.SERVED, restore_lane.HANDOFF):
                        if not self.after_lane(daemon, lane, kind):
                            return
                        continue
                    stream.buf += lane.take()  # SLOW: the request is http_wire's, from the same bytes
                try:
                    request = stream.read_request()
                    if request is None:
                        return
                    if guard is not None:
                        refused = guard.refuse(request)  # before the body is read: an unchecked caller sends none
                        if refused is not None:
                            sock.sendall(refused)
                            return
                    stream.read_body(request)
                except http_wire.WireError as exc:  # the stream cannot be trusted past this: answer, close
                    sock.sendall(http_wire.response(exc.status, json.dumps({"fault_message": str(exc)}).encode(),
                                                    close=True, server=SERVER))
                    return
                reply = self.dispatch(request)
                sock.sendall(reply)
                if not request.keep_alive:
                    return
                if lane is not None and stream.buf:  # pipelined bytes: the lane reads on from them
                    lane.push(bytes(stream.buf))
                    stream.buf.clear()
        except (BrokenPipeError, ConnectionResetError):
            return  # the client went away

    def after_lane(self, daemon: Daemon, lane, kind: int) -> bool:
        """What follows a request the lane took: a restore it answered is recorded, one it stopped (HANDOFF) is
        finished here and answered; an invocation it answered needs nothing (counted in C). False: the
        connection ends."""
        out = lane.out
        invoke = out.kind == restore_lane.INVOKE
        if kind == restore_lane.SERVED and not invoke:
            try:
                daemon.lane_served(out)
            except ApiError as exc:  # answered, but the daemon could not keep the clone (stopping)
                log.warning("a clone the lane restored was dropped: %s", exc)
                return False
        elif kind == restore_lane.HANDOFF:
            finish = daemon.lane_invoke_handoff if invoke else daemon.lane_handoff
            path = "/v1/clones/{clone_id}/invoke" if invoke else "/v1/clones"
            self.request.sendall(self.answer(lambda: finish(out, lane.data()), 200 if invoke else 201,
                                             bool(out.keep_alive), "POST", path))
        return bool(out.keep_alive)

    def dispatch(self, request: http_wire.Request) -> bytes:
        def call():
            route, params = ROUTER.find(request.method, request.path)
            return route.handle(self.server.controller, request.body, params), route.status
        return self.answer(call, None, request.keep_alive, request.method, request.path)

    def answer(self, call: Callable, status_ok: int | None, keep_alive: bool, method: str, path: str) -> bytes:
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


class SnapdUnixServer(UnixHttpServer):
    request_queue_size = 512  # a burst of schedulers connecting at once must not be refused

    def __init__(self, path: str, daemon: Daemon):
        super().__init__(path, daemon)
        self.RequestHandlerClass = SnapdRequestHandler  # UnixHttpServer fixes the VMM's handler


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


class SnapdTcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The API on 127.0.0.1:PORT, for clients that cannot reach the Unix socket; every request is checked by its
    TcpGuard (token, Host, JSON body) and none goes through the restore lane."""
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, port: int, daemon: Daemon, token: str):
        self.controller = daemon
        self.guard = TcpGuard(port, token)
        super().__init__(("127.0.0.1", port), SnapdRequestHandler)
