"""The paravirtual function port: the guest asks for the next invocation, the VMM holds the vCPU until one
arrives, the guest posts the result. ABI: docs/function-port.md.
"""
import os
import struct
import threading
from collections import deque
from dataclasses import dataclass

from vmm.errors import InvocationError

FN_PORT_BASE, FN_PORT_COUNT = 0x0F40, 16
FN_ID, FN_MAILBOX, FN_NEXT, FN_DONE = 0x0, 0x4, 0x8, 0xC
FN_ID_VALUE = 0x4E464D56  # "VMFN"
MAILBOX_MAGIC, MAILBOX_VERSION = 0x4D464D56, 1  # "VMFM"
MAILBOX_HEADER = 128
MAILBOX_MAX = 1 << 20
NEXT_DELIVERED, NEXT_RETRY = 1, 0
# Offsets of the mailbox fields the VMM writes.
OFF_SEQ, OFF_GENERATION, OFF_ENTROPY, OFF_REQ_LEN, OFF_RESP_LEN = 16, 24, 32, 64, 68


class Invocation:
    """One function call: its request, and (once the guest answered) its reply."""

    def __init__(self, payload: bytes, seq: int = 0):
        self.payload = payload
        self.seq = seq
        self.result = None
        self.error = None
        self.done = threading.Event()

    def wait(self, timeout: float | None = None) -> bytes:
        if not self.done.wait(timeout):
            raise InvocationError(f"invocation {self.seq or '(queued)'} got no reply within {timeout:.3f} s")
        if self.error is not None:
            raise InvocationError(self.error)
        return self.result

    def _finish(self, result: bytes | None = None, error: str | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


@dataclass(frozen=True)
class FunctionPortState:
    mailbox_pfn: int
    req_cap: int
    resp_cap: int
    seq: int
    generation: int
    in_flight_seq: int  # 0: the guest holds no request
    in_flight_payload: bytes
    queued: tuple[bytes, ...]  # payloads accepted but not yet handed to the guest


class FunctionPort:
    def __init__(self, memory, interrupted=lambda: False, entropy=os.urandom):
        self.memory = memory
        self.interrupted = interrupted  # True when the vCPU must give up waiting (pause, stop)
        self.entropy = entropy
        self.cond = threading.Condition()
        self.queue = deque()
        self.in_flight = None
        self.mailbox_gpa = 0
        self.req_cap = self.resp_cap = 0
        self.seq = 0
        self.generation = 0
        self.ready = threading.Event()  # set at the guest's first FN_NEXT: init phase done
        self.mailbox_error = None

    # -- host side
    def submit(self, payload: bytes) -> Invocation:
        if self.mailbox_error:
            raise InvocationError(self.mailbox_error)
        if self.req_cap and len(payload) > self.req_cap:
            raise InvocationError(f"payload is {len(payload)} bytes; the guest accepts at most {self.req_cap}")
        invocation = Invocation(payload)
        with self.cond:
            self.queue.append(invocation)
            self.cond.notify_all()
        return invocation

    def wake(self) -> None:
        """Make a vCPU held in FN_NEXT re-check ``interrupted`` (called on pause and stop)."""
        with self.cond:
            self.cond.notify_all()

    def fail_all(self, reason: str) -> None:
        with self.cond:
            pending = list(self.queue) + ([self.in_flight] if self.in_flight else [])
            self.queue.clear()
            self.in_flight = None
        for invocation in pending:
            invocation._finish(error=reason)

    def new_generation(self) -> None:
        """A resume from a snapshot: new generation id and fresh entropy, as VMGenID gives Linux."""
        self.generation = int.from_bytes(self.entropy(8), "little") or 1
        self._write_generation()

    def adopt(self, generation: int, seq: int, delivered: bytes | None = None) -> Invocation | None:
        """Take into these records what snapd's held lane (snapd/csrc/lane_held.c) did in guest memory itself:
        wrote ``generation`` (and entropy), and, with ``delivered``, handed the guest invocation ``seq``, now in
        flight (returned). Without it the lane's invocation ``seq`` is already answered, or there was none."""
        invocation = Invocation(delivered, seq) if delivered is not None else None
        with self.cond:
            self.generation, self.seq, self.in_flight = generation, seq, invocation
        return invocation

    def pending(self) -> list[Invocation]:
        with self.cond:
            return ([self.in_flight] if self.in_flight else []) + list(self.queue)

    # -- guest side
    def io_read(self, offset: int, size: int) -> int:
        if offset == FN_ID:
            return FN_ID_VALUE
        if offset == FN_NEXT:
            return self._next()
        return 0xFFFFFFFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset == FN_MAILBOX:
            self._set_mailbox(value << 12)
        elif offset == FN_DONE:
            self._done(value)

    def _set_mailbox(self, gpa: int) -> None:
        if not self.memory.contains(gpa, MAILBOX_HEADER):
            self.mailbox_error = f"guest mailbox at {gpa:#x} is outside guest memory"
            return
        magic, version, req_cap, resp_cap = struct.unpack("<4I", self.memory.read(gpa, 16))
        total = MAILBOX_HEADER + req_cap + resp_cap
        if magic != MAILBOX_MAGIC or version != MAILBOX_VERSION:
            self.mailbox_error = f"guest mailbox at {gpa:#x} has magic {magic:#x} version {version}"
        elif total > MAILBOX_MAX or not self.memory.contains(gpa, total):
            self.mailbox_error = f"guest mailbox at {gpa:#x} declares {total} bytes, which do not fit"
        else:
            self.mailbox_gpa, self.req_cap, self.resp_cap, self.mailbox_error = gpa, req_cap, resp_cap, None
            if not self.generation:
                self.generation = 1
            self._write_generation()

    def _write_generation(self) -> None:
        if self.mailbox_gpa:
            self.memory.write(self.mailbox_gpa + OFF_GENERATION, struct.pack("<Q", self.generation) + self.entropy(32))

    def _next(self) -> int:
        self.ready.set()
        with self.cond:
            if self.in_flight is not None:  # the guest asked again without answering: that call failed
                self.in_flight._finish(error=f"guest abandoned invocation {self.in_flight.seq}")
                self.in_flight = None
            while not self.queue and not self.interrupted():
                self.cond.wait()
            if not self.queue or not self.mailbox_gpa:
                return NEXT_RETRY
            invocation = self.queue.popleft()
            self.seq += 1
            invocation.seq = self.seq
            self.in_flight = invocation
        base = self.mailbox_gpa
        self.memory.write(base + MAILBOX_HEADER, invocation.payload)
        self.memory.write(base + OFF_SEQ, struct.pack("<Q", self.seq))
        self.memory.write(base + OFF_REQ_LEN, struct.pack("<I", len(invocation.payload)))
        return NEXT_DELIVERED

    def _done(self, length: int) -> None:
        with self.cond:
            invocation, self.in_flight = self.in_flight, None
        if invocation is None:
            return  # a reply nobody asked for (a hostile or confused guest): ignored
        if length > self.resp_cap:
            invocation._finish(error=f"guest replied {length} bytes, more than its {self.resp_cap}-byte reply area")
            return
        invocation._finish(result=self.memory.read(self.mailbox_gpa + MAILBOX_HEADER + self.req_cap, length))

    # -- persistence
    def save(self) -> FunctionPortState:
        with self.cond:
            in_flight = self.in_flight
            return FunctionPortState(
                mailbox_pfn=self.mailbox_gpa >> 12, req_cap=self.req_cap, resp_cap=self.resp_cap, seq=self.seq,
                generation=self.generation, in_flight_seq=in_flight.seq if in_flight else 0,
                in_flight_payload=in_flight.payload if in_flight else b"",
                queued=tuple(i.payload for i in self.queue))

    @classmethod
    def restore(cls, state: FunctionPortState, memory, interrupted=lambda: False, entropy=os.urandom) -> "FunctionPort":
        port = cls(memory, interrupted, entropy)
        port.mailbox_gpa, port.req_cap, port.resp_cap = state.mailbox_pfn << 12, state.req_cap, state.resp_cap
        port.seq, port.generation = state.seq, state.generation
        if state.in_flight_seq:
            port.in_flight = Invocation(state.in_flight_payload, state.in_flight_seq)
        port.queue.extend(Invocation(payload) for payload in state.queued)
        if port.mailbox_gpa:
            port.ready.set()
        return port
