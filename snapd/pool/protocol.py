"""The daemon <-> worker (and daemon -> zygote) protocol: one message per SOCK_SEQPACKET datagram.

A message is a JSON object, optionally followed by a NUL byte and raw bytes (an invocation payload or reply,
so no base64 on the hot path); file descriptors (a base image's memfd, a new worker's channel) travel with it
as SCM_RIGHTS. SEQPACKET keeps message boundaries, so neither side needs framing or partial reads.
"""
from __future__ import annotations

import array
import json
import os
import socket

MAX_MESSAGE = 4 << 20  # an invocation payload the guest takes is far smaller (its mailbox caps it)
MAX_FDS = 4
_PEEK = bytearray(1)  # receives the peeked byte; never read


class ProtocolError(RuntimeError):
    """A peer sent something that is not a message of this protocol."""


class PeerGone(ProtocolError):
    """The other end closed the channel (EOF): the peer process exited or dropped us."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A connected SEQPACKET pair whose buffers hold the largest message."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE + 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_MESSAGE + 4096)
    return a, b


def encode(header: dict, data: bytes = b"") -> bytes:
    body = json.dumps(header, separators=(",", ":")).encode()
    return body + b"\0" + data if data else body


def send(sock: socket.socket, header: dict, data: bytes = b"", fds: list[int] | tuple = ()) -> None:
    message = encode(header, data)
    if len(message) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(message)} bytes is larger than the {MAX_MESSAGE}-byte limit")
    if fds:
        sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(message)


def recv(sock: socket.socket) -> tuple[dict, bytes, list[int]]:
    """(header, data, fds); the caller owns the fds. Raises PeerGone on EOF."""
    fd_space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    try:
        # The message's real length first (peeked, left queued with its fds): a MAX_MESSAGE buffer per call
        # was an mmap + page fault + munmap (a TLB shoot-down in these multi-threaded processes), 10-100 us.
        size = sock.recv_into(_PEEK, 1, socket.MSG_PEEK | socket.MSG_TRUNC)
        message, ancillary, flags, _ = sock.recvmsg(min(max(size, 1), MAX_MESSAGE), fd_space)
    except ConnectionResetError:
        raise PeerGone("the peer closed the channel") from None
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[:len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    if not message and not fds:
        raise PeerGone("the peer closed the channel")
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ProtocolError("message or its file descriptors were truncated")
    header_bytes, _, data = message.partition(b"\0")
    try:
        header = json.loads(header_bytes)
    except ValueError as exc:
        for fd in fds:
            os.close(fd)
        raise ProtocolError(f"not a JSON message header: {exc}") from None
    if not isinstance(header, dict):
        for fd in fds:
            os.close(fd)
        raise ProtocolError("message header is not a JSON object")
    return header, data, fds
