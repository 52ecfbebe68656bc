"""Pure-Python reference for the built-in guest's workloads (docs/function-port.md, "Workloads").

The host never trusts a guest reply: it recomputes every one here, independently of the guest's C code.
Everything is closed form or a short loop, so verification stays cheap:

- hello: FNV-1a of the request; the generator value comes from `GuestRng` (or `HelloModel`, which tracks
  the count and generator of one guest, and can be copied along with a snapshot).
- kv: the value of key j is a formula (`mix64(key_j ^ seed)`), so `k` lookups cost about 3k `mix64` calls
  (~1 us each), with no table.
- scan: an arithmetic series, O(1).
- progress: inherently sequential, ~0.35 us per step in CPython 3.11 here (the guest does one in ~3 ns).
  A line costs 2**shift steps: at the default shift 22 ~1.5 s per line, at shift 16 ~23 ms (40 lines in
  ~0.9 s), at shift 12 ~1.5 ms. Tests boot the guest with a small `progress_shift` (12-16) and check a few
  dozen lines; `progress_lines` can also resume from any printed line, so the lines after a restore are
  checked without replaying from the seed.

Self-driven mode (no function port, e.g. under QEMU) is mirrored by `self_driven_request`,
`expected_self_driven_replies` and `parse_self_driven_output`.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from typing import Iterator

MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment, also the scan array's stride
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MIB = 1 << 20

WORKLOADS = ("hello", "kv", "scan", "progress")
DEFAULTS = {"seed": 1, "kv_mib": 16, "scan_mib": 16, "progress_shift": 22, "invoke": 3}


class ReplyMismatch(AssertionError):
    """A guest reply differs from what the reference computes."""


def mix64(z: int) -> int:
    """The splitmix64 finaliser."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def fnv1a64(data: bytes) -> int:
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


def _check(condition: bool, what: str, expected, got) -> None:
    if not condition:
        raise ReplyMismatch(f"{what}: expected {expected!r}, got {got!r}")


class GuestRng:
    """The guest's generator (rng.c): splitmix64 seeded with `seed`; on every new mailbox generation the
    32 entropy bytes are folded in as four little-endian words: state = mix64(state ^ word)."""

    def __init__(self, seed: int):
        self.state = seed & MASK64
        self.generation = 0  # the generation whose entropy is in the state; 0 = none yet

    def observe_generation(self, generation: int, entropy: bytes) -> None:
        if generation == self.generation:
            return
        if len(entropy) != 32:
            raise ValueError("entropy is 32 bytes")
        for (word,) in struct.iter_unpack("<Q", entropy):
            self.state = mix64(self.state ^ word)
        self.generation = generation

    def next(self) -> int:
        self.state = (self.state + GOLDEN_GAMMA) & MASK64
        return mix64(self.state)


# ---------------------------------------------------------------------------------------------- hello

HELLO_REPLY = struct.Struct("<4sIQQQ")  # "HELO", count, generation, random, fnv1a64(request)


@dataclasses.dataclass(frozen=True)
class HelloReply:
    count: int
    generation: int
    random: int
    request_hash: int


def hello_request(payload: bytes | str = b"") -> bytes:
    """Any bytes make a hello request; str is encoded as UTF-8."""
    return payload.encode() if isinstance(payload, str) else bytes(payload)


def parse_hello(reply: bytes) -> HelloReply:
    _check(len(reply) == HELLO_REPLY.size, "hello reply length", HELLO_REPLY.size, len(reply))
    magic, count, generation, random, request_hash = HELLO_REPLY.unpack(reply)
    _check(magic == b"HELO", "hello magic", b"HELO", magic)
    return HelloReply(count, generation, random, request_hash)


def verify_hello(request: bytes, reply: bytes, count: int, generation: int | None = None,
                 random: int | None = None) -> HelloReply:
    """Checks magic, count, request hash and, when given, generation and generator value."""
    parsed = parse_hello(reply)
    _check(parsed.count == count, "hello count", count, parsed.count)
    _check(parsed.request_hash == fnv1a64(request), "hello request hash", fnv1a64(request),
           parsed.request_hash)
    if generation is not None:
        _check(parsed.generation == generation, "hello generation", generation, parsed.generation)
    if random is not None:
        _check(parsed.random == random, "hello random", random, parsed.random)
    return parsed


