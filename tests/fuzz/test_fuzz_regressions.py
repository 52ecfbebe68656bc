"""Each input the fuzzers (or the review around them) found mishandled, kept with the documented error it must now
give. docs/reliability.md, "Fuzzing", lists them with what they did before."""
import hashlib
import json
import os
import socket
import struct
import threading
import time

import pytest

from snapd import uffd_handshake as hs
from snapd.image.errors import ChunkCorrupt, ImageError, ImageFormatError
from snapd.image.index import decode_index
from snapd.image.layers import _pieces_by_chunk
from snapd.image.reader import BaseImage
from snapd.loadset import LoadingSet, LoadingSetCorrupt, merge
from snapd.snapfile import SnapshotFormatError, decode_state, pack_state_file, read_state_file
from tests.fuzz.hostile import peak_of
from tests.fuzz.targets import CORPUS, corpus, corpus_state, run_messages, workdir
from vmm.persist import MicrovmState, MemoryRegionState

MiB = 1 << 20


def _resign(data: bytes) -> bytes:
    return data[:-32] + hashlib.blake2b(data[:-32], digest_size=32).digest()


def _put(data: bytes, fmt: str, offset: int, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


# --- the page server's messages, as the VMM reads them ------------------------------------------------------------

def _read_all(data: bytes):
    a, b = socket.socketpair()
    with a, b:
        b.sendall(data)
        b.shutdown(socket.SHUT_WR)
        messages = hs.ServerMessages(a)
        while True:
            messages.read(timeout=2)


@pytest.mark.parametrize("data", [
    b'{"ready": tru\n',              # was json.JSONDecodeError
    b'{"ready": true}\xff\n',        # was UnicodeDecodeError
    b'5\n',                          # was returned as a message: wait_ready and the VMM's reader died on TypeError
    b'["error"]\n',                  # same (a list has no .get)
    b'"error"\n',                    # same ("error" in "error", then "error"["error"])
    b'[' * 100_000 + b'\n',          # was RecursionError
    b'x' * (100 << 10),              # no newline: was buffered without bound until EOF
])
def test_a_page_server_speaking_garbage_is_a_protocol_error(data):
    with pytest.raises(hs.ProtocolError):
        _read_all(data)


def test_protocol_error_is_caught_where_json_errors_were():
    """vmm/uffd_backend.py stops the VM on PageServerDied and on ValueError (which the JSON errors were)."""
    assert issubclass(hs.ProtocolError, hs.PageServerError) and issubclass(hs.ProtocolError, ValueError)
    run_messages(b"5\n")  # both readers give a documented error


# --- the handshake's region list, as the page server reads it --------------------------------------------------------

@pytest.mark.parametrize("region", [
    {"base_host_virt_addr": 4096, "size": float("inf"), "offset": 0},     # was OverflowError
    {"base_host_virt_addr": 4096, "size": 1e300, "offset": 0},            # was accepted as a 1e300-byte region
    {"base_host_virt_addr": 4096, "size": -4096, "offset": 0},            # these were accepted and handed to C,
    {"base_host_virt_addr": -4096, "size": 4096, "offset": 0},            # where cffi raised OverflowError
    {"base_host_virt_addr": 4096, "size": 4096, "offset": 1 << 64},       # after the uffd was received
    {"base_host_virt_addr": 4096, "size": 0, "offset": 0},
    {"base_host_virt_addr": 4097, "size": 4096, "offset": 0},
    {"base_host_virt_addr": (1 << 64) - 4096, "size": 8192, "offset": 0},
    {"base_host_virt_addr": 4096, "size": "4096", "offset": 0},
    {"base_host_virt_addr": 4096, "size": True, "offset": 0},
    {"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size_kib": "4"},
    {"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size_kib": 1 << 70},
])
def test_bad_regions_are_handshake_errors(region):
    with pytest.raises(hs.HandshakeError):
        hs.parse_regions([region])


def test_firecrackers_regions_still_parse():
    assert hs.parse_regions([{"base_host_virt_addr": 4096, "size": 8192, "offset": 0, "page_size_kib": 4}]) == \
        [hs.Region(4096, 8192, 0, 4096)]
    assert hs.parse_regions(json.loads(corpus("wire/handshake.json")[0]))[0].size == 16 * MiB


def test_page_size_kib_string_is_refused_without_building_it():
    """``"9" * 512 KiB`` times 1024 was a 512 MiB string before int() refused it."""
    data = json.dumps([{"base_host_virt_addr": 4096, "size": 4096, "offset": 0,
                        "page_size_kib": "9" * (512 << 10)}]).encode()
    assert peak_of("handshake", data) < 8 * MiB


def _handshake(send, timeout):
    ours, theirs = socket.socketpair()
    fd = os.eventfd(0)
    thread = threading.Thread(target=send, args=(theirs, fd), daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        with pytest.raises(hs.HandshakeError) as err:
            hs.recv_handshake(ours, timeout=timeout)
        return err.value, time.monotonic() - start
    finally:
        ours.close()
        thread.join(5)
        theirs.close()
        os.close(fd)


def test_deep_handshake_is_a_handshake_error():
    def send(sock, fd):
        try:
            socket.send_fds(sock, [b"[" * 60000], [fd])
            sock.sendall(b"[" * 40000)
        except OSError:
            pass  # refused before all of it was read
    err, _ = _handshake(send, 5)  # was RecursionError
    assert "nests" in str(err)


def test_a_slow_handshake_is_cut_at_its_timeout():
    """The timeout was per piece: a VMM sending a byte now and then held the listener (one accept thread) forever."""
    def send(sock, fd):
        try:
            socket.send_fds(sock, [b"["], [fd])
            for _ in range(30):
                time.sleep(0.1)
                sock.send(b" ")
        except OSError:
            pass
    err, took = _handshake(send, 1.0)
    assert "within 1.0 s" in str(err) and took < 2.0


# --- image indexes ---------------------------------------------------------------------------------------------

def _index_with(offset: int, fmt: str, value, name: str = "base.img") -> str:
    data = _resign(_put(corpus(f"image/{name}")[0], fmt, offset, value))
    path = os.path.join(workdir(), "regression.img")
    with open(path, "wb") as f:
        f.write(data)
    return path


def _first_stored_entry(name: str = "base.img") -> int:
    data = corpus(f"image/{name}")[0]
    return next(128 + 64 * i for i in range(len(data) // 64) if data[128 + 64 * i + 32] not in (0, 255))


def test_a_base_image_entry_saying_parent_is_refused_at_open():
    """Codec 255 (a layer's "the parent's") in a base image: chunk_table raised TypeError, read_chunk
    AttributeError."""
    with pytest.raises(ImageFormatError, match="chunk 0: unknown codec id 255"):
        BaseImage.open(_index_with(128 + 32, "<B", 255))


def test_an_unknown_codec_is_refused_at_open():
    with pytest.raises(ImageFormatError, match="unknown codec id 7"):
        BaseImage.open(_index_with(_first_stored_entry() + 32, "<B", 7))


def test_a_huge_stored_length_is_refused_before_reading():
    """2**32-1: os.pread allocated 4 GiB before reading."""
    path = _index_with(_first_stored_entry() + 48, "<I", (1 << 32) - 1)
    with BaseImage.open(path) as img:
        chunk = (_first_stored_entry() - 128) // 64
        with pytest.raises(ChunkCorrupt, match="implausible stored length"):
            img.read_chunk(chunk)
        with pytest.raises(ChunkCorrupt, match="implausible stored length"):
            img.chunk_table()


def test_an_offset_past_off_t_is_chunk_corrupt():
    """2**64-1: os.pread raised OverflowError."""
    with BaseImage.open(_index_with(_first_stored_entry() + 40, "<Q", (1 << 64) - 1)) as img:
        with pytest.raises(ChunkCorrupt):
            img.read_chunk((_first_stored_entry() - 128) // 64)


def test_a_nul_in_the_store_path_is_refused():
    """A NUL byte in the store path: os.open raised ValueError at the first read."""
    data = bytearray(corpus("image/base.img")[0])
    src_len, store_len = struct.unpack_from("<HH", data, 72)
    data[76 + src_len] = 0
    with pytest.raises(ImageFormatError, match="NUL"):
        decode_index(_resign(bytes(data)), "x.img")


def test_a_header_size_off_the_alignment_is_refused():
    data = bytearray(corpus("image/base.img")[0])
    struct.pack_into("<I", data, 12, 160)  # 32 more bytes of padding: entries at 160, not a multiple of 64
    data = bytes(data[:128]) + bytes(32) + bytes(data[128:])
    with pytest.raises(ImageFormatError, match="multiple of 64"):
        decode_index(_resign(data), "x.img")


def _layer_with_parent(parent: str) -> str:
    """The corpus layer, its parent path replaced (same header size: the path is padded to it)."""
    data = bytearray(corpus("image/layer.img")[0])
    header_size, = struct.unpack_from("<I", data, 12)
    src_len, store_len = struct.unpack_from("<HH", data, 72)
    at = 76 + src_len + store_len + 32
    raw = parent.encode()
    assert at + 2 + len(raw) <= header_size
    struct.pack_into("<H", data, at, len(raw))
    data[at + 2:header_size] = raw + bytes(header_size - at - 2 - len(raw))
    path = os.path.join(workdir(), "regression-layer.img")
    with open(path, "wb") as f:
        f.write(_resign(bytes(data)))
    return path


def test_the_corpus_layer_opens():
    with BaseImage.open(_layer_with_parent("base.img")) as img:
        assert img.parent is not None


@pytest.mark.parametrize("parent", ["", ".", "..", "/"])
def test_a_layer_whose_parent_is_a_directory_is_an_image_error(parent):
    """Was IsADirectoryError."""
    with pytest.raises(ImageError):
        BaseImage.open(_layer_with_parent(parent))


def test_a_layer_whose_parent_is_dev_zero_is_refused():
    """Was read to the end: never, allocating until the process died."""
    with pytest.raises(ImageError, match="not a regular file"):
        BaseImage.open(_layer_with_parent("/dev/zero"))


def test_a_layer_whose_parent_is_a_fifo_does_not_block(tmp_path):
    """Was a hang in open()."""
    os.mkfifo(os.path.join(workdir(), "fifo.img"))
    try:
        with pytest.raises(ImageError, match="not a regular file"):
            BaseImage.open(_layer_with_parent("fifo.img"))
    finally:
        os.unlink(os.path.join(workdir(), "fifo.img"))


def test_a_negative_diff_page_run_is_an_image_error():
    """build_layer's page runs come from a Diff's state file: a negative first page read chunk -1 (IndexError)."""
    with pytest.raises(ImageError, match="outside"):
        _pieces_by_chunk([(-1, 1)], 65536, 1 << 20, "diff.mem")


# --- loading sets ----------------------------------------------------------------------------------------------

def test_a_loading_set_of_chunk_size_zero_is_corrupt():
    """Was accepted, then merge() and check_for() raised ZeroDivisionError."""
    data = _resign(_put(corpus("loadset/*.loadset")[0], "<I", 12, 0))
    with pytest.raises(LoadingSetCorrupt, match="chunk size 0"):
        LoadingSet.from_bytes(data)
    made = LoadingSet(b"", 0, 1 << 20, (1,))  # one made in code, not read: check_for still answers
    with pytest.raises(Exception) as err:
        merge([made, made])
    assert not isinstance(err.value, ZeroDivisionError)


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_a_loading_set_path_that_is_not_a_file_is_refused(tmp_path, special):
    """A FIFO hung LoadingSet.load; /dev/zero was read without end."""
    path = str(tmp_path / "ls") if special == "fifo" else special
    if special == "fifo":
        os.mkfifo(path)
    with pytest.raises(LoadingSetCorrupt, match="not a regular file"):
        LoadingSet.load(path)


# --- state files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("what, body", [
    ("empty maps", b"\xdd" + (4 * MiB).to_bytes(4, "big") + b"\x80" * (4 * MiB)),
    ("empty arrays", b"\xdd" + (4 * MiB).to_bytes(4, "big") + b"\x90" * (4 * MiB)),
    ("one-item arrays", b"\xdd" + (2 * MiB).to_bytes(4, "big") + b"\x91\x00" * (2 * MiB)),
])
def test_a_state_body_of_many_containers_is_refused_without_building_them(what, body):
    """4 MiB of them took 5-6 s and 140-290 MiB of Python objects (a 64 MiB state file: gigabytes)."""
    start = time.monotonic()
    with pytest.raises(SnapshotFormatError):
        decode_state(body, MicrovmState)
    assert time.monotonic() - start < 1.0
    assert peak_of("state_body", body) < 2 * MiB


def _forged(**changes) -> bytes:
    import dataclasses
    from snapd.snapfile import encode_state
    return pack_state_file(encode_state(dataclasses.replace(corpus_state(), **changes)))


@pytest.mark.parametrize("changes, message", [
    # A layout other than the machine's: regions mapped and handed to KVM as the file says.
    (lambda s: {"memory": (MemoryRegionState("ram_low", 1 << 40, s.memory[0].size, 0),)}, "memory layout"),
    (lambda s: {"config": __import__("dataclasses").replace(s.config, mem_size_mib=s.config.mem_size_mib * 2)},
     "memory layout"),
    # Diff page runs outside the memory file, overlapping, or in a Full snapshot.
    (lambda s: {"parent_snapshot_id": "a" * 32, "diff_page_runs": ((-1, 2),)}, "diff page runs"),
    (lambda s: {"parent_snapshot_id": "a" * 32, "diff_page_runs": ((5, 2), (6, 1))}, "diff page runs"),
    (lambda s: {"parent_snapshot_id": "a" * 32, "diff_page_runs": ((1 << 40, 1),)}, "diff page runs"),
    (lambda s: {"diff_page_runs": ((1, 1),)}, "Full snapshot with diff page runs"),
])
def test_a_checksummed_state_with_an_impossible_layout_is_refused(changes, message):
    from vmm.snapshot import SnapshotError, read_snapshot_fd
    data = _forged(**changes(corpus_state()))
    fd = os.memfd_create("forged")
    try:
        os.write(fd, data)
        with pytest.raises(SnapshotError, match=message):
            read_snapshot_fd(fd, "forged.state")
    finally:
        os.close(fd)


def test_a_state_path_that_is_a_fifo_does_not_block(tmp_path):
    """open() of a FIFO waited for a writer."""
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(SnapshotFormatError, match="not a regular file"):
        read_state_file(tmp_path / "fifo")


def test_the_corpus_is_there():
    assert os.path.isdir(CORPUS) and corpus("state/*.state") and corpus("image/*.img")
