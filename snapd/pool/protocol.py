"""The daemon <-> worker (and daemon -> zygote) protocol: one message per SOCK_SEQPACKET datagram.

A message is a JSON object, optionally followed by a NUL byte and raw bytes (an invocation payload or reply,
so no base64 on the hot path); file descriptors (a base image's memfd, a new worker's channel) travel with it
as SCM_RIGHTS. SEQPACKET keeps message boundaries, so neither side needs framing or partial reads.

Two messages are fixed binary structs instead (snapd/csrc/lane_proto.h), so that the restore of a held clone
and the invocations of a live one parse no text on either side: LANE_RESTORE (daemon -> worker, the payload
after it; with LANE_FLAG_LIVE an invocation of the live clone) and LANE_REPLY (worker -> daemon, the result or an
error text after it). ``decode`` turns them into the same dicts the JSON restore and
its reply are, so code past the channel does not care which way a request came.
"""
from __future__ import annotations

import array
import json
import os
import socket
import struct

from snapd._lane_native import lib as lane_lib

MAX_MESSAGE = 4 << 20  # an invocation payload the guest takes is far smaller (its mailbox caps it)
MAX_FDS = 4
_PEEK = bytearray(1)  # receives the peeked byte; never read
LANE_RESTORE = struct.Struct("<4sIQQ64s")   # magic, flags, id, timeout_ns, image: struct lane_restore_msg
LANE_REPLY = struct.Struct("<4siQQQQQ")     # magic, status, id, generation, generation_ns, invoke_ns, total_ns
LANE_RESTORE_MAGIC, LANE_REPLY_MAGIC = b"SNL1", b"SNL2"
LANE_FLAG_INVOKE, LANE_FLAG_LIVE = lane_lib.LANE_FLAG_INVOKE, lane_lib.LANE_FLAG_LIVE
LANE_KINDS = {lane_lib.LANE_ERR_TIMEOUT: "timeout", lane_lib.LANE_ERR_INVOCATION: "invocation",  # a reply's
              lane_lib.LANE_ERR_VMM: "vmm", lane_lib.LANE_ERR_PROTOCOL: "protocol"}       # status -> error kind
LANE_STATUS = {kind: status for status, kind in LANE_KINDS.items()}


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
    send_raw(sock, encode(header, data), fds)


def send_raw(sock: socket.socket, message: bytes, fds: list[int] | tuple = ()) -> None:
    """One message already encoded (``encode``, or a lane struct)."""
    if len(message) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(message)} bytes is larger than the {MAX_MESSAGE}-byte limit")
    if fds:
        sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(message)


def encode_lane_restore(request_id: int, image: str, timeout: float, payload: bytes | None) -> bytes:
    """The daemon's restore of a held clone (answered by snapd/csrc/lane_held.c, or by the worker's Python)."""
    flags = LANE_FLAG_INVOKE if payload is not None else 0
    return LANE_RESTORE.pack(LANE_RESTORE_MAGIC, flags, request_id, int(timeout * 1e9), image.encode()) + (payload or b"")


def encode_lane_invoke(request_id: int, image: str, timeout: float, payload: bytes) -> bytes:
    """An invocation of the worker's live clone (of ``image``), answered in C if the clone is parked in FN_NEXT,
    else by the worker's Python; the reply is a LANE_REPLY either way."""
    return LANE_RESTORE.pack(LANE_RESTORE_MAGIC, LANE_FLAG_INVOKE | LANE_FLAG_LIVE, request_id, int(timeout * 1e9),
                             image.encode()) + payload


def encode_lane_reply(reply: dict, result: bytes) -> bytes:
    """The worker's Python answering a lane message in the lane's own format (a restore's reply, or an
    invocation's: its latency_us is the invocation's)."""
    invoke = reply.get("invoke") or ({"latency_us": reply["latency_us"]} if "latency_us" in reply else {})
    if reply.get("ok") and not invoke.get("ok", True):  # restored, but the first invocation failed
        reply = dict(invoke, id=reply.get("id", 0))
    if not reply.get("ok"):
        status = LANE_STATUS.get(reply.get("kind"), LANE_STATUS["vmm"])
        return LANE_REPLY.pack(LANE_REPLY_MAGIC, status, reply.get("id", 0), 0, 0, 0, 0) + \
            str(reply.get("error", "unknown error")).encode()
    timings = reply.get("timings", {})
    return LANE_REPLY.pack(LANE_REPLY_MAGIC, 0, reply.get("id", 0), reply.get("generation", 0),
                           int(timings.get("new_generation_us", 0) * 1e3), int(invoke.get("latency_us", 0) * 1e3),
                           int(reply.get("total_us", 0) * 1e3)) + result


def _decode_lane(message: bytes) -> tuple[dict, bytes] | None:
    magic = message[:4]
    if magic == LANE_RESTORE_MAGIC and len(message) >= LANE_RESTORE.size:
        _, flags, request_id, timeout_ns, image = LANE_RESTORE.unpack_from(message)
        header = {"op": "restore", "prepared": True, "lane": True, "id": request_id, "timeout": timeout_ns / 1e9,
                  "image": image.rstrip(b"\0").decode("ascii", "replace"), "invoke": bool(flags & LANE_FLAG_INVOKE)}
        if flags & LANE_FLAG_LIVE:
            header = {"op": "invoke", "lane": True, "id": request_id, "timeout": timeout_ns / 1e9}
        return header, message[LANE_RESTORE.size:]
    if magic == LANE_REPLY_MAGIC and len(message) >= LANE_REPLY.size:
        _, status, request_id, generation, generation_ns, invoke_ns, total_ns = LANE_REPLY.unpack_from(message)
        rest = message[LANE_REPLY.size:]
        if status:
            return {"ok": False, "id": request_id, "kind": LANE_KINDS.get(status, "vmm"),
                    "error": rest.decode("utf-8", "replace")}, b""
        return ({"ok": True, "id": request_id, "generation": generation,
                 "timings": {"new_generation_us": generation_ns / 1e3},
                 "invoke": {"ok": True, "latency_us": invoke_ns / 1e3}, "total_us": total_ns / 1e3}, rest)
    return None


def decode(message: bytes, fds: list[int], flags: int = 0) -> tuple[dict, bytes, list[int]]:
    """One received message (and its descriptors, which the caller owns unless this raises) as (header, data,
    fds); ``flags`` are recvmsg's (MSG_TRUNC / MSG_CTRUNC: refused)."""
    if not message and not fds:
        raise PeerGone("the peer closed the channel")
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        _close_all(fds)
        raise ProtocolError("message or its file descriptors were truncated")
    lane = _decode_lane(message)
    if lane is not None:
        return lane[0], lane[1], fds
    header_bytes, _, data = message.partition(b"\0")
    try:
        header = json.loads(header_bytes)
    except ValueError as exc:
        _close_all(fds)
        raise ProtocolError(f"not a JSON message header: {exc}") from None
    if not isinstance(header, dict):
        _close_all(fds)
        raise ProtocolError("message header is not a JSON object")
    return header, data, fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


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
    return decode(message, fds, flags)
