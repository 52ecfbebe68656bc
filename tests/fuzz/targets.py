"""The fuzz targets: each decodes one untrusted input the way production reads it and lets only the module's own
documented error type out (anything else, a hang or an oversized allocation is a bug).

A ``Target`` has ``run(data)`` (raises only ``allowed``), its seeds (real files from tests/fuzz/corpus/, made by
tests/fuzz/make_corpus.py), the fields worth setting to extremes (tests/fuzz/mutate.py) and, for formats with a
checksum, ``resign(data)``: the same bytes with the checksum made valid again, so mutations get past it to the
code behind it (the "*_signed" targets). The hypothesis tests (tests/fuzz/test_fuzz_*.py) and the long runs
(``python -m tests.fuzz.run``) share these.
"""
from __future__ import annotations

import atexit
import functools
import glob
import hashlib
import importlib
import json
import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Callable

from tests.fuzz.mutate import Field

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
# How long a socket target waits for its peer: the peer is a thread of ours that has already written everything
# and shut down, so this only bounds a reader that would otherwise wait for more.
SOCKET_TIMEOUT = 2.0


@dataclass
class Target:
    name: str
    run: Callable[[bytes], None]
    allowed: tuple[type[BaseException], ...]
    seeds: Callable[[], list[bytes]]
    fields: list[Field] = field(default_factory=list)
    resign: Callable[[bytes], bytes] | None = None
    max_len: int = 1 << 20  # inputs longer than this are cut (the readers' own limits are at or below it)

    def check(self, data: bytes) -> None:
        """run(data), with anything but ``allowed`` re-raised as it came (the test fails with its traceback)."""
        try:
            self.run(data[:self.max_len])
        except self.allowed:
            pass


def corpus(pattern: str) -> list[bytes]:
    out = []
    for path in sorted(glob.glob(os.path.join(CORPUS, pattern))):
        with open(path, "rb") as f:
            out.append(f.read())
    if not out:
        raise FileNotFoundError(f"no seed matches {pattern} in {CORPUS}: run python -m tests.fuzz.make_corpus")
    return out


def _memfd(data: bytes, size: int | None = None) -> int:
    fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
    if size is not None:
        os.ftruncate(fd, size)
    if data:
        os.pwrite(fd, data, 0 if size is None else size - len(data))
    return fd


@functools.cache
def workdir() -> str:
    """A private copy of the corpus images (an index under test is written beside them, so relative store and
    parent paths resolve as they do for a real image)."""
    tmp = tempfile.mkdtemp(prefix="fuzz-images-")
    atexit.register(shutil.rmtree, tmp, True)
    shutil.copytree(os.path.join(CORPUS, "image"), os.path.join(tmp, "image"))
    return os.path.join(tmp, "image")


# --- state files (snapd/snapfile.py, vmm/persist.py, vmm/snapshot.py) -------------------------------------------

def _state_errors():
    from snapd.snapfile import SnapshotFormatError
    from vmm.snapshot import SnapshotError
    return SnapshotError, SnapshotFormatError


def run_state(data: bytes) -> None:
    from snapd.snapfile import decode_state, encode_state
    from vmm.persist import MicrovmState
    from vmm.snapshot import machine_config_of, memory_file_size, read_snapshot_fd, region_layouts
    fd = _memfd(data)
    try:
        state, raw = read_snapshot_fd(fd, "fuzz.state")
    finally:
        os.close(fd)
    assert raw == data
    # What a load does with a state it accepted before any KVM call: none of it may fail on a checked state.
    region_layouts(state)
    memory_file_size(state)
    machine_config_of(state)
    assert decode_state(encode_state(state), MicrovmState) == state  # what was accepted is what is written


def run_state_body(body: bytes) -> None:
    from snapd.snapfile import pack_state_file
    run_state(pack_state_file(body))


def resign_state(data: bytes) -> bytes:
    """The body between the 20-byte header and the 32-byte digest, with a header and digest made for it."""
    from snapd.snapfile import pack_state_file
    return pack_state_file(data[20:-32] if len(data) >= 52 else data[20:])


def state_body_seeds() -> list[bytes]:
    return [s[20:-32] for s in corpus("state/*.state")]


STATE_MAX = (64 << 20) + 64  # the state file format's own limit (snapd.snapfile.DEFAULT_MAX_SIZE), and a little
STATE_FIELDS = [Field("major", 8, 2), Field("minor", 10, 2), Field("length", 12, 8), Field("length.low", 12, 4)]


# --- memory-file identity trailer --------------------------------------------------------------------------------

@functools.cache
def corpus_state():
    from vmm.snapshot import read_snapshot
    return read_snapshot(os.path.join(CORPUS, "state", "full.state"))


