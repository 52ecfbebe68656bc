"""The pure-Python workload reference (vmm/workloads.py): known vectors, and each closed form checked
against a brute-force model of what the guest does. No VM is needed."""
import copy
import struct

import pytest

from vmm import workloads as w


# ---------------------------------------------------------------------------------- hashes and rng

def splitmix64(seed, count):
    state, out = seed, []
    for _ in range(count):
        state = (state + w.GOLDEN_GAMMA) & w.MASK64
        out.append(w.mix64(state))
    return out


def test_mix64_gives_the_published_splitmix64_outputs():
    assert splitmix64(0, 4) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F,
                                0xF88BB8A8724C81EC]
    assert splitmix64(1234567, 3) == [6457827717110365317, 3203168211198807973, 9817491932198370423]
    assert w.mix64(0) == 0
    assert w.mix64(1 << 64 | 5) == w.mix64(5)  # inputs are taken mod 2^64


def test_fnv1a64_known_strings():
    assert w.fnv1a64(b"") == 0xCBF29CE484222325
    assert w.fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert w.fnv1a64(b"foobar") == 0x85944171F73967E8


def test_guest_rng_is_splitmix64_until_a_generation_appears():
    rng = w.GuestRng(1234567)
    assert [rng.next() for _ in range(3)] == splitmix64(1234567, 3)


def test_guest_rng_folds_entropy_once_per_generation():
    entropy = bytes(range(32))
    a, b = w.GuestRng(7), w.GuestRng(7)
    a.observe_generation(5, entropy)
    state = 7
    for (word,) in struct.iter_unpack("<Q", entropy):
        state = w.mix64(state ^ word)
    assert a.state == state
    a.observe_generation(5, bytes(32))  # same generation: nothing changes
    assert a.state == state
    b.observe_generation(0, entropy)  # generation 0 is "none yet": no fold
    assert b.state == 7


def test_clones_with_different_entropy_diverge():
    parent = w.HelloModel(seed=3)
    parent.expected_reply(b"warm up")
    clone_a, clone_b = copy.deepcopy(parent), copy.deepcopy(parent)
    reply_a = clone_a.expected_reply(b"x", generation=2, entropy=b"\x01" * 32)
    reply_b = clone_b.expected_reply(b"x", generation=2, entropy=b"\x02" * 32)
    assert w.parse_hello(reply_a).count == w.parse_hello(reply_b).count == 2
    assert w.parse_hello(reply_a).random != w.parse_hello(reply_b).random


# ---------------------------------------------------------------------------------------------- hello

def test_hello_request_and_verify():
    request = w.hello_request("invocation 1")
    assert request == b"invocation 1"
    reply = w.HELLO_REPLY.pack(b"HELO", 1, 9, 1234, w.fnv1a64(request))
    parsed = w.verify_hello(request, reply, count=1, generation=9, random=1234)
    assert parsed == w.HelloReply(1, 9, 1234, w.fnv1a64(request))
    with pytest.raises(w.ReplyMismatch):
        w.verify_hello(request, reply, count=2)
    with pytest.raises(w.ReplyMismatch):
        w.verify_hello(b"other", reply, count=1)
    with pytest.raises(w.ReplyMismatch):
        w.verify_hello(request, reply[:-1], count=1)
    with pytest.raises(w.ReplyMismatch):
        w.verify_hello(request, b"HELX" + reply[4:], count=1)


def test_hello_model_checks_the_generator_value():
    model = w.HelloModel(seed=1)
    reply = copy.deepcopy(model).expected_reply(b"r")
    model.verify(b"r", reply)
    wrong = bytearray(reply)
    wrong[16] ^= 1
    with pytest.raises(w.ReplyMismatch):
        w.HelloModel(seed=1).verify(b"r", bytes(wrong))


# ------------------------------------------------------------------------------------------------- kv

