"""A small client of the snapd API for schedulers, the tests and bench/ (stdlib only).

    with SnapdClient("/var/lib/snapd/snapd.sock") as snapd:
        image = snapd.register_image("vm.state", "vm.mem")["id"]
        clone = snapd.create_clones(image)[0]
        reply = snapd.invoke(clone["id"], b"hello")
        snapd.delete_clone(clone["id"])

One kept-alive HTTP/1.1 connection per client (use one client per thread), spoken with snapd.http_wire on a raw
socket (http.client's email-based reply parsing was ~0.3 ms a request). Errors raise SnapdError with the status
and the daemon's fault_message.
"""
from __future__ import annotations

import base64
import json
import socket

from snapd import http_wire
from vmm.api.client import ApiClientError, ApiResponse, connect_unix

JSON_HEADERS = {"Accept": "application/json", "Content-Type": "application/json"}


class SnapdError(ApiClientError):
    """The daemon answered with an error status (``status``, ``fault_message``)."""


class SnapdClient:
    def __init__(self, socket_path: str, timeout: float | None = 120.0):
        self.socket_path = socket_path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.stream: http_wire.Stream | None = None

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

    def request(self, method: str, path: str, body=None, raw: bytes | None = None) -> ApiResponse:
        """One request (``body`` is JSON-encoded, ``raw`` sent as is); never raises on an error status."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        message = http_wire.request(method, path, data, JSON_HEADERS if data is not None else None)
        for attempt in (0, 1):
            fresh = self.sock is None
            if fresh:
                self._connect()
            try:
                self.sock.sendall(message)
                status, headers, payload, keep_alive = self.stream.read_response(method)
                break
            except (BrokenPipeError, ConnectionResetError):
                self.close()  # the daemon closed a kept-alive connection: one retry on a fresh one
                if fresh or attempt:
                    raise
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