def run_trailer(data: bytes) -> None:
    from snapd.snapfile import memory_data_size, read_memory_trailer, unpack_memory_trailer
    from vmm.snapshot import SnapshotError, check_memory_file
    state = corpus_state()
    try:
        unpack_memory_trailer(data, "fuzz.trailer")
    except _state_errors():
        pass
    fd = _memfd(data, state.memory_file.data_size + len(data))  # guest memory (a hole), then the trailer
    try:
        try:
            check_memory_file(fd, state, "full.state", "fuzz.mem")
        except SnapshotError:
            pass
        try:
            trailer = read_memory_trailer(fd, "fuzz.mem")
            assert trailer.data_size == os.fstat(fd).st_size - 4096
        except _state_errors():
            pass
        assert 0 <= memory_data_size(fd, "fuzz.mem") <= os.fstat(fd).st_size
    finally:
        os.close(fd)


def resign_trailer(data: bytes) -> bytes:
    if len(data) != 4096:
        return data
    return data[:4064] + hashlib.blake2b(data[:4064], digest_size=32).digest()


TRAILER_FIELDS = [Field("major", 8, 2), Field("minor", 10, 2), Field("size", 12, 4), Field("data_size", 48, 8),
                  Field("data_size.low", 48, 4)]


# --- image index, reader, layers (snapd/image/) -----------------------------------------------------------------

def run_index(data: bytes) -> None:
    from snapd.image.errors import ImageError
    from snapd.image.index import decode_index
    from snapd.image.reader import BaseImage
    try:
        decode_index(data, "fuzz.img")
    except ImageError:
        pass
    path = os.path.join(workdir(), "fuzz.img")
    with open(path, "wb") as f:
        f.write(data)
    img = BaseImage.open(path)
    try:
        table = img.chunk_table()
        assert len(table) == img.nchunks
        img.stats()
        wanted = [i for i, c in enumerate(table) if c.codec != 0][:8] + [0, img.nchunks - 1]
        for i in sorted({i for i in wanted if 0 <= i < img.nchunks}):
            img.raw_len(i)
            try:
                chunk = img.read_chunk(i, check_hash=True)
                assert len(chunk) == img.raw_len(i)
            except ImageError:
                pass
    finally:
        img.close()


def resign_index(data: bytes) -> bytes:
    if len(data) < 32:
        return data
    return data[:-32] + hashlib.blake2b(data[:-32], digest_size=32).digest()


def index_fields() -> list[Field]:
    fields = [Field("major", 8, 2), Field("minor", 10, 2), Field("header_size", 12, 4), Field("chunk_size", 16, 4),
              Field("codec", 20, 1), Field("level", 22, 2), Field("mem_size", 24, 8), Field("nchunks", 32, 8),
              Field("source_len", 72, 2), Field("store_len", 74, 2)]
    # Entries of the seeds (header 128 bytes for the corpus images; chunks 0..3 and a far one).
    for i in (0, 1, 3, 40):
        at = 128 + 64 * i
        fields += [Field(f"entry{i}.codec", at + 32, 1), Field(f"entry{i}.pack", at + 36, 4),
                   Field(f"entry{i}.offset", at + 40, 8), Field(f"entry{i}.stored_len", at + 48, 4)]
    return fields


# --- loading sets (snapd/loadset.py) ----------------------------------------------------------------------------

@functools.cache
def corpus_image_header():
    from snapd.image.index import decode_index
    with open(os.path.join(CORPUS, "image", "base.img"), "rb") as f:
        return decode_index(f.read(), "base.img")[0]


def run_loadset(data: bytes) -> None:
    from snapd.loadset import LoadingSet, LoadingSetError, merge
    hdr = corpus_image_header()
    fd = _memfd(data)
    try:
        try:
            LoadingSet.read_fd(fd, "fuzz.loadset", LoadingSet.max_file_size(hdr.mem_size, hdr.chunk_size))
        except LoadingSetError:
            pass
    finally:
        os.close(fd)
    ls = LoadingSet.from_bytes(data, "fuzz.loadset")
    again = LoadingSet.from_bytes(ls.to_bytes(), "fuzz.loadset")
    assert again == ls  # what was accepted is what is written
    ls.bytes_covered()
    merged = merge([ls, ls])
    assert merged.chunks == ls.chunks
    ls.check_for(hdr.content_id, hdr.chunk_size, hdr.mem_size, "base.img")


def resign_loadset(data: bytes) -> bytes:
    return resign_index(data)


LOADSET_FIELDS = [Field("major", 8, 2), Field("minor", 10, 2), Field("chunk_size", 12, 4), Field("mem_size", 16, 8),
                  Field("count", 56, 4), Field("reserved", 60, 4), Field("chunk0", 64, 4), Field("chunk1", 68, 4)]


# --- the uffd handshake (snapd/uffd_handshake.py) ---------------------------------------------------------------

