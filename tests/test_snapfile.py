import dataclasses
import os
import struct
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapd import snapfile
from snapd.atomic import atomic_file, atomic_write
from snapd.snapfile import (BadMagic, ChecksumMismatch, SnapshotFormatError, TooLarge, TrailingData,
                            Truncated, UnsupportedVersion, decode_state, encode_state, pack_state_file,
                            read_state_file, unpack_state_file, write_state_file)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
bodies = st.binary(max_size=512)


# --- container ------------------------------------------------------------------------------

@FAST
@given(body=bodies)
def test_round_trip_on_disk(tmp_path, body):
    p = tmp_path / "state"
    write_state_file(p, body)
    assert read_state_file(p) == (snapfile.VERSION, body)


@FAST
@given(body=bodies, data=st.data())
def test_every_truncation_is_truncated(body, data):
    blob = pack_state_file(body)
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(Truncated):
        unpack_state_file(blob[:cut])


def test_every_truncation_exhaustively_small_body():
    blob = pack_state_file(b"abc")
    for cut in range(len(blob)):
        with pytest.raises(Truncated):
            unpack_state_file(blob[:cut])


@FAST
@given(body=bodies, data=st.data())
def test_any_single_bit_flip_is_rejected(body, data):
    blob = bytearray(pack_state_file(body))
    bit = data.draw(st.integers(0, 8 * len(blob) - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(SnapshotFormatError) as exc:
        unpack_state_file(bytes(blob))
    byte = bit // 8
    if byte < 8:
        assert isinstance(exc.value, BadMagic)
    elif byte < 10:
        assert isinstance(exc.value, UnsupportedVersion)
    elif byte < 12 or byte >= 20:  # minor version, body and checksum are covered by the checksum
        assert isinstance(exc.value, ChecksumMismatch)
    else:  # the length field: the file no longer matches its declared size
        assert isinstance(exc.value, (Truncated, TrailingData, TooLarge))


def test_every_bit_flip_exhaustively_small_body():
    blob = pack_state_file(b"state")
    for bit in range(8 * len(blob)):
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(SnapshotFormatError):
            unpack_state_file(bytes(bad))


@FAST
@given(body=bodies, garbage=st.binary(min_size=1, max_size=64))
def test_trailing_garbage(body, garbage):
    with pytest.raises(TrailingData, match="trailing"):
        unpack_state_file(pack_state_file(body) + garbage)


@FAST
@given(garbage=st.binary(min_size=1, max_size=256))
def test_random_garbage_never_raises_anything_else(garbage):
    with pytest.raises(SnapshotFormatError):
        unpack_state_file(garbage)


def test_wrong_magic_names_the_file(tmp_path):
    p = tmp_path / "notsnap"
    p.write_bytes(b"\x7fELF" + bytes(100))
    with pytest.raises(BadMagic, match=str(p)):
        read_state_file(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty"
    p.write_bytes(b"")
    with pytest.raises(Truncated, match="empty"):
        read_state_file(p)


def test_newer_major_refused_older_and_newer_minor_accepted():
    major, minor = snapfile.VERSION
    with pytest.raises(UnsupportedVersion, match="newer"):
        unpack_state_file(pack_state_file(b"x", (major + 1, 0)))
    assert unpack_state_file(pack_state_file(b"x", (major, minor + 7))) == ((major, minor + 7), b"x")
    assert unpack_state_file(pack_state_file(b"x", (major, 0)))[1] == b"x"


def test_oversized_refused_before_reading(tmp_path, monkeypatch):
    p = tmp_path / "big"
    write_state_file(p, bytes(5000))
    read_calls = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def fileno(self):
            return self.f.fileno()

        def read(self, *a):
            read_calls.append(a)
            return self.f.read(*a)

    monkeypatch.setattr("builtins.open", lambda *a, **k: Spy(real_open(*a, **k)))
    with pytest.raises(TooLarge, match="limit of 1000"):
        read_state_file(p, max_size=1000)
    assert read_calls == []


def test_declared_length_over_limit_is_too_large():
    blob = bytearray(pack_state_file(b"x"))
    struct.pack_into("<Q", blob, 12, 1 << 40)
    with pytest.raises(TooLarge):
        unpack_state_file(bytes(blob))


# --- atomic writes --------------------------------------------------------------------------

def test_atomic_write_iterable_and_no_temp_left(tmp_path):
    p = tmp_path / "f"
    atomic_write(p, [b"ab", b"cd"])
    assert p.read_bytes() == b"abcd"
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_file_failure_keeps_old_content_and_removes_temp(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(p) as f:
            f.write(b"partial new")
            raise RuntimeError("crash")
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_write_crash_mid_iteration_leaves_no_final_file(tmp_path):
    def pieces():
        yield b"first"
        raise OSError("disk gone")
    with pytest.raises(OSError):
        atomic_write(tmp_path / "new", pieces())
    assert os.listdir(tmp_path) == []


# --- state codec ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Regs:
    rip: int
    flags: int
    halted: bool


@dataclasses.dataclass(frozen=True)
class Vcpu:
    id: int
    regs: Regs
    xsave: bytes
    msrs: tuple[tuple[int, int], ...]
    name: Optional[str]


@dataclasses.dataclass(frozen=True)
class Vm:
    vcpus: tuple[Vcpu, ...]
    mem_size: int
    slots: list[int]
    cmdline: str
    pair: tuple[int, str]
    parent: "Optional[Vm]" = None


u64 = st.integers(0, 2**64 - 1)
regs = st.builds(Regs, rip=u64, flags=st.integers(-2**63, 2**63 - 1), halted=st.booleans())
vcpus = st.builds(Vcpu, id=st.integers(0, 255), regs=regs, xsave=st.binary(max_size=64),
                  msrs=st.lists(st.tuples(u64, u64), max_size=4).map(tuple), name=st.none() | st.text(max_size=8))
vms = st.builds(Vm, vcpus=st.lists(vcpus, max_size=3).map(tuple), mem_size=u64,
                slots=st.lists(u64, max_size=4), cmdline=st.text(max_size=32),
                pair=st.tuples(u64, st.text(max_size=4)),
                parent=st.none() | st.builds(Vm, vcpus=st.just(()), mem_size=u64, slots=st.just([]),
                                             cmdline=st.just(""), pair=st.just((0, "")), parent=st.none()))


@FAST
@given(vm=vms)
def test_state_codec_round_trip(vm):
    assert decode_state(encode_state(vm), Vm) == vm


def test_state_file_round_trip(tmp_path):
    vm = Vm((Vcpu(0, Regs(0x100000, 2, False), b"\0" * 8, ((0x10, 5),), None),), 64 << 20, [1], "a=b", (1, "x"))
    snapfile.save_state(tmp_path / "s", vm)
    assert snapfile.load_state(tmp_path / "s", Vm) == vm


def _plain(vm):
    import msgpack
    return msgpack.unpackb(encode_state(vm), raw=False)


def _vm():
    return Vm((Vcpu(0, Regs(1, 2, True), b"x", ((1, 2),), "c0"),), 4096, [1, 2], "cmd", (3, "p"))


def _enc(plain):
    import msgpack
    return msgpack.packb(plain, use_bin_type=True)


def test_unknown_field_named():
    p = _plain(_vm())
    p["vcpus"][0]["regs"]["rsp"] = 7
    with pytest.raises(SnapshotFormatError, match=r"Vm\.vcpus\[0\]\.regs: unknown field in Regs") as info:
        decode_state(_enc(p), Vm)
    assert "rsp" not in str(info.value)  # the name is the file's bytes: a reply never quotes them


def test_missing_field_named():
    p = _plain(_vm())
    del p["vcpus"][0]["xsave"]
    with pytest.raises(SnapshotFormatError, match=r"Vm\.vcpus\[0\]\.xsave: missing field"):
        decode_state(_enc(p), Vm)


@pytest.mark.parametrize("path, value", [
    (("mem_size",), True),            # bool is not an int
    (("mem_size",), "4096"),
    (("cmdline",), b"cmd"),           # bytes is not str
    (("vcpus", 0, "xsave"), "x"),     # str is not bytes
    (("vcpus", 0, "regs", "halted"), 1),  # int is not bool
    (("pair",), [1]),                 # fixed tuple length
    (("slots",), {"a": 1}),
    (("vcpus", 0, "msrs", 0), [1, 2, 3]),
    (("vcpus", 0, "regs"), None),     # not Optional
])
def test_wrong_types_rejected(path, value):
    p = _plain(_vm())
    target = p
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    with pytest.raises(SnapshotFormatError, match="state field Vm"):
        decode_state(_enc(p), Vm)


@FAST
@given(garbage=st.binary(max_size=64))
def test_decode_garbage_only_raises_format_error(garbage):
    try:
        decode_state(garbage, Vm)
    except SnapshotFormatError:
        pass


def test_encode_rejects_unsupported_values():
    with pytest.raises(TypeError):
        encode_state(Regs(1.5, 0, False))
    with pytest.raises(ValueError):
        encode_state(Regs(2**64, 0, False))
    with pytest.raises(TypeError):
        encode_state({"not": "a dataclass"})


def test_decode_is_fast():
    import time
    vm = Vm(tuple(Vcpu(i, Regs(i, i, False), bytes(4096), tuple((j, j) for j in range(32)), None)
                  for i in range(8)), 1 << 30, list(range(16)), "x" * 200, (1, "a"))
    blob = encode_state(vm)
    decode_state(blob, Vm)
    t0 = time.perf_counter()
    for _ in range(100):
        decode_state(blob, Vm)
    per_call = (time.perf_counter() - t0) / 100
    assert per_call < 2e-3, f"decode took {per_call * 1e6:.0f} us"