class HelloModel:
    """One hello guest's state as the host predicts it: invocation count and generator. Copy it
    (copy.deepcopy) when the guest is snapshotted; each clone restored from the snapshot continues from
    the copy with its own generation and entropy."""

    def __init__(self, seed: int = 1):
        self.count = 0
        self.rng = GuestRng(seed)

    def expected_reply(self, request: bytes, generation: int = 0, entropy: bytes = bytes(32)) -> bytes:
        """Advances the model by one invocation and returns the exact reply the guest must give."""
        self.count += 1
        self.rng.observe_generation(generation, entropy)
        return HELLO_REPLY.pack(b"HELO", self.count, generation, self.rng.next(), fnv1a64(request))

    def verify(self, request: bytes, reply: bytes, generation: int = 0,
               entropy: bytes = bytes(32)) -> HelloReply:
        expected = self.expected_reply(request, generation, entropy)
        parsed = verify_hello(request, reply, self.count, generation)
        _check(reply == expected, "hello reply", expected.hex(), reply.hex())
        return parsed


# ------------------------------------------------------------------------------------------------- kv

KV_REQUEST = struct.Struct("<IIQ")  # k, pad, query_seed
KV_REPLY = struct.Struct("<4sIQ")  # "KVOK", found, sum


def kv_request(k: int, query_seed: int) -> bytes:
    return KV_REQUEST.pack(k, 0, query_seed & MASK64)


def kv_key_count(kv_mib: int) -> int:
    """Keys in the table: half of kv_mib MiB / 16-byte slots (load factor 0.5)."""
    return kv_mib * MIB // 16 // 2


def kv_key(seed: int, i: int) -> int:
    return mix64(seed ^ (i + 1)) | 1


def kv_value(seed: int, key: int) -> int:
    return mix64(key ^ seed)


def expected_kv(seed: int, kv_mib: int, k: int, query_seed: int) -> bytes:
    """The exact 16-byte reply: every queried key is in the table, so found == k."""
    keys = kv_key_count(kv_mib)
    if keys == 0:
        raise ValueError("kv_mib must be at least 1")
    total = 0
    for t in range(k):
        key = kv_key(seed, mix64(query_seed + t) % keys)
        total += kv_value(seed, key)
    return KV_REPLY.pack(b"KVOK", k, total & MASK64)


def parse_kv(reply: bytes) -> tuple[int, int]:
    """Returns (found, sum)."""
    _check(len(reply) == KV_REPLY.size, "kv reply length", KV_REPLY.size, len(reply))
    magic, found, total = KV_REPLY.unpack(reply)
    _check(magic == b"KVOK", "kv magic", b"KVOK", magic)
    return found, total


def verify_kv(seed: int, kv_mib: int, request: bytes, reply: bytes) -> tuple[int, int]:
    k, _pad, query_seed = KV_REQUEST.unpack(request.ljust(KV_REQUEST.size, b"\0")[: KV_REQUEST.size])
    parsed = parse_kv(reply)
    expected = expected_kv(seed, kv_mib, k, query_seed)
    _check(reply == expected, "kv reply", expected.hex(), reply.hex())
    return parsed


# ----------------------------------------------------------------------------------------------- scan

SCAN_REQUEST = struct.Struct("<II")  # offset_mib, window_mib
SCAN_REPLY = struct.Struct("<4sIQ")  # "SCAN", words, sum
WORDS_PER_MIB = MIB // 8


def scan_request(offset_mib: int, window_mib: int) -> bytes:
    return SCAN_REQUEST.pack(offset_mib, window_mib)


def expected_scan(seed: int, scan_mib: int, offset_mib: int, window_mib: int) -> bytes:
    """Closed form: sum of base + i * GOLDEN_GAMMA over the (clamped) window of words."""
    words = scan_mib * WORDS_PER_MIB
    start = min(offset_mib * WORDS_PER_MIB, words)
    count = min(window_mib * WORDS_PER_MIB, words - start)
    index_sum = start * count + count * (count - 1) // 2  # sum of i over [start, start + count)
    total = (count * mix64(seed) + index_sum * GOLDEN_GAMMA) & MASK64
    return SCAN_REPLY.pack(b"SCAN", count, total)


def parse_scan(reply: bytes) -> tuple[int, int]:
    """Returns (words, sum)."""
    _check(len(reply) == SCAN_REPLY.size, "scan reply length", SCAN_REPLY.size, len(reply))
    magic, words, total = SCAN_REPLY.unpack(reply)
    _check(magic == b"SCAN", "scan magic", b"SCAN", magic)
    return words, total


