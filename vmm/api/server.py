"""HTTP/1.1 over a Unix socket, as `firecracker --api-sock PATH` serves it: routing, bodies, errors, lifecycle.

The standard library's http.server does the parsing; one thread per connection, so a PUT /invoke waiting for
the guest never blocks a PATCH /vm. Errors are JSON ``{"fault_message": ...}``; a user mistake never prints a
traceback, an internal bug answers 500 and prints one to standard error.
"""
import gc
import json
import logging
import os
import re
import selectors
import signal
import socket
import socketserver
import stat
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Callable

from snapd.snapfile import SnapshotFormatError, decode_state
from vmm.api import fields
from vmm.api.controller import VmmController, vmm_version
from vmm.api.errors import ApiError, BadRequest, MethodNotAllowed, NotFound
from vmm.errors import VmmError
from vmm.machine import shared_kvm
from vmm.persist import MicrovmState
from vmm.vcpu_runner import install_kick_handler

MAX_BODY = 1 << 20  # the largest invoke payload (8 KiB) in base64 fits many times over
LOG_LEVELS = ("Error", "Warning", "Info", "Debug")
log = logging.getLogger("vmm.api")


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # OpenAPI path template
    call: Callable  # call(controller, [body,] **path_parameters) -> dict (200) or None (204)
    body: fields.ObjectSpec | None = None  # the JSON body it takes, validated before ``call``

    def handle(self, controller: VmmController, body: bytes, params: dict):
        if self.body is None:
            return self.call(controller, **params)
        return self.call(controller, fields.parse_body(body, self.body), **params)


# The tests check this table against docs/api/vmm-openapi.json (paths, methods, request schemas).
ROUTES = [
    Route("GET", "/", VmmController.instance_info),
    Route("GET", "/version", VmmController.version),
    Route("GET", "/machine-config", VmmController.get_machine_config),
    Route("PUT", "/machine-config", VmmController.put_machine_config, fields.MACHINE_CONFIG),
    Route("PATCH", "/machine-config", lambda c, body: c.put_machine_config(body, partial=True),
          fields.MACHINE_CONFIG_PATCH),
    Route("PUT", "/boot-source", VmmController.put_boot_source, fields.BOOT_SOURCE),
    Route("PUT", "/actions", VmmController.action, fields.INSTANCE_ACTION),
    Route("PATCH", "/vm", VmmController.patch_vm, fields.VM_STATE),
    Route("GET", "/vm/config", VmmController.vm_config),
    Route("PUT", "/invoke", VmmController.invoke, fields.INVOKE),
    Route("GET", "/invocations", VmmController.list_invocations),
    Route("PUT", "/invocations/{seq}/wait", VmmController.wait_invocation, fields.INVOCATION_WAIT),
    Route("PUT", "/snapshot/create", VmmController.create_snapshot, fields.SNAPSHOT_CREATE),
    Route("PUT", "/snapshot/load", VmmController.load_snapshot, fields.SNAPSHOT_LOAD),
]


class Router:
    """Exact paths by dictionary lookup (the fast, common case), templated ones by regular expression: each
    ``{name}`` of a template matches ``parameter`` and is handed to the route as ``convert(text)``.
    The snapd daemon routes with it too (string identifiers)."""

    def __init__(self, routes: list, parameter: str = r"[0-9]{1,19}", convert=int):
        self.convert = convert
        self.exact: dict[str, dict] = {}
        self.templated: dict[str, tuple[re.Pattern, dict]] = {}
        for route in routes:
            if "{" in route.path:
                regex = re.sub(r"\\\{(\w+)\\\}", rf"(?P<\1>{parameter})", re.escape(route.path)) + r"\Z"
                self.templated.setdefault(route.path, (re.compile(regex), {}))[1][route.method] = route
            else:
                self.exact.setdefault(route.path, {})[route.method] = route

    def find(self, method: str, path: str) -> tuple[Route, dict]:
        methods, params = self.exact.get(path), {}
        if methods is None:
            for pattern, candidates in self.templated.values():
                match = pattern.match(path)
                if match:
                    methods, params = candidates, {k: self.convert(v) for k, v in match.groupdict().items()}
                    break
        if methods is None:
            raise NotFound(f"no such path: {path}")
        route = methods.get(method)
        if route is None:
            allowed = sorted(methods)
            raise MethodNotAllowed(f"{method} is not allowed on {path} (allowed: {', '.join(allowed)})", allowed)
        return route, params


ROUTER = Router(ROUTES)


