"""The HTTP/1.1 wire format of the snapd API, by hand: requests and replies with a Content-Length body over one
kept-alive stream socket, for the daemon (snapd.daemon.http) and its client (snapd.client).

Why not http.server / http.client: they parse every header block with email.parser and go through buffered
file objects; on the 2-CPU nested host that was ~0.15 ms per request in the daemon and ~0.35 ms per request in
the client, about a quarter of an end-to-end restore (docs/snapd.md, "Request latency"). The API needs a small
subset of HTTP/1.1, and this module is all of it:

* a request line ``METHOD TARGET HTTP/1.x`` and ``Name: value`` header lines (CRLF or bare LF), at most
  MAX_HEAD bytes; no obsolete line folding;
* a body only by ``Content-Length`` (at most MAX_BODY); any ``Transfer-Encoding`` is refused, and so is a
  malformed or repeated-and-different length (the stream cannot be trusted after that: the connection closes);
* ``Expect: 100-continue`` is answered before the body is read (curl sends it for large bodies);
* keep-alive by default on HTTP/1.1, close on ``Connection: close`` or HTTP/1.0 without ``keep-alive``;
* replies ``HTTP/1.1 STATUS REASON`` with Server, Date, Content-Type and Content-Length (none on 204), written
  with one send.

Anything outside that is a 400 naming the problem (the daemon answers it as JSON, like every other error). The
daemon reads requests without blocking (``next_request``, ``body_ready``: its connections wait in an epoll set,
snapd.daemon.http.Connections); the client reads replies blocking.
"""
from __future__ import annotations

import email.utils
import re
import socket
import time
from http import HTTPStatus

MAX_HEAD = 64 * 1024     # request or status line plus headers
MAX_BODY = 1 << 20       # the largest invoke payload (8 KiB) in base64 fits many times over (as vmm.api.server)
RECV_SIZE = 64 * 1024
HEAD_END = re.compile(rb"\r?\n\r?\n")
REASONS = {s.value: s.phrase for s in HTTPStatus}
NO_BODY = frozenset((204, 304))
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class WireError(Exception):
    """A request (or reply) that is not the HTTP/1.1 this module speaks; ``status`` is the answer to give.
    The connection cannot be trusted afterwards: close it after answering."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Request:
    __slots__ = ("method", "target", "path", "version", "headers", "keep_alive", "length", "body")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str]):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        self.path = target.split("?", 1)[0]
        tokens = headers.get("connection", "").lower()
        self.keep_alive = ("keep-alive" in tokens) if version == "HTTP/1.0" else ("close" not in tokens)
        self.length = 0
        self.body = b""


class Stream:
    """Reads messages off a stream socket; bytes that arrive beyond one message wait for the next one
    (pipelined requests). One Stream per connection; not thread-safe.

    Two ways to read a request: ``read_request`` + ``read_body`` block on the socket until it is whole (the
    client's side, tests); ``next_request`` + ``body_ready`` only parse what is in ``buf`` and say when more
    bytes are needed (the daemon, which reads its connections without blocking: snapd.daemon.http)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.scanned = 0  # buf[:scanned] was searched for the end of a head and holds none

    def _fill(self) -> bool:
        data = self.sock.recv(RECV_SIZE)
        if not data:
            return False
        self.buf += data
        return True

    def _drop(self, length: int) -> bytes:
        data = bytes(self.buf[:length])
        del self.buf[:length]
        self.scanned = 0
        return data

    def head_lines(self) -> list[str] | None:
        """The next header block's lines (without the blank line), taken off the buffer; None while it is not
        whole. Each byte is searched once, however the head arrives."""
        match = HEAD_END.search(self.buf, max(0, min(self.scanned, len(self.buf)) - 3))
        if match is not None:
            if match.start() > MAX_HEAD:
                raise WireError(f"request head is larger than {MAX_HEAD} bytes", 431)
            head = bytes(self.buf[:match.start()])
            self._drop(match.end())
            return head.decode("latin-1").split("\n")
        if len(self.buf) > MAX_HEAD:
            raise WireError(f"request head is larger than {MAX_HEAD} bytes", 431)
        self.scanned = len(self.buf)
        return None

    def read_head(self) -> list[str] | None:
        """The header block's lines (without the blank line); None on EOF before its first byte."""
        while True:
            lines = self.head_lines()
            if lines is not None:
                return lines
            if not self._fill():
                if self.buf.strip():
                    raise WireError("the connection closed in the middle of a request head")
                return None

    def read_exactly(self, length: int) -> bytes:
        while len(self.buf) < length:
            if not self._fill():
                raise WireError(f"the connection closed {length - len(self.buf)} bytes short of the body")
        return self._drop(length)

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        return self._drop(len(self.buf))

    # -- the daemon's side
    def read_request(self) -> Request | None:
        """The next request's line and headers (its body is read by ``read_body``); None on a clean EOF."""
        lines = self.read_head()
        while lines is not None and lines == [""]:  # tolerated: empty lines before a request (RFC 9112 2.2)
            lines = self.read_head()
        if lines is None:
            return None
        return parse_request(lines)

    def read_body(self, request: Request) -> bytes:
        if request.length:
            if self.wants_continue(request):
                self.sock.sendall(CONTINUE)
            request.body = self.read_exactly(request.length)
        return request.body

    def next_request(self) -> Request | None:
        """Without reading: the next request's line and headers from the bytes buffered, or None until its head
        is whole. Then ``body_ready`` until it says the body is there."""
        while True:
            lines = self.head_lines()
            if lines is None:
                return None
            if lines != [""]:  # empty lines before a request are skipped, as read_request does
                return parse_request(lines)

    def body_ready(self, request: Request) -> bool:
        """Without reading: whether the body is buffered (then it is taken into ``request.body``)."""
        if len(self.buf) < request.length:
            return False
        if request.length:
            request.body = self._drop(request.length)
        return True

    def wants_continue(self, request: Request) -> bool:
        """``Expect: 100-continue`` (curl sends it for large bodies) and the body not here yet: answer
        CONTINUE before waiting for it."""
        return bool(request.length and request.headers.get("expect", "").lower() == "100-continue"
                    and request.version == "HTTP/1.1" and len(self.buf) < request.length)

    def eof_error(self, request: Request | None) -> WireError | None:
        """What the client's EOF means now (``request``: the one whose body is awaited): the error to answer
        with, or None for a clean end between requests."""
        if request is not None:
            return WireError(f"the connection closed {request.length - len(self.buf)} bytes short of the body")
        if self.buf.strip():
            return WireError("the connection closed in the middle of a request head")
        return None

    # -- the client's side
    def read_response(self, method: str) -> tuple[int, dict[str, str], bytes, bool]:
        """(status, headers as sent, body, keep_alive); interim 1xx replies are skipped. Raises
        ConnectionResetError on EOF before the reply's first byte (the server closed an idle connection)."""
        while True:
            lines = self.read_head()
            if lines is None:
                raise ConnectionResetError("the server closed the connection")
            parts = lines[0].rstrip("\r").split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise WireError(f"bad status line {lines[0][:200]!r}")
            status = int(parts[1])
            if status >= 200:
                break
        headers, lowered = {}, {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise WireError(f"bad header line {line[:200]!r}")
            name, value = name.strip(), value.strip()
            headers[name] = value
            lowered[name.lower()] = value
        keep_alive = "close" not in lowered.get("connection", "").lower() and parts[0] != "HTTP/1.0"
        if method == "HEAD" or status in NO_BODY:
            return status, headers, b"", keep_alive
        if "transfer-encoding" in lowered:
            raise WireError("chunked replies are not supported")
        length = lowered.get("content-length")
        if length is None:
            return status, headers, self.read_to_eof(), False
        if not length.isdigit():
            raise WireError(f"bad Content-Length {length!r} in the reply")
        return status, headers, self.read_exactly(int(length)), keep_alive


def parse_request(lines: list[str]) -> Request:
    """A request's line and headers (a head's lines), checked: what the daemon serves, or a WireError."""
    parts = lines[0].rstrip("\r").split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise WireError(f"bad request line {lines[0].rstrip()[:200]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise WireError(f"unsupported HTTP version {version[:20]!r}", 505 if version.startswith("HTTP/") else 400)
    request = Request(method, target, version, parse_headers(lines))
    headers = request.headers
    if "transfer-encoding" in headers:
        raise WireError("chunked request bodies are not supported: send Content-Length")
    text = headers.get("content-length")
    if text is not None:
        if not text.isdigit() or not text.isascii():
            raise WireError(f"bad Content-Length {text!r}")
        request.length = int(text)
        if request.length > MAX_BODY:
            raise WireError(f"request body of {request.length} bytes is larger than the {MAX_BODY}-byte limit")
    return request


def parse_headers(lines: list[str]) -> dict[str, str]:
    """Lower-cased names; a repeated header is joined with ", " (a repeated Content-Length must agree)."""
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            raise WireError("obsolete header line folding is not supported")
        name, sep, value = line.partition(":")
        name = name.lower()
        if not sep or not name or name != name.strip():
            raise WireError(f"bad header line {line.rstrip()[:200]!r}")
        value = value.strip()
        if name in headers:
            if name == "content-length" and headers[name] != value:
                raise WireError("conflicting Content-Length headers")
            if name != "content-length":
                headers[name] += ", " + value
        else:
            headers[name] = value
        if len(headers) > 100:
            raise WireError("more than 100 headers")
    return headers


_date = [0, ""]


def http_date() -> str:
    now = int(time.time())
    if now != _date[0]:
        _date[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return _date[1]


def response(status: int, body: bytes = b"", content_type: str = "application/json", headers: dict | None = None,
             close: bool = False, server: str = "snapd") -> bytes:
    """A whole reply, ready for one sendall."""
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\nServer: {server}\r\nDate: {http_date()}\r\n"]
    if headers:
        head += [f"{name}: {value}\r\n" for name, value in headers.items()]
    if close:
        head.append("Connection: close\r\n")
    if status in NO_BODY or 100 <= status < 200:
        head.append("\r\n")
        return "".join(head).encode("latin-1")
    head.append(f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n")
    return "".join(head).encode("latin-1") + body


def request(method: str, target: str, body: bytes | None, headers: dict | None = None) -> bytes:
    """A whole request, ready for one sendall (Host: localhost: a Unix socket has no host name)."""
    head = [f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n"]
    if headers:
        head += [f"{name}: {value}\r\n" for name, value in headers.items()]
    if body is None:
        if method in ("POST", "PUT", "PATCH"):
            head.append("Content-Length: 0\r\n")
        head.append("\r\n")
        return "".join(head).encode("latin-1")
    head.append(f"Content-Length: {len(body)}\r\n\r\n")
    return "".join(head).encode("latin-1") + body
