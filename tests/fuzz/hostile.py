"""Hostile inputs with length and count fields at their extremes, each with the most its decoding may allocate.

Used twice (tests/fuzz/test_fuzz_memory.py): under tracemalloc (peak Python allocation of one decode), and all of
them in a subprocess whose address space is capped (RLIMIT_AS), where an allocation past the cap is a MemoryError,
which no target allows. ``python -m tests.fuzz.hostile`` runs the second form (what the subprocess runs).
"""
from __future__ import annotations

import json
import resource
import struct
import sys
import tracemalloc

from tests.fuzz.targets import corpus, targets

MiB = 1 << 20
COPIES = 4


def _put(data: bytes, fmt: str, offset: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _array32(n: int, item: bytes) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big") + item * n


def cases() -> list[tuple[str, str, bytes, int]]:
    """(what, target, input, bound on the bytes one decode may allocate beyond copies of the input: the harness and
    the readers copy it a few times, see ``peak_of``)."""
    state = corpus("state/full.state")[0]
    trailer = corpus("state/full.trailer")[0]
    index = corpus("image/base.img")[0]
    loadset = corpus("loadset/*.loadset")[0]
    body = 4 * MiB
    out = [
        ("state: body length 2**64-1", "state", _put(state, "<Q", 12, (1 << 64) - 1), 2 * MiB),
        ("state: body length 2**31", "state", _put(state, "<Q", 12, 1 << 31), 2 * MiB),
        ("state: msgpack array claiming 2**32-1 items", "state_body", b"\xdd\xff\xff\xff\xff" + bytes(64), 2 * MiB),
        ("state: msgpack bin claiming 2**32-1 bytes", "state_body", b"\xc6\xff\xff\xff\xff" + bytes(64), 2 * MiB),
        ("state: msgpack map claiming 2**32-1 pairs", "state_body", b"\xdf\xff\xff\xff\xff" + bytes(64), 2 * MiB),
        # Bodies that msgpack can decode into many objects (a valid checksum: the decoder itself must bound them).
        ("state: 4 MiB of empty maps", "state_body", _array32(body, b"\x80"), 2 * MiB),
        ("state: 4 MiB of empty arrays", "state_body", _array32(body, b"\x90"), 2 * MiB),
        ("state: 4 MiB of one-item arrays", "state_body", _array32(body // 2, b"\x91\x00"), 2 * MiB),
        ("state: 4 MiB of nested arrays", "state_body", b"\x91" * body, 2 * MiB),
        # Small objects msgpack must build one by one: bounded by a multiple of the body (docs/reliability.md).
        ("state: 4 MiB of two-byte strings", "state_body", _array32(body // 3, b"\xa2ab"), 25 * body),
        ("state: 4 MiB of u64s", "state_body", _array32(body // 9, b"\xcf" + b"\xff" * 8), 8 * body),
        ("trailer: data_size 2**64-1", "trailer_signed", _put(trailer, "<Q", 48, (1 << 64) - 1), 2 * MiB),
        ("trailer: size 2**32-1", "trailer_signed", _put(trailer, "<I", 12, (1 << 32) - 1), 2 * MiB),
        ("index: nchunks 2**64-1", "index", _put(index, "<Q", 32, (1 << 64) - 1), 2 * MiB),
        ("index: header_size 2**32-64", "index", _put(index, "<I", 12, (1 << 32) - 64), 2 * MiB),
        ("index: mem_size 2**64-1", "index_signed", _put(index, "<Q", 24, (1 << 64) - 1), 2 * MiB),
        ("loadset: count 2**32-1", "loadset", _put(loadset, "<I", 56, (1 << 32) - 1), 2 * MiB),
        ("loadset: mem_size 2**64-1", "loadset_signed", _put(loadset, "<Q", 16, (1 << 64) - 1), 2 * MiB),
        ("handshake: page_size_kib a 512 KiB string", "handshake",
         json.dumps([{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size_kib": "9" * (512 << 10)}])
         .encode(), 8 * MiB),
        ("handshake: 1 MiB of [", "handshake", b"[" * MiB, 16 * MiB),
        ("messages: 4 MiB without a newline", "messages", b"x" * (4 * MiB), 2 * MiB),
        ("api: 1 MiB of [", "api", b"[" * MiB, 16 * MiB),
        ("api: a 1 MiB string", "api", json.dumps({"payload": "x" * (MiB - 64)}).encode(), 64 * MiB),
    ]
    # Index entries (header 128 bytes in the corpus images) claiming 4 GiB of stored bytes, or an offset past off_t.
    first = next(i for i in range((len(index) - 160) // 64) if index[128 + 64 * i + 32] != 0)
    at = 128 + 64 * first
    out += [
        ("index: an entry's stored length 2**32-1", "index_signed", _put(index, "<I", at + 48, (1 << 32) - 1), 8 * MiB),
        ("index: an entry's offset 2**64-1", "index_signed", _put(index, "<Q", at + 40, (1 << 64) - 1), 8 * MiB),
    ]
    return out


def peak_of(target: str, data: bytes) -> int:
    """Peak bytes allocated (tracemalloc) while the target decodes ``data``, less ``COPIES`` copies of it (the
    harness slices it, a state file is packed, read back and its body sliced); raises what the target does not
    allow."""
    t = targets()[target]
    t.check(b"")  # imports and caches outside the measurement
    tracemalloc.start()
    try:
        t.check(data)
        return max(0, tracemalloc.get_traced_memory()[1] - COPIES * len(data))
    finally:
        tracemalloc.stop()


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def main(headroom_mib: int = 384) -> int:
    """Every case under an address-space cap of what the process maps now plus ``headroom_mib``."""
    for t in targets().values():  # import, open and cache everything first, then cap
        t.check(b"")
        for seed in t.seeds():
            t.check(seed)
    all_cases = cases()
    limit = _vm_size() + headroom_mib * MiB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for what, target, data, _ in all_cases:
        targets()[target].check(data)  # MemoryError (or anything not allowed) fails the run, naming the case
        print(f"ok: {what}", flush=True)
    print(f"{len(all_cases)} hostile inputs decoded under RLIMIT_AS = {limit >> 20} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:])))
