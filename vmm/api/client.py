"""A small client of the VMM API: HTTP/1.1 over a Unix socket, one kept-alive connection (stdlib only).

A request is sent again (once, on a fresh connection) only when that cannot do anything twice: not a byte of it
was written (the server had closed the kept-alive connection), or it is a GET. A PUT, PATCH, POST or DELETE whose
connection failed after it was sent raises: it may have been done (an InstanceStart, an invocation)."""
import base64
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time


class ApiClientError(Exception):
    """The VMM answered with an error status; carries the status and its fault_message."""

    def __init__(self, method: str, path: str, status: int, fault_message: str):
        self.status = status
        self.fault_message = fault_message
        super().__init__(f"{method} {path} -> {status}: {fault_message}")


def connect_unix(socket_path: str, timeout: float | None) -> socket.socket:
    """A stream socket connected to ``socket_path`` (closed again if the connect fails). A Unix socket with a
    timeout is non-blocking underneath, and its connect says EAGAIN at once when the server's listen backlog is
    full (a blocking one would wait): it is tried again until the timeout, as a blocking connect would."""
    deadline = None if timeout is None else time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        while True:
            try:
                sock.connect(socket_path)
                return sock
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"{socket_path}: the server's listen backlog stayed full") from None
                time.sleep(0.001)
    except OSError:
        sock.close()
        raise


IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS"))  # what may be sent twice without doing anything twice


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float | None = None):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path
        self.written = 0  # bytes of the current request written to the socket

    def connect(self) -> None:
        self.sock = connect_unix(self.socket_path, self.timeout)

    def send(self, data) -> None:
        """As http.client's, counting the bytes written (a request none of which was written may be sent again)."""
        if self.sock is None and self.auto_open:
            self.connect()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            self.written += 1  # a file-like body: sent by http.client, counted as begun
            return super().send(data)
        view = memoryview(data).cast("B")
        while view:
            n = self.sock.send(view)
            self.written += n
            view = view[n:]

    def dropped(self) -> bool:
        """The kept-alive connection is closed by the server (or it wrote something unasked): readable while no
        request is out. Then a request must go on a fresh connection."""
        if self.sock is None:
            return False
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))


class ApiResponse:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body) if self.body else None

    def fault_message(self) -> str:
        """The server's ``fault_message`` (or the raw body, if the reply is not the JSON it should be)."""
        try:
            return self.json().get("fault_message", "")
        except (ValueError, AttributeError):
            return self.body.decode(errors="replace")


class ApiClient:
    def __init__(self, socket_path: str, timeout: float | None = 60.0):
        self.socket_path = socket_path
        self.timeout = timeout
        self.connection = UnixHTTPConnection(socket_path, timeout)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "ApiClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, body=None, raw: bytes | None = None,
                headers: dict | None = None) -> ApiResponse:
        """One request; ``body`` is JSON-encoded, ``raw`` is sent as is. Never raises on an error status."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        send_headers = {"Accept": "application/json", **(headers or {})}
        if data is not None:
            send_headers.setdefault("Content-Type", "application/json")
        for attempt in (0, 1):
            if self.connection.dropped():
                self.connection.close()  # closed while idle: nothing of this request was sent on it
            self.connection.written = 0
            try:
                self.connection.request(method, path, body=data, headers=send_headers)
                reply = self.connection.getresponse()
                payload = reply.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.connection.close()
                if attempt or not (self.connection.written == 0 or method in IDEMPOTENT):
                    raise  # it may have reached the server: never sent twice
        if reply.will_close:
            self.connection.close()
        return ApiResponse(reply.status, dict(reply.getheaders()), payload)

    def call(self, method: str, path: str, body=None):
        """A request that must succeed: returns the JSON reply (None for 204), raises ApiClientError otherwise."""
        reply = self.request(method, path, body)
        if reply.status >= 300:
            raise ApiClientError(method, path, reply.status, reply.fault_message())
        return reply.json()

    # -- helpers for the common calls
    def instance_info(self) -> dict:
        return self.call("GET", "/")

    def configure(self, vcpu_count: int = 1, mem_size_mib: int = 128, kernel_image_path: str | None = None,
                  boot_args: str | None = None) -> None:
        self.call("PUT", "/machine-config", {"vcpu_count": vcpu_count, "mem_size_mib": mem_size_mib})
        if kernel_image_path is not None:
            source = {"kernel_image_path": kernel_image_path}
            if boot_args is not None:
                source["boot_args"] = boot_args
            self.call("PUT", "/boot-source", source)

    def start(self) -> None:
        self.call("PUT", "/actions", {"action_type": "InstanceStart"})

    def pause(self) -> None:
        self.call("PATCH", "/vm", {"state": "Paused"})

    def resume(self) -> None:
        self.call("PATCH", "/vm", {"state": "Resumed"})

    def invoke(self, payload: bytes, timeout_ms: int = 10_000) -> tuple[bytes, dict]:
        reply = self.call("PUT", "/invoke", {"payload": base64.b64encode(payload).decode(), "timeout_ms": timeout_ms})
        return base64.b64decode(reply["result"]), reply

    def invocations(self) -> list[dict]:
        return self.call("GET", "/invocations")["invocations"]

    def wait_invocation(self, seq: int, timeout_ms: int = 10_000) -> tuple[bytes, dict]:
        reply = self.call("PUT", f"/invocations/{seq}/wait", {"timeout_ms": timeout_ms})
        return base64.b64decode(reply["result"]), reply

    def create_snapshot(self, snapshot_path: str, mem_file_path: str) -> None:
        self.call("PUT", "/snapshot/create",
                  {"snapshot_type": "Full", "snapshot_path": snapshot_path, "mem_file_path": mem_file_path})

    def load_snapshot(self, snapshot_path: str, mem_file_path: str, resume_vm: bool = True,
                      backend_type: str = "File") -> None:
        self.call("PUT", "/snapshot/load", {"snapshot_path": snapshot_path, "resume_vm": resume_vm,
                                            "mem_backend": {"backend_type": backend_type,
                                                            "backend_path": mem_file_path}})


def wait_for_socket(socket_path: str, timeout: float = 10.0, process=None) -> ApiClient:
    """A client once the VMM at ``socket_path`` answers GET /; stops early if ``process`` (a Popen) exited."""
    deadline = time.monotonic() + timeout
    while True:
        client = ApiClient(socket_path)
        try:
            client.instance_info()
            return client
        except (FileNotFoundError, ConnectionRefusedError):
            client.close()
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the VMM exited with status {process.returncode} before serving {socket_path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no VMM answered on {socket_path} within {timeout} s")
        time.sleep(0.005)


class VmmProcess:
    """A `vmm --api-sock PATH` child process (one microVM) and a client connected to it."""

    def __init__(self, socket_path: str, extra_args=(), stdout=None, stderr=None, timeout: float = 10.0):
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self.socket_path = socket_path
        self.process = subprocess.Popen([sys.executable, "-m", "vmm.cli", "--api-sock", socket_path, *extra_args],
                                        stdout=stdout, stderr=stderr, env=env)
        try:
            self.client = wait_for_socket(socket_path, timeout, self.process)
        except BaseException:
            self.process.kill()
            self.process.wait()
            raise

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, as a supervisor stops Firecracker; returns the exit status."""
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def __enter__(self) -> "VmmProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.stop()