def _feed(sock: socket.socket, data: bytes, fds: list[int]) -> threading.Thread:
    """Write ``data`` (the first piece with ``fds``) and shut the writing side, from a thread (a reader that stops
    early must not block us)."""
    def send():
        try:
            sent = socket.send_fds(sock, [data[:65536]], fds) if data or fds else 0
            if data[sent:]:
                sock.sendall(data[sent:])
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the reader closed its end first
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run_handshake(data: bytes) -> None:
    """The page server's side: recv_handshake on a connection whose peer sent ``data`` with one fd."""
    from snapd import uffd_handshake as hs
    before = _open_fds()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    carried = os.eventfd(0, os.EFD_CLOEXEC)  # stands in for the uffd
    feeder = _feed(theirs, data, [carried])
    try:
        try:
            fd, regions = hs.recv_handshake(ours, timeout=SOCKET_TIMEOUT)
        except hs.HandshakeError:
            pass
        else:
            os.close(fd)
            assert regions
            for r in regions:  # what the server hands to C as u64s: every field must fit
                assert 0 <= r.base_host_virt_addr < 1 << 64 and 0 < r.size < 1 << 64 and 0 <= r.offset < 1 << 64
    finally:
        ours.close()
        feeder.join(SOCKET_TIMEOUT)
        theirs.close()
        os.close(carried)
    assert _open_fds() == before, "recv_handshake leaked a descriptor"


def run_regions(data: bytes) -> None:
    """parse_regions on the JSON value of ``data`` (the structure-aware tests generate values directly)."""
    from snapd import uffd_handshake as hs
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        return
    hs.parse_regions(payload)


def run_messages(data: bytes) -> None:
    """The VMM's side: ServerMessages reading what a page server sent, then EOF."""
    from snapd import uffd_handshake as hs
    for how in ("read", "wait_ready"):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        feeder = _feed(theirs, data, [])
        try:
            messages = hs.ServerMessages(ours)
            try:
                if how == "wait_ready":
                    messages.wait_ready(SOCKET_TIMEOUT)
                else:
                    for _ in range(len(data) + 2):  # each read returns at least one message or raises at EOF
                        for msg in messages.read(timeout=SOCKET_TIMEOUT):
                            assert isinstance(msg, dict)
            except hs.PageServerError:
                pass
        finally:
            ours.close()
            feeder.join(SOCKET_TIMEOUT)
            theirs.close()


def _handshake_errors():
    from snapd import uffd_handshake as hs
    return (hs.HandshakeError,)


def _message_errors():
    from snapd import uffd_handshake as hs
    return (hs.PageServerError,)


# --- API bodies (vmm/api/fields.py parse_body with every object spec) --------------------------------------------

@functools.cache
def api_specs() -> list:
    from vmm.api.fields import ObjectSpec
    specs = []
    for module in ("vmm.api.fields", "snapd.daemon.http"):
        mod = importlib.import_module(module)
        specs += [value for name, value in sorted(vars(mod).items()) if isinstance(value, ObjectSpec)]
    return specs


def run_api(data: bytes) -> None:
    from vmm.api.errors import BadRequest
    from vmm.api.fields import parse_body
    for spec in api_specs():
        try:
            value = parse_body(data, spec)
        except BadRequest as exc:
            str(exc).encode()  # the reply's fault_message goes out as UTF-8
        else:
            assert isinstance(value, dict)


def _api_errors():
    from vmm.api.errors import BadRequest
    return (BadRequest,)


# --- the registry -------------------------------------------------------------------------------------------------

def _image_errors():
    from snapd.image.errors import ImageError
    return (ImageError,)


def _loadset_errors():
    from snapd.loadset import LoadingSetError
    return (LoadingSetError,)


def _signed(run, resign):
    return lambda data: run(resign(data))


@functools.cache
def targets() -> dict[str, Target]:
    from vmm.snapshot import SnapshotError
    out = [
        Target("state", run_state, (SnapshotError,), lambda: corpus("state/*.state"), STATE_FIELDS, resign_state,
               max_len=STATE_MAX),
        Target("state_body", run_state_body, (SnapshotError,), state_body_seeds, max_len=STATE_MAX),
        Target("trailer", run_trailer, _state_errors(), lambda: corpus("state/*.trailer"), TRAILER_FIELDS,
               resign_trailer),
        Target("index", run_index, _image_errors(), lambda: corpus("image/*.img"), index_fields(), resign_index),
        Target("loadset", run_loadset, _loadset_errors(), lambda: corpus("loadset/*.loadset"), LOADSET_FIELDS,
               resign_loadset),
        Target("handshake", run_handshake, _handshake_errors(), lambda: corpus("wire/handshake.json"),
               max_len=(1 << 20) + 65536),
        Target("regions", run_regions, _handshake_errors(), lambda: corpus("wire/handshake.json")),
        Target("messages", run_messages, _message_errors(), lambda: corpus("wire/*.jsonl")),
        Target("api", run_api, _api_errors(), lambda: corpus("api/*.json"), max_len=(1 << 20) + 16),
    ]
    by_name = {t.name: t for t in out}
    for t in out:  # the same targets behind a valid checksum
        if t.resign is not None:
            signed = Target(f"{t.name}_signed", _signed(t.run, t.resign), t.allowed, t.seeds, t.fields,
                            max_len=t.max_len)
            by_name[signed.name] = signed
    return by_name


