"""The daemon's handle on one worker process: requests and their replies, unasked events, stop and kill.

A ``WorkerHandle`` wraps the SEQPACKET channel to one worker (snapd.pool.worker). A request is sent and its
reply read by the requesting thread itself (``request``), or sent now and collected later by another thread
(``send_request`` / ``read_reply``); events the worker sends unasked (a page-server failure) are handled on the
way. A worker is named for good by its pid plus its start time (``process_start_time``), so ``kill`` never
signals a recycled pid. The errors a request can raise (``WorkerFailed``, ``WorkerError``) live here too.
"""
from __future__ import annotations

import itertools
import os
import select
import signal
import socket
import time

from snapd._lane_native import ffi as lane_ffi, lib as lane_lib
from snapd.pool import protocol
from vmm.prebuilt import VmShape


PROCESS_EXITED = "the clone's VMM process exited"  # until the daemon's reaper says why (snapd.pool.jail)


def readable(fd, timeout: float) -> bool:
    """Whether ``fd`` (or an object with fileno()) becomes readable within ``timeout`` seconds. poll, not select:
    select() cannot watch a descriptor numbered 1024 or above (FD_SETSIZE), and the daemon holds several per
    clone (a worker channel, a uffd and a page-server connection), so past ~320 clones select() raised and new
    workers were never seen to become ready."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1e3))


def _succeeded(reply: dict) -> dict:
    """The reply, or the worker's refusal as WorkerError."""
    if not reply.get("ok"):
        raise WorkerError(reply.get("error", "unknown error"), reply.get("kind", "vmm"))
    return reply


class WorkerFailed(RuntimeError):
    """A worker died or broke the protocol during a request."""


class WorkerUnanswered(WorkerFailed):
    """A worker did not answer in time (stopped, hung): it was killed."""


