"""A small client of the snapd API for schedulers, the tests and bench/ (stdlib only).

    with SnapdClient("/var/lib/snapd/snapd.sock") as snapd:
        image = snapd.register_image("vm.state", "vm.mem")["id"]
        clone = snapd.create_clones(image)[0]
        reply = snapd.invoke(clone["id"], b"hello")
        snapd.delete_clone(clone["id"])

One kept-alive HTTP/1.1 connection per client (use one client per thread), spoken with snapd.http_wire on a raw
socket (http.client's email-based reply parsing was ~0.3 ms a request). Errors raise SnapdError with the status
and the daemon's fault_message.

A request is never repeated unless repeating it cannot do anything twice: the daemon closes kept-alive
connections that sit idle (snapd serve --idle-timeout), so before each request the connection is checked and a
closed one replaced (nothing was sent on it); if sending still fails, the request is sent again on a fresh
connection only when not a byte of it was written, or when it is a GET (idempotent). A POST or DELETE whose
connection failed after it was sent raises: it may have been done (the caller decides, e.g. by listing clones).
"""
from __future__ import annotations

import base64
import json
import select
import socket

from snapd import http_wire
from vmm.api.client import ApiClientError, ApiResponse, connect_unix

JSON_HEADERS = {"Accept": "application/json", "Content-Type": "application/json"}
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS"))  # what may be sent twice without doing anything twice


class SnapdError(ApiClientError):
    """The daemon answered with an error status (``status``, ``fault_message``)."""


class SnapdClient:
    def __init__(self, socket_path: str, timeout: float | None = 120.0):
        self.socket_path = socket_path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.stream: http_wire.Stream | None = None
        self.written = 0  # bytes of the current request written to the socket

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = self.stream = None

    def __enter__(self) -> "SnapdClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connect(self) -> None:
        sock = connect_unix(self.socket_path, self.timeout)
        self.sock, self.stream = sock, http_wire.Stream(sock)

    def _dropped(self) -> bool:
        """Whether the kept-alive connection can no longer take a request: the daemon closed it (idle timeout,
        shutdown) or wrote something unasked. Readable before a request is sent means one of those."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def _send(self, message: bytes) -> None:
        view = memoryview(message)
        while view:
            n = self.sock.send(view)
            self.written += n
            view = view[n:]

    def _reply_before_close(self, method: str):
        """After a failed send: a reply the daemon wrote before it closed (a 503 at its connection cap), or None."""
        try:
            self.sock.settimeout(min(self.timeout or 1.0, 1.0))
            return self.stream.read_response(method)
        except (OSError, http_wire.WireError):
            return None

    def request(self, method: str, path: str, body=None, raw: bytes | None = None) -> ApiResponse:
        """One request (``body`` is JSON-encoded, ``raw`` sent as is); never raises on an error status. Sent again
        (once) only if it provably was not sent, or is a GET (see the module's docstring)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        message = http_wire.request(method, path, data, JSON_HEADERS if data is not None else None)
        for attempt in (0, 1):
            if self.sock is not None and self._dropped():
                self.close()  # closed while idle: nothing of this request was sent on it
            if self.sock is None:
                self._connect()
            self.written = 0
            try:
                self._send(message)
                status, headers, payload, keep_alive = self.stream.read_response(method)
                break
            except (BrokenPipeError, ConnectionResetError):
                early = self._reply_before_close(method) if self.written < len(message) else None
                self.close()
                if early is not None:
                    status, headers, payload, keep_alive = early
                    break
                if attempt or not (self.written == 0 or method in IDEMPOTENT):
                    raise  # it may have reached the daemon: never sent twice
            except BaseException:
                self.close()  # a timeout or a bad reply: the connection's state is unknown
                raise
        if not keep_alive:
            self.close()
        return ApiResponse(status, headers, payload)

    def call(self, method: str, path: str, body=None):
        reply = self.request(method, path, body)
        if reply.status >= 300:
            raise SnapdError(method, path, reply.status, reply.fault_message())
        return reply.json() if reply.headers.get("Content-Type", "").startswith("application/json") else reply.body

    # -- images
    def register_image(self, state_path: str, mem_path: str, chunk_size: int | None = None,
                       codec: str | None = None) -> dict:
        body = {"state_path": state_path, "mem_path": mem_path}
        if chunk_size is not None:
            body["chunk_size"] = chunk_size
        if codec is not None:
            body["codec"] = codec
        return self.call("POST", "/v1/images", body)

    def images(self) -> list[dict]:
        return self.call("GET", "/v1/images")["images"]

    def image(self, image_id: str) -> dict:
        return self.call("GET", f"/v1/images/{image_id}")

    def delete_image(self, image_id: str) -> None:
        self.call("DELETE", f"/v1/images/{image_id}")

    # -- clones
    def create_clones(self, image_id: str, count: int = 1, payload: bytes | None = None,
                      timeout_ms: int | None = None) -> list[dict]:
        """Restore ``count`` clones; with ``payload`` each answers it as its first invocation (``result``)."""
        body = {"image": image_id, "count": count}
        if payload is not None:
            body["payload"] = base64.b64encode(payload).decode()
        if timeout_ms is not None:
            body["timeout_ms"] = timeout_ms
        clones = self.call("POST", "/v1/clones", body)["clones"]
        for clone in clones:
            if "result" in clone:
                clone["result"] = base64.b64decode(clone["result"])
        return clones

    def clones(self) -> list[dict]:
        return self.call("GET", "/v1/clones")["clones"]

    def clone(self, clone_id: str) -> dict:
        return self.call("GET", f"/v1/clones/{clone_id}")

    def invoke(self, clone_id: str, payload: bytes, timeout_ms: int = 10_000) -> bytes:
        reply = self.call("POST", f"/v1/clones/{clone_id}/invoke",
                          {"payload": base64.b64encode(payload).decode(), "timeout_ms": timeout_ms})
        return base64.b64decode(reply["result"])

    def snapshot_clone(self, clone_id: str, state_path: str | None = None, mem_path: str | None = None) -> dict:
        body = {k: v for k, v in (("state_path", state_path), ("mem_path", mem_path)) if v is not None}
        return self.call("POST", f"/v1/clones/{clone_id}/snapshot", body)

    def delete_clone(self, clone_id: str) -> None:
        self.call("DELETE", f"/v1/clones/{clone_id}")

    def metrics(self) -> str:
        return self.call("GET", "/metrics").decode()

    def metric_samples(self) -> dict[str, float]:
        """GET /metrics as {sample: value}, a sample named as written, labels included:
        ``snapd_pool_idle_workers``, ``snapd_shared_bytes{image="..."}``."""
        samples = {}
        for line in self.metrics().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples
