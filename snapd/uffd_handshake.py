"""Firecracker-compatible userfaultfd handshake, plus our status channel.

The page server listens on a Unix stream socket. A VMM connects and sends ONE message: a JSON list
of regions `[{"base_host_virt_addr", "size", "offset", "page_size"}]` (Firecracker's older
"page_size_kib" is accepted too) with its uffd attached via SCM_RIGHTS. Unlike Firecracker the
connection then stays open: the server writes newline-delimited JSON (`{"ready": true}`,
`{"error": "image X chunk N: ..."}`) and EOF in either direction means the peer is gone.
"""
from __future__ import annotations

import json
import os
import select
import socket
import time
from dataclasses import dataclass

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_MAX_HANDSHAKE = 1 << 20
# The page server's messages are a few hundred bytes ({"ready": true, "vm": N}, an error naming an image and a
# chunk); a line longer than this, or a stream that never ends one, is not the protocol.
MAX_MESSAGE = 64 << 10
_U64 = 1 << 64


class HandshakeError(RuntimeError):
    """The VMM's first message was not a valid region list with exactly one fd."""


class PageServerError(RuntimeError):
    """The page server reported an error for this VM (e.g. a corrupt chunk); stop the VM."""


class PageServerDied(PageServerError):
    """EOF/HUP on the page-server socket: nobody will resolve this VM's faults any more."""


class ProtocolError(PageServerError, ValueError):
    """The page server sent something that is not a message of this protocol (not newline-delimited JSON
    objects, or a line over MAX_MESSAGE bytes): it cannot be trusted to serve this VM; stop the VM. A ValueError
    too, as the JSON errors it replaces were."""


def _quote(value: object, limit: int = 120) -> str:
    """A peer's value for a message, cut short (an error must not echo a megabyte back)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _u64_field(item: dict, name: str) -> int:
    value = item[name]
    if type(value) is not int:  # not bool, float (1e400 is infinity), or a string (int("9" * 10**6) is slow)
        raise HandshakeError(f"region field {name} must be an integer, not {type(value).__name__}")
    if not 0 <= value < _U64:
        raise HandshakeError(f"region field {name} {value} is outside 0 .. 2**64 - 1")
    return value


@dataclass(frozen=True)
class Region:
    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int = PAGE_SIZE

    def to_json(self) -> dict:
        return {"base_host_virt_addr": self.base_host_virt_addr, "size": self.size,
                "offset": self.offset, "page_size": self.page_size}


def parse_regions(payload: object) -> list[Region]:
    """Validate the handshake's JSON value; page_size_kib (older Firecracker) is converted.

    Every number is an integer that fits the u64 the C page server takes; a region is page-aligned, not empty,
    and does not wrap around the address space or the image."""
    if not isinstance(payload, list) or not payload:
        raise HandshakeError("handshake must be a non-empty JSON list of regions")
    regions = []
    for item in payload:
        if not isinstance(item, dict):
            raise HandshakeError(f"region is not an object: {_quote(item)}")
        try:
            addr, size, offset = (_u64_field(item, name) for name in ("base_host_virt_addr", "size", "offset"))
            if "page_size" in item:
                page_size = _u64_field(item, "page_size")
            elif "page_size_kib" in item:
                page_size = _u64_field(item, "page_size_kib") * 1024
            else:
                page_size = PAGE_SIZE
        except KeyError as e:
            raise HandshakeError(f"bad region {_quote(item)}: missing {e}") from None
        if page_size != PAGE_SIZE:
            raise HandshakeError(f"page size {page_size} not supported (only {PAGE_SIZE})")
        if size == 0 or (addr | size | offset) % PAGE_SIZE or addr + size > _U64 or offset + size > _U64:
            raise HandshakeError(f"bad region {_quote(item)}: not a non-empty run of whole pages inside the "
                                 "address space and the image")
        regions.append(Region(addr, size, offset, page_size))
    return regions


# ---------------------------------------------------------------- VMM side

def send_uffd(server: str | socket.socket, uffd_fd: int, regions: list, timeout: float = 5.0) -> socket.socket:
    """Connect to the page server (``server``: its socket path, or a connection already made) and hand it
    uffd_fd with the region list.

    `regions` holds Region objects, dicts in the wire format, or (addr, size, offset) tuples.
    Returns the connected socket: keep it open for the VM's lifetime and watch it with
    `ServerMessages` (EOF = the page server died).
    """
    wire = []
    for r in regions:
        if isinstance(r, Region):
            wire.append(r.to_json())
        elif isinstance(r, dict):
            wire.append(r)
        else:
            addr, size, offset = r
            wire.append(Region(addr, size, offset).to_json())
    connected = isinstance(server, socket.socket)
    sock = server if connected else socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        if not connected:
            sock.connect(server)
        payload = json.dumps(wire).encode()
        sent = socket.send_fds(sock, [payload], [uffd_fd])
        if sent < len(payload):
            sock.sendall(payload[sent:])
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def _message(line: bytes) -> dict:
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past the parser's depth
        raise ProtocolError(f"page server sent a line that is not JSON ({len(line)} bytes)") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"page server sent a JSON {type(msg).__name__}, not an object")
    return msg


class ServerMessages:
    """VMM-side reader of the page server's newline-delimited JSON messages."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = b""

    def read(self, timeout: float | None = 0.0) -> list[dict]:
        """Messages available within timeout (None: block for at least one).

        Raises PageServerDied on EOF/HUP: the VMM must stop its VM (its faults will never be served).
        """
        out: list[dict] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while not out:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                break
            data = self.sock.recv(65536)
            if not data:
                raise PageServerDied("page server closed the connection: stopping the VM, "
                                     "its memory faults can no longer be served")
            self._buf += data
            *lines, self._buf = self._buf.split(b"\n")
            if len(self._buf) > MAX_MESSAGE or any(len(line) > MAX_MESSAGE for line in lines):
                raise ProtocolError(f"page server sent a line of more than {MAX_MESSAGE} bytes: not a message")
            out.extend(_message(line) for line in lines if line.strip())
            if deadline is not None and time.monotonic() >= deadline:
                break
        return out

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until {"ready": true}; raise PageServerError on an error message first."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("page server did not report ready")
            for msg in self.read(left):
                if "error" in msg:
                    raise PageServerError(msg["error"])
                if msg.get("ready"):
                    return


