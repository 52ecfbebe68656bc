"""A small client of the snapd API for schedulers, the tests and bench/ (stdlib only).

    with SnapdClient("/var/lib/snapd/snapd.sock") as snapd:
        image = snapd.register_image("vm.state", "vm.mem")["id"]
        clone = snapd.create_clones(image)[0]
        reply = snapd.invoke(clone["id"], b"hello")
        snapd.delete_clone(clone["id"])

One kept-alive HTTP/1.1 connection per client (use one client per thread). Errors raise SnapdError with the
status and the daemon's fault_message.
"""
from __future__ import annotations

import base64

from vmm.api.client import ApiClient, ApiClientError, ApiResponse


class SnapdError(ApiClientError):
    """The daemon answered with an error status (``status``, ``fault_message``)."""


class SnapdClient:
    def __init__(self, socket_path: str, timeout: float | None = 120.0):
        self.api = ApiClient(socket_path, timeout)

    def close(self) -> None:
        self.api.close()

    def __enter__(self) -> "SnapdClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, body=None, raw: bytes | None = None) -> ApiResponse:
        """One request; never raises on an error status."""
        return self.api.request(method, path, body, raw)

    def call(self, method: str, path: str, body=None):
        reply = self.api.request(method, path, body)
        if reply.status >= 300:
            try:
                message = reply.json().get("fault_message", "")
            except (ValueError, AttributeError):
                message = reply.body.decode(errors="replace")
            raise SnapdError(method, path, reply.status, message)
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