def verify_scan(seed: int, scan_mib: int, request: bytes, reply: bytes) -> tuple[int, int]:
    offset_mib, window_mib = SCAN_REQUEST.unpack(request.ljust(8, b"\0")[:8])
    parsed = parse_scan(reply)
    expected = expected_scan(seed, scan_mib, offset_mib, window_mib)
    _check(reply == expected, "scan reply", expected.hex(), reply.hex())
    return parsed


# ------------------------------------------------------------------------------------------- progress

PROGRESS_LINE = re.compile(r"^progress (\d+) ([0-9a-f]{16})$")


def format_progress_line(t: int, x: int) -> str:
    return f"progress {t} {x:016x}"


def parse_progress_line(line: str) -> tuple[int, int]:
    """Returns (t, x) of a line as the guest prints it (trailing newline allowed)."""
    match = PROGRESS_LINE.match(line.strip())
    if not match:
        raise ReplyMismatch(f"not a progress line: {line!r}")
    return int(match.group(1)), int(match.group(2), 16)


def progress_lines(seed: int, shift: int, count: int,
                   resume_from: str | tuple[int, int] | None = None) -> Iterator[str]:
    """Yields the next `count` progress lines (without newline). From the start: x = mix64(seed), step
    t = 1, 2, ... does x = mix64(x + t) and a line follows every step t that is a multiple of 2**shift.
    With `resume_from` (a printed line, or its (t, x)) the lines after that one are produced instead,
    without replaying from the seed. Cost: 2**shift mix64 calls per line (see the module docstring)."""
    if resume_from is None:
        t, x = 0, mix64(seed)
    else:
        t, x = parse_progress_line(resume_from) if isinstance(resume_from, str) else resume_from
    interval = 1 << shift
    local_mix64 = mix64
    for _ in range(count):
        end = t + interval
        for t in range(t + 1, end + 1):
            x = local_mix64(x + t)
        yield format_progress_line(t, x)


def verify_progress(seed: int, shift: int, lines: list[str]) -> None:
    """Checks consecutive printed progress lines: the first one from the seed if it is the first line
    (t == 2**shift), otherwise each line is checked as the successor of the one before it."""
    if not lines:
        return
    t0, _ = parse_progress_line(lines[0])
    if t0 == 1 << shift:
        expected = list(progress_lines(seed, shift, len(lines)))
        for want, got in zip(expected, lines):
            _check(want == got.strip(), "progress line", want, got.strip())
        return
    for previous, line in zip(lines, lines[1:]):
        (want,) = progress_lines(seed, shift, 1, resume_from=previous)
        _check(want == line.strip(), "progress line", want, line.strip())


# ----------------------------------------------------------------------------------- self-driven mode

SELF_DRIVEN_KV_LOOKUPS = 1000
SELF_DRIVEN_REPLY = re.compile(r"^vmguest: reply (\d+) ([0-9a-f]*)$")


def self_driven_request(workload: str, seq: int, seed: int = 1, scan_mib: int = 16) -> bytes:
    """The request the guest makes for itself as invocation `seq` (1, 2, ...) when no port answers."""
    if workload == "hello":
        return struct.pack("<Q", mix64(seed + seq))
    if workload == "kv":
        return kv_request(SELF_DRIVEN_KV_LOOKUPS, mix64(seed + seq))
    if workload == "scan":
        return scan_request(mix64(seed + seq) % scan_mib, max(scan_mib // 2, 1))
    raise ValueError(f"workload {workload!r} has no invocations")


def expected_self_driven_replies(workload: str, invoke: int = 3, seed: int = 1, kv_mib: int = 16,
                                 scan_mib: int = 16) -> list[bytes]:
    """The replies a self-driven guest prints, in order (generation stays 0: no reseeding)."""
    replies = []
    hello = HelloModel(seed)
    for seq in range(1, invoke + 1):
        request = self_driven_request(workload, seq, seed, scan_mib)
        if workload == "hello":
            replies.append(hello.expected_reply(request))
        elif workload == "kv":
            k, _pad, query_seed = KV_REQUEST.unpack(request)
            replies.append(expected_kv(seed, kv_mib, k, query_seed))
        else:
            replies.append(expected_scan(seed, scan_mib, *SCAN_REQUEST.unpack(request)))
    return replies


def parse_self_driven_output(text: str) -> list[bytes]:
    """The replies from a self-driven guest's console output, in order of their sequence numbers."""
    replies = {}
    for line in text.splitlines():
        match = SELF_DRIVEN_REPLY.match(line.strip())
        if match:
            replies[int(match.group(1))] = bytes.fromhex(match.group(2))
    return [replies[seq] for seq in sorted(replies)]