# ---------------------------------------------------------------- server side

def listen(sock_path: str, backlog: int = 64) -> socket.socket:
    """Bind and listen on sock_path (a stale socket file is replaced)."""
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(sock_path)
    sock.listen(backlog)
    return sock


def recv_handshake(conn: socket.socket, timeout: float = 5.0) -> tuple[int, list[Region]]:
    """Read the one handshake message from an accepted connection: (uffd fd, regions).

    The message may arrive in pieces; the fd comes with the first. ``timeout`` bounds the whole message, not each
    piece (a peer sending a byte at a time cannot hold the listener longer). On error every received fd is
    closed and HandshakeError raised.
    """
    deadline = time.monotonic() + timeout
    buf, fds = b"", []
    decoder = json.JSONDecoder()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HandshakeError(f"no complete handshake within {timeout} s")
            conn.settimeout(left)
            try:
                data, new_fds, _, _ = socket.recv_fds(conn, 65536, 4)
            except TimeoutError:
                raise HandshakeError(f"no complete handshake within {timeout} s") from None
            except OSError as exc:  # the VMM reset the connection, or sent more descriptors than fit
                raise HandshakeError(f"reading the handshake failed: {exc.strerror or exc}") from None
            fds.extend(new_fds)
            if not data:
                raise HandshakeError("VMM closed the connection before a complete handshake")
            buf += data
            if len(buf) > _MAX_HANDSHAKE:
                raise HandshakeError("handshake message too large")
            try:
                payload, _ = decoder.raw_decode(buf.decode())
            except RecursionError:
                raise HandshakeError("handshake nests deeper than a region list") from None
            except (ValueError, UnicodeDecodeError):
                continue  # incomplete: read more
            regions = parse_regions(payload)
            if len(fds) != 1:
                raise HandshakeError(f"expected exactly one uffd with the handshake, got {len(fds)}")
            conn.settimeout(None)
            return fds[0], regions
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def send_message(conn: socket.socket, msg: dict) -> None:
    """One newline-delimited JSON message to the VMM (best effort: it may be gone)."""
    try:
        conn.send(json.dumps(msg).encode() + b"\n", socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
    except OSError:
        pass
