"""The paravirtual function port: the guest asks for the next invocation, the VMM holds the vCPU until one
arrives, the guest posts the result. ABI: docs/function-port.md.

Everything the guest controls is range-checked here ("Hostile guests" in docs/function-port.md): only single
4-byte accesses of the four registers mean anything (any other size, a misaligned offset or string I/O reads all
ones and writes nothing); a mailbox must lie in one region of guest memory, above page 0, with a valid header and
capacities that fit MAILBOX_MAX, or it is refused and no mailbox is left registered (every invocation is then
refused with the reason); its capacities are taken once, at registration, never re-read; a request longer than
the request area is refused when it is handed over; a reply length beyond the reply area fails the invocation.
A state file's port state is checked the same way (FunctionPortState, FunctionPort.restore).
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
REGISTER_SIZE = 4  # every register is 32 bits wide; any other access is not the protocol's
MAX_PFN = (1 << 32) - 1  # FN_MAILBOX is a 32-bit register
U64_MAX = (1 << 64) - 1
SEQ_MAX = (1 << 63) - 1  # sequence numbers count up from 1: a state file's is far from wrapping (the C lane adds 1)
# Offsets of the mailbox fields the VMM writes.
OFF_SEQ, OFF_GENERATION, OFF_ENTROPY, OFF_REQ_LEN, OFF_RESP_LEN = 16, 24, 32, 64, 68


class Invocation:
    """One function call: its request, and (once the guest answered) its reply."""

    def __init__(self, payload: bytes, seq: int = 0, port: "FunctionPort | None" = None):
        self.payload = payload
        self.seq = seq
        self.result = None
        self.error = None
        self.done = threading.Event()
        self.port = port  # the port whose queue it waits in (submit): left when its caller stops waiting

    def wait(self, timeout: float | None = None) -> bytes:
        if not self.done.wait(timeout):
            if self.port is not None:  # not handed over yet: leaves the queue, so a guest that never asks
                self.port.withdraw(self)  # FN_NEXT does not collect its callers' requests without bound
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

    def __post_init__(self):
        """A state file's function port is refused unless a guest could have left it so (snapd.snapfile turns
        this ValueError into a format error): what needs guest memory's size is checked by FunctionPort.restore."""
        caps = (self.req_cap, self.resp_cap)
        if not 0 <= self.mailbox_pfn <= MAX_PFN:
            raise ValueError("mailbox_pfn is not a 32-bit page number")
        if min(caps) < 0 or MAILBOX_HEADER + sum(caps) > MAILBOX_MAX or (not self.mailbox_pfn and any(caps)):
            raise ValueError(f"req_cap + resp_cap must fit a {MAILBOX_MAX}-byte mailbox (and be 0 without one)")
        if not (0 <= self.in_flight_seq <= self.seq <= SEQ_MAX and 0 <= self.generation <= U64_MAX):
            raise ValueError("seq (and in_flight_seq, at most seq) below 2**63, generation unsigned 64-bit")
        if self.in_flight_seq and not self.mailbox_pfn:
            raise ValueError("an invocation in flight without a mailbox")
        if any(len(p) > MAILBOX_MAX - MAILBOX_HEADER for p in (self.in_flight_payload, *self.queued)):
            raise ValueError("a payload longer than any mailbox")  # one longer than req_cap is refused at delivery


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
        limit = self.req_cap if self.mailbox_gpa else MAILBOX_MAX - MAILBOX_HEADER
        if len(payload) > limit:  # checked again when it is handed over: the mailbox may change meanwhile
            raise InvocationError(f"payload is {len(payload)} bytes; the guest accepts at most {limit}")
        invocation = Invocation(payload, port=self)
        with self.cond:
            self.queue.append(invocation)
            self.cond.notify_all()
        return invocation

    def withdraw(self, invocation: Invocation) -> None:
        """Drop ``invocation`` from the queue if the guest has not taken it yet (its caller gave up)."""
        with self.cond:
            try:
                self.queue.remove(invocation)
            except ValueError:
                return  # handed over (or finished) meanwhile
        invocation._finish(error="withdrawn before the guest asked for it")

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
    # Only a single 4-byte access of a register is the protocol (docs/function-port.md); the bus refuses string
    # I/O here (string_io). Anything else reads all ones, as an absent register, and writes nothing: an odd-sized
    # FN_NEXT read neither takes an invocation nor abandons one.
    string_io = False

    def io_read(self, offset: int, size: int) -> int:
        if size != REGISTER_SIZE:
            return (1 << (8 * size)) - 1
        if offset == FN_ID:
            return FN_ID_VALUE
        if offset == FN_NEXT:
            return self._next()
        return 0xFFFFFFFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        if size != REGISTER_SIZE:
            return
        value &= 0xFFFFFFFF
        if offset == FN_MAILBOX:
            self._set_mailbox(value << 12)
        elif offset == FN_DONE:
            self._done(value)

    def _set_mailbox(self, gpa: int) -> None:
        if not gpa:
            return self._refuse_mailbox("guest mailbox at page 0: page 0 cannot hold it")
        if not self.memory.contains(gpa, MAILBOX_HEADER):
            return self._refuse_mailbox(f"guest mailbox at {gpa:#x} is outside guest memory")
        magic, version, req_cap, resp_cap = struct.unpack("<4I", self.memory.read(gpa, 16))
        total = MAILBOX_HEADER + req_cap + resp_cap
        if magic != MAILBOX_MAGIC or version != MAILBOX_VERSION:
            self._refuse_mailbox(f"guest mailbox at {gpa:#x} has magic {magic:#x} version {version}")
        elif total > MAILBOX_MAX or not self.memory.contains(gpa, total):
            self._refuse_mailbox(f"guest mailbox at {gpa:#x} declares {total} bytes, which do not fit")
        else:
            with self.cond:
                self.mailbox_gpa, self.req_cap, self.resp_cap, self.mailbox_error = gpa, req_cap, resp_cap, None
            if not self.generation:
                self.generation = 1
            self._write_generation()

    def _refuse_mailbox(self, reason: str) -> None:
        """A registration the VMM cannot take: no mailbox is left (not even the previous one, which the guest
        gave up), and every invocation, in flight or waiting, fails with ``reason`` until a valid one comes."""
        with self.cond:
            self.mailbox_gpa = self.req_cap = self.resp_cap = 0
            self.mailbox_error = reason
        self.fail_all(reason)

    def _write_generation(self) -> None:
        if self.mailbox_gpa:
            self.memory.write(self.mailbox_gpa + OFF_GENERATION, struct.pack("<Q", self.generation) + self.entropy(32))

    def _next(self) -> int:
        self.ready.set()
        with self.cond:
            if self.in_flight is not None:  # the guest asked again without answering: that call failed
                self.in_flight._finish(error=f"guest abandoned invocation {self.in_flight.seq}")
                self.in_flight = None
            while True:
                while not self.queue and not self.interrupted():
                    self.cond.wait()
                if not self.queue:
                    return NEXT_RETRY
                invocation = self.queue.popleft()
                refusal = self._refusal(len(invocation.payload))
                if refusal is None:
                    break
                invocation._finish(error=refusal)  # checked again here: the mailbox may have changed since submit
            self.seq += 1
            invocation.seq = self.seq
            self.in_flight = invocation
        base = self.mailbox_gpa
        self.memory.write(base + MAILBOX_HEADER, invocation.payload)
        self.memory.write(base + OFF_SEQ, struct.pack("<Q", self.seq))
        self.memory.write(base + OFF_REQ_LEN, struct.pack("<I", len(invocation.payload)))
        return NEXT_DELIVERED

    def _refusal(self, length: int) -> str | None:
        """Why a payload of ``length`` bytes cannot be handed over now (called with the lock held)."""
        if not self.mailbox_gpa:
            return self.mailbox_error or "the guest has registered no function-port mailbox"
        if length > self.req_cap:
            return f"payload is {length} bytes; the guest accepts at most {self.req_cap}"
        return None

    def _done(self, length: int) -> None:
        with self.cond:
            invocation, self.in_flight = self.in_flight, None
        if invocation is None:
            return  # a reply nobody asked for (a hostile or confused guest): ignored
        if not self.mailbox_gpa:
            invocation._finish(error=self.mailbox_error or "the guest replied without a mailbox")
            return
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
        """``state`` passed FunctionPortState's checks; a mailbox that is not inside one region of ``memory`` (that
        needs its size) is dropped here, not raised: the machine restores and runs, and every invocation is refused
        with the reason, as after a registration the port refused. (Raising would fail every restore of the state,
        a snapd worker's rehearsal of it included.)"""
        port = cls(memory, interrupted, entropy)
        gpa, total = state.mailbox_pfn << 12, MAILBOX_HEADER + state.req_cap + state.resp_cap
        if gpa and not memory.contains(gpa, total):
            port.mailbox_error = (f"the snapshot's function-port mailbox ({total} bytes at {gpa:#x}) is not inside "
                                  "guest memory: the VMM refused it")
            port.queue.extend(Invocation(payload, port=port) for payload in state.queued)
            port.fail_all(port.mailbox_error)  # nothing in flight without a mailbox: the queued ones fail
            return port
        port.mailbox_gpa, port.req_cap, port.resp_cap = gpa, state.req_cap, state.resp_cap
        port.seq, port.generation = state.seq, state.generation
        if state.in_flight_seq:
            port.in_flight = Invocation(state.in_flight_payload, state.in_flight_seq)
        port.queue.extend(Invocation(payload, port=port) for payload in state.queued)
        if port.mailbox_gpa:
            port.ready.set()
        return port