class WorkerError(RuntimeError):
    """A worker answered a request with an error; ``kind`` is timeout, invocation, vmm or protocol."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def proc_stat(pid: int) -> list[bytes] | None:
    """/proc/PID/stat's fields after the command name (the first is the state: R, S, Z, ...); None: no such
    process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(b")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot): with the pid, it names one process for good."""
    fields = proc_stat(pid)
    return None if fields is None else int(fields[19])


class ChannelLock:
    """A worker channel's lock: a pthread mutex that the daemon's restore lane takes too, in C, while it sends a
    live clone's invocation and reads the reply (snapd/csrc/lane_daemon.h). As threading.Lock for Python's side;
    released by the thread that took it."""

    def __init__(self):
        self.native = lane_ffi.gc(lane_lib.lane_lock_new(), lane_lib.lane_lock_free)
        if self.native == lane_ffi.NULL:
            raise MemoryError("could not allocate a worker channel lock")

    def acquire(self, blocking: bool = True) -> bool:
        return bool(lane_lib.lane_lock_acquire(self.native, int(blocking)))  # the GIL is released while waiting

    def release(self) -> None:
        if lane_lib.lane_lock_release(self.native):
            raise RuntimeError("release of a worker channel lock this thread does not hold")

    def __enter__(self) -> "ChannelLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class WorkerHandle:
    """One worker process, seen from the daemon. Requests are serialised by ``lock`` (shared with the lane's C
    side); the requester reads the reply itself (no hand-off to another thread on the restore path)."""

    _ids = itertools.count(1)

    def __init__(self, channel: socket.socket, shape: VmShape, lease=None):
        self.channel = channel
        self.shape = shape
        self.lease = lease  # snapd.pool.jail.Lease: its uid, cgroup and, once reaped, why it exited
        self.pid = 0
        self.start_time: int | None = None
        self.lock = ChannelLock()
        self.dead = False
        self.failure = ""  # the worker's own report (a page-server failure), or why it died
        self.image = ""     # the image this worker was prepared for ("" : not prepared)
        self.shard = None   # the daemon's page-server shard a prepared worker is registered with
        self.prepared: dict = {}  # the prepare (or recycle) reply: held, req_cap, regions, timings
        self.lane_token = 0       # its ticket on the daemon's restore lane (snapd.daemon.lane), 0: none

    def fileno(self) -> int:
        return self.channel.fileno()

    def request(self, header: dict, data: bytes = b"", fds=(), timeout: float = 30.0) -> tuple[dict, bytes]:
        """Send one request and wait for its reply; raises WorkerFailed (dead) or WorkerError (refused)."""
        header = dict(header, id=next(self._ids))
        return self._exchange(header["op"], header["id"], protocol.encode(header, data), fds, timeout)

    def restore_held(self, image: str, payload: bytes | None, invoke_timeout: float,
                     timeout: float) -> tuple[dict, bytes]:
        """Restore the clone this worker holds prepared for ``image`` (``prepared["held"]``) with a LANE_RESTORE
        message, which the worker answers in C (snapd/csrc/lane_held.c); the reply reads as ``request``'s."""
        request_id = next(self._ids)
        message = protocol.encode_lane_restore(request_id, image, invoke_timeout, payload)
        return self._exchange("restore", request_id, message, (), timeout)

    def invoke_live(self, image: str, payload: bytes, invoke_timeout: float, timeout: float) -> tuple[dict, bytes]:
        """Invoke this worker's live clone (of ``image``) with a LANE_RESTORE + LANE_FLAG_LIVE message: answered
        in C while the clone is parked in FN_NEXT, else by the worker's Python. The reply reads as a lane
        restore's: the invocation's latency in ``reply["invoke"]``."""
        request_id = next(self._ids)
        message = protocol.encode_lane_invoke(request_id, image, invoke_timeout, payload)
        return self._exchange("invoke", request_id, message, (), timeout)

    def next_request_id(self) -> int:
        return next(self._ids)

    def _exchange(self, op: str, request_id: int, message: bytes, fds, timeout: float) -> tuple[dict, bytes]:
        with self.lock:
            self._send_locked(op, message, fds)
            return self._await_locked(op, request_id, timeout)

    def await_reply(self, op: str, request_id: int, timeout: float, locked: bool = False) -> tuple[dict, bytes]:
        """The reply to a request someone else sent (the daemon's restore lane, which stopped waiting for it);
        ``locked``: the lane still holds the channel's lock for this thread (a live invocation), released here."""
        if not locked:
            self.lock.acquire()
        try:
            if self.dead:
                raise WorkerFailed(f"worker {self.pid} is gone: {self.failure or 'it exited'}")
            return self._await_locked(op, request_id, timeout)
        finally:
            self.lock.release()

    def _await_locked(self, op: str, request_id: int, timeout: float) -> tuple[dict, bytes]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not readable(self.channel, left):
                self._mark_dead(f"no reply to {op} within {timeout:.1f} s: its VMM was killed")
                self.kill()
                raise WorkerUnanswered(f"worker {self.pid} did not answer {op} within {timeout:.1f} s: its VMM "
                                       f"was killed")
            received = self._receive()
            if received is None:
                raise WorkerFailed(f"worker {self.pid} failed during {op}: {self.failure}")
            reply, out = received
            if "event" not in reply and reply.get("id") == request_id:  # else an event, or the late reply of
                return _succeeded(reply), out                             # a request that timed out

    def send_request(self, header: dict, data: bytes = b"", fds=()) -> int:
        """Send a request whose reply another thread collects (``read_reply``); returns its id."""
        header = dict(header, id=next(self._ids))
        with self.lock:
            self._send_locked(header["op"], protocol.encode(header, data), fds)
        return header["id"]

    def _send_locked(self, op: str, message: bytes, fds) -> None:
        """Send (``lock`` held); a dead worker, or one whose channel refuses the message, is WorkerFailed."""
        if self.dead:
            raise WorkerFailed(f"worker {self.pid} is gone: {self.failure or 'it exited'}")
        try:
            protocol.send_raw(self.channel, message, fds)
        except (protocol.ProtocolError, OSError) as exc:
            self._mark_dead(f"{type(exc).__name__}: {exc}")
            raise WorkerFailed(f"worker {self.pid} failed during {op}: {self.failure}") from None

    def read_reply(self, request_id: int) -> dict | None:
        """The reply to ``send_request``'s request if it has come (None: not yet; call again when readable);
        raises WorkerFailed (dead) or WorkerError (refused)."""
        with self.lock:
            while not self.dead and readable(self.channel, 0):
                received = self._receive()
                if received is None:
                    break
                reply = received[0]
                if "event" in reply or reply.get("id") != request_id:
                    continue
                return _succeeded(reply)
            if self.dead:
                raise WorkerFailed(f"worker {self.pid} is gone: {self.failure or 'it exited'}")
        return None

    def send_quietly(self, header: dict, fds=()) -> None:
        """A message that takes no reply (preload); a dead worker is simply skipped."""
        with self.lock:
            if not self.dead:
                try:
                    protocol.send(self.channel, header, fds=fds)
                except OSError:
                    pass

    def _receive(self) -> tuple[dict, bytes] | None:
        """One message from the worker, (header, data) (None once it is gone): stray descriptors are closed, and
        an unasked event is handled here and still returned, so callers skip it."""
        try:
            reply, data, extra = protocol.recv(self.channel)
        except (protocol.ProtocolError, OSError) as exc:
            self._mark_dead(PROCESS_EXITED if isinstance(exc, protocol.PeerGone)
                            else f"{type(exc).__name__}: {exc}")
            return None
        for fd in extra:
            os.close(fd)
        if "event" in reply:
            self._event(reply)
        return reply, data

    def _event(self, event: dict) -> None:
        if event.get("event") == "failed":
            self.failure = event.get("error", "failed")

    def _mark_dead(self, why: str) -> None:
        self.dead = True
        self.failure = self.failure or why

    def poll_events(self) -> bool:
        """Read what the worker sent unasked (without blocking); False once it is gone."""
        if not self.lock.acquire(blocking=False):
            return True  # a request is reading the channel: it will see the news
        try:
            while not self.dead and readable(self.channel, 0):
                if self._receive() is None:
                    break
            return not self.dead
        finally:
            self.lock.release()

    def kill(self) -> None:
        """SIGKILL the worker if it is still the process we started (pid + start time)."""
        if self.pid and self.start_time is not None and process_start_time(self.pid) == self.start_time:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Ask the worker to exit, then make sure: its VM, uffd and memory go with the process."""
        with self.lock:
            if not self.dead:
                try:
                    protocol.send(self.channel, {"op": "stop"})
                except OSError:
                    pass
            self.dead = True
            self.kill()
            self.channel.close()