def error_reply(exc: Exception) -> tuple[int, dict, dict]:
    """(status, JSON body, extra headers) for what a route raised: an ApiError is its own status, a VmmError the
    VMM's refusal (400: bad configuration, wrong state, unreadable snapshot, ...), anything else a bug (500, its
    traceback left on stderr where a developer finds it). The daemon's API answers the same way."""
    if isinstance(exc, ApiError):
        headers = {"Allow": ", ".join(exc.allowed)} if isinstance(exc, MethodNotAllowed) else {}
        return exc.status, {"fault_message": str(exc)}, headers
    if isinstance(exc, VmmError):
        return 400, {"fault_message": str(exc)}, {}
    traceback.print_exception(exc, file=sys.stderr)
    return 500, {"fault_message": f"internal error: {type(exc).__name__}: {exc}"}, {}


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client may hold (docs/reliability.md, "Limits and timeouts"): connections open at once (one more
    gets a 503 and is closed), seconds a kept-alive connection may wait for its next request, and seconds from a
    request's first byte to its last (a client dribbling its request is cut off with a 408)."""
    max_connections: int = 64
    idle_timeout: float = 60.0
    request_timeout: float = 10.0


def refusal(status: int, message: str) -> bytes:
    """A whole reply, for writing without a handler: 503 at the cap, 408 at the request deadline."""
    body = json.dumps({"fault_message": message}).encode()
    reason = {503: "Service Unavailable", 408: "Request Timeout"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


class ApiRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 64 * 1024  # headers and body leave in one write (flushed by handle_one_request)

    def handle_one_request(self) -> None:
        """Wait for a request's first byte at most the idle timeout; from there the whole request must arrive
        within the request timeout, or a timer answers 408 and cuts the connection (a slow sender holds this
        thread no longer than that)."""
        limits = self.server.limits
        self.connection.settimeout(limits.idle_timeout)
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except OSError:  # idle too long (TimeoutError), or reset
            self.close_connection = True
            return
        self.connection.settimeout(limits.request_timeout)
        self._reading = threading.Lock()
        self._timer = threading.Timer(limits.request_timeout, self._cut_slow_request)
        self._timer.daemon = True
        self._timer.start()
        try:
            super().handle_one_request()
        finally:
            self._request_read()

    def _request_read(self) -> None:
        """The request is whole (or the connection is done): the deadline no longer applies."""
        timer, self._timer = getattr(self, "_timer", None), None
        if timer is not None:
            with self._reading:
                timer.cancel()

    def _cut_slow_request(self) -> None:
        with self._reading:
            if self._timer is None:
                return  # read in time: the request is being served
            self._timer = None
            try:
                self.connection.setblocking(False)
                self.connection.send(refusal(408, f"the request was not whole within "
                                                  f"{self.server.limits.request_timeout:g} s"))
            except OSError:
                pass
            try:
                self.connection.shutdown(socket.SHUT_RDWR)  # the reader blocked in recv returns at once
            except OSError:
                pass

    def version_string(self) -> str:
        return f"vmm/{vmm_version()}"

    def log_message(self, format, *args) -> None:
        log.debug("http: " + format, *args)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise BadRequest("chunked request bodies are not supported: send Content-Length")
        text = self.headers.get("Content-Length", "0")
        try:
            length = int(text)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise BadRequest(f"bad Content-Length {text!r}") from None
        if length > MAX_BODY:
            self.close_connection = True
            raise BadRequest(f"request body of {length} bytes is larger than the {MAX_BODY}-byte limit")
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        t0 = time.perf_counter()
        path = self.path.split("?", 1)[0]
        headers = {}
        try:
            try:
                body = self._read_body()
            finally:
                self._request_read()
            route, params = ROUTER.find(self.command, path)
            result = route.handle(self.server.controller, body, params)
            status = 204 if result is None else 200
        except Exception as exc:  # noqa: BLE001 (error_reply tells the caller's mistakes from bugs)
            status, result, headers = error_reply(exc)
        self._respond(status, result, headers)
        self.wfile.flush()  # the reply leaves before the log line is written
        log.info("%s %s -> %d (%.0f us)", self.command, path, status, (time.perf_counter() - t0) * 1e6)

    def _respond(self, status: int, result, headers: dict) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if status == 204:
            self.end_headers()
            return
        data = json.dumps(result).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":  # a HEAD reply has the headers of the body, not the body (RFC 9110 9.3.2)
            self.wfile.write(data)

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _dispatch

    def __getattr__(self, name: str):
        """Every other method (HEAD, OPTIONS, TRACE, BREW, ...) is routed too, where http.server would answer 501:
        a known path answers 405 with the Allow header, an unknown one 404."""
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unsupported HTTP version, headers too long) as JSON too."""
        self.close_connection = True
        try:
            self._respond(code, {"fault_message": message or self.responses.get(code, ("error",))[0]},
                          {"Connection": "close"})
        except OSError:
            pass


class UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """One thread per connection, at most ``limits.max_connections`` of them."""
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # the listen backlog: clients connecting together are accepted, then refused if over

    def __init__(self, path: str, controller: VmmController, limits: ConnectionLimits = ConnectionLimits()):
        self.controller = controller
        self.limits = limits
        self.open_connections = 0
        self.count_lock = threading.Lock()
        super().__init__(path, ApiRequestHandler, bind_and_activate=False)
        try:
            self.server_bind()
            self.server_activate()
        except OSError as exc:
            self.server_close()
            raise VmmError(f"cannot serve the API on {path}: {exc.strerror}") from None

    def process_request(self, request, client_address) -> None:
        with self.count_lock:
            full = self.open_connections >= self.limits.max_connections
            if not full:
                self.open_connections += 1
        if full:
            try:
                request.setblocking(False)
                request.send(refusal(503, f"this VMM serves at most {self.limits.max_connections} connections"))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.count_lock:
                self.open_connections -= 1

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the client went away mid-reply: nothing to report
        super().handle_error(request, client_address)


def remove_stale_socket(path: str) -> None:
    """Remove ``path`` if it is a socket nobody listens on; refuse a live socket or any other file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise VmmError(f"cannot serve the API on {path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise VmmError(f"cannot serve the API on {path}: another process is serving it")


def warm_up() -> None:
    """Pay the once-per-process costs before the first request, so InstanceStart and snapshot/load do not:
    open /dev/kvm and read its CPUID, install the vCPU kick handler, build the snapshot decoder (~0.5 ms of
    typing introspection), read our version (importlib.metadata, ~6 ms). Without KVM the API still serves."""
    vmm_version()
    try:
        decode_state(b"", MicrovmState)  # builds and caches the decoder, then refuses the empty body
    except SnapshotFormatError:
        pass
    try:
        shared_kvm().supported_cpuid()
        install_kick_handler()
    except VmmError as exc:
        log.warning("KVM is not usable yet: %s", exc)
    # Everything alive now lives as long as the process: keep the collector from rescanning it (a full
    # collection during a restore cost ~0.8 ms here).
    gc.collect()
    gc.freeze()


WARM_REQUESTS = (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
                 b"PUT /snapshot/load HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 20\r\nConnection: close\r\n\r\n{\"snapshot_path\": 1}")


def warm_request_path(server: "UnixHttpServer") -> None:
    """Serve two harmless requests to ourselves over a socketpair (GET /, and a snapshot/load refused for a
    mistyped field): the first request through http.server, the email header parser and the JSON decoder costs
    ~0.4 ms more than later ones, and the first request a client sends is often the restore."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        theirs.sendall(WARM_REQUESTS)
        theirs.shutdown(socket.SHUT_WR)
        ApiRequestHandler(ours, "", server)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vmm: %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False


class ApiProcess:
    """The serving loop: API socket, a wake-up pipe for signals and for the guest stopping, clean exit."""

    def __init__(self, path: str, instance_id: str, limits: ConnectionLimits = ConnectionLimits()):
        self.path = path
        self.exit_code = 0
        self.stopping = False
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.controller = VmmController(instance_id, on_vm_stopped=self._vm_stopped)
        remove_stale_socket(path)
        self.server = UnixHttpServer(path, self.controller, limits)
        warm_up()
        warm_request_path(self.server)
        self.inode = os.stat(path).st_ino

    def _wake(self) -> None:
        try:
            os.write(self.wake_write, b"x")
        except BlockingIOError:
            pass

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True  # set_wakeup_fd already woke the loop

    def _vm_stopped(self, machine) -> None:
        """The guest reset, shut down or faulted: the process ends, as Firecracker's does."""
        if self.stopping:
            return
        if machine.fault is not None:
            print(f"vmm: error: {machine.fault}", file=sys.stderr)
            self.exit_code = 1
        else:
            log.info("the VM stopped (%s)", machine.stop_reason)
        self.stopping = True
        self._wake()

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        old_wakeup = signal.set_wakeup_fd(self.wake_write, warn_on_full_buffer=False)
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.server.socket, selectors.EVENT_READ, "accept")
                selector.register(self.wake_read, selectors.EVENT_READ, "wake")
                while not self.stopping:
                    for key, _ in selector.select():
                        if key.data == "accept":
                            self.server._handle_request_noblock()
                        else:
                            while _drain(self.wake_read):
                                pass
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()
        return self.exit_code

    def close(self) -> None:
        self.server.server_close()
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.controller.shutdown()
        os.close(self.wake_read)
        os.close(self.wake_write)


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 512))
    except BlockingIOError:
        return False


def serve(path: str, log_level: str = "Warning", instance_id: str = "anonymous-instance",
          limits: ConnectionLimits = ConnectionLimits()) -> int:
    """Serve the API on ``path`` until SIGTERM/SIGINT or the guest stops; returns the exit status."""
    configure_logging(log_level)
    process = ApiProcess(path, instance_id, limits)
    log.info("serving the API on %s", path)
    return process.run()