def brute_force_kv(seed, kv_mib, k, query_seed):
    """Builds the guest's table (open addressing, linear probing) and looks keys up in it."""
    slots = kv_mib * w.MIB // 16
    keys = [0] * slots
    values = [0] * slots

    def find(key):
        index = (key * slots) >> 64
        while keys[index] not in (0, key):
            index = (index + 1) % slots
        return index

    for i in range(slots // 2):
        key = w.kv_key(seed, i)
        index = find(key)
        keys[index], values[index] = key, w.mix64(key ^ seed)
    found = total = 0
    for t in range(k):
        key = w.kv_key(seed, w.mix64(query_seed + t) % (slots // 2))
        index = find(key)
        if keys[index] == key:
            found += 1
            total += values[index]
    return w.KV_REPLY.pack(b"KVOK", found, total & w.MASK64)


@pytest.mark.parametrize("seed,query_seed", [(1, 0), (0xDEADBEEF, 12345), (w.MASK64, w.MASK64)])
def test_expected_kv_matches_a_real_table(seed, query_seed):
    assert w.expected_kv(seed, 1, 300, query_seed) == brute_force_kv(seed, 1, 300, query_seed)


def test_kv_request_layout_and_verify():
    request = w.kv_request(1000, 0x1122334455667788)
    assert request == struct.pack("<IIQ", 1000, 0, 0x1122334455667788)
    reply = w.expected_kv(5, 16, 1000, 0x1122334455667788)
    assert w.verify_kv(5, 16, request, reply)[0] == 1000
    with pytest.raises(w.ReplyMismatch):
        w.verify_kv(6, 16, request, reply)
    assert w.kv_key_count(16) == 524288
    assert w.expected_kv(1, 16, 0, 99) == w.KV_REPLY.pack(b"KVOK", 0, 0)
    assert all(w.kv_key(s, i) & 1 for s in (0, 1) for i in range(100))  # never the empty key 0


# ----------------------------------------------------------------------------------------------- scan

@pytest.mark.parametrize("offset_mib,window_mib", [(0, 1), (0, 2), (1, 1), (1, 5), (2, 1), (7, 0), (0, 0)])
def test_expected_scan_matches_a_brute_force_sum(offset_mib, window_mib):
    seed, scan_mib = 77, 2
    base = w.mix64(seed)
    words = [(base + i * w.GOLDEN_GAMMA) & w.MASK64 for i in range(scan_mib * w.WORDS_PER_MIB)]
    window = words[offset_mib * w.WORDS_PER_MIB:][: window_mib * w.WORDS_PER_MIB]
    expected = w.SCAN_REPLY.pack(b"SCAN", len(window), sum(window) & w.MASK64)
    assert w.expected_scan(seed, scan_mib, offset_mib, window_mib) == expected


def test_scan_request_layout_and_verify():
    request = w.scan_request(3, 4)
    assert request == struct.pack("<II", 3, 4)
    reply = w.expected_scan(1, 16, 3, 4)
    assert w.verify_scan(1, 16, request, reply)[0] == 4 * w.WORDS_PER_MIB
    assert w.parse_scan(w.expected_scan(1, 16, 14, 4))[0] == 2 * w.WORDS_PER_MIB  # clamped
    with pytest.raises(w.ReplyMismatch):
        w.verify_scan(1, 16, w.scan_request(3, 5), reply)


# ------------------------------------------------------------------------------------------- progress

def test_progress_lines_follow_the_definition():
    shift, seed = 4, 9
    x, expected = w.mix64(seed), []
    for t in range(1, 3 * 16 + 1):
        x = w.mix64(x + t)
        if t % 16 == 0:
            expected.append(f"progress {t} {x:016x}")
    assert list(w.progress_lines(seed, shift, 3)) == expected


def test_progress_lines_resume_from_a_printed_line():
    lines = list(w.progress_lines(1, 8, 6))
    assert list(w.progress_lines(1, 8, 3, resume_from=lines[2])) == lines[3:]
    assert list(w.progress_lines(1, 8, 1, resume_from=w.parse_progress_line(lines[4] + "\n"))) == lines[5:]


def test_verify_progress_from_the_start_and_mid_run():
    lines = list(w.progress_lines(5, 6, 10))
    w.verify_progress(5, 6, lines)
    w.verify_progress(5, 6, lines[4:])  # after a restore: each line from the one before
    bad = lines[:5] + [lines[5].replace(lines[5][-1], "x" if lines[5][-1] != "x" else "y")]
    with pytest.raises(w.ReplyMismatch):
        w.verify_progress(5, 6, bad)
    with pytest.raises(w.ReplyMismatch):
        w.verify_progress(5, 6, lines[1:3] + lines[4:6])


def test_progress_at_shift_16_is_cheap_enough_for_tests():
    import time
    start = time.perf_counter()
    assert len(list(w.progress_lines(1, 16, 8))) == 8
    assert time.perf_counter() - start < 5  # ~0.2 s here; generous for slow CI machines


# ---------------------------------------------------------------------------------- self-driven mode

# Printed by the real guest under QEMU microvm (no function port), seed 1, default sizes, invoke=3.
GUEST_OUTPUT = {
    "hello": ["48454c4f010000000000000000000000c15c0289ec2d0a913eb1e3fba25ec2e2",
              "48454c4f02000000000000000000000067ec8e65a18debbee2eb9678c1b066e9",
              "48454c4f0300000000000000000000005e5532fbeea293f89ef26b17ebc46643"],
    "kv": ["4b564f4be8030000cecb6dcb7345898e", "4b564f4be80300007085fa9ce1b9328f",
           "4b564f4be8030000d07312afd57dcc4f"],
    "scan": ["5343414e00000c0000003e5e5dfeca51", "5343414e000010000000a87ddc104339",
             "5343414e000010000000a87d5c1b81de"],
}


@pytest.mark.parametrize("workload", sorted(GUEST_OUTPUT))
def test_self_driven_replies_match_the_guest(workload):
    text = "vmguest: %s ready\n" % workload + "".join(
        f"vmguest: reply {seq} {hexed}\n" for seq, hexed in enumerate(GUEST_OUTPUT[workload], 1))
    assert w.parse_self_driven_output(text + "vmguest: done\n") == w.expected_self_driven_replies(workload)


def test_self_driven_requests():
    assert w.self_driven_request("hello", 1) == struct.pack("<Q", w.mix64(2))
    assert w.self_driven_request("kv", 2, seed=5) == w.kv_request(1000, w.mix64(7))
    assert w.self_driven_request("scan", 1, seed=1, scan_mib=16) == w.scan_request(w.mix64(2) % 16, 8)
    assert w.self_driven_request("scan", 1, seed=1, scan_mib=1) == w.scan_request(0, 1)
    with pytest.raises(ValueError):
        w.self_driven_request("progress", 1)
