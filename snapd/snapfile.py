"""Snapshot state-file container and a strict msgpack codec for frozen state dataclasses.

Layout (little-endian; see docs/snapshot-format.md):
    magic  8 bytes  b"UVMSNAP\\0"
    major  u16, minor u16
    length u64      body length in bytes
    body   `length` bytes (msgpack, see encode_state)
    digest 32 bytes BLAKE2b-256 over everything before it

and the identity trailer that ends every snapshot memory file (one 4 KiB page after guest memory; see
docs/snapshot-format.md, "Memory file"), which the state file names: ``pack_memory_trailer``,
``read_memory_trailer``.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
import struct
import types
import typing
from typing import Any, Callable, TypeVar

import msgpack

from snapd.atomic import atomic_write

__all__ = [
    "MAGIC", "VERSION", "DEFAULT_MAX_SIZE",
    "SnapshotFormatError", "BadMagic", "UnsupportedVersion", "Truncated", "ChecksumMismatch",
    "TooLarge", "TrailingData", "NoMemoryTrailer",
    "MEMORY_TRAILER_MAGIC", "MEMORY_TRAILER_VERSION", "MEMORY_TRAILER_SIZE", "MemoryTrailer",
    "pack_memory_trailer", "unpack_memory_trailer", "read_memory_trailer", "memory_data_size",
    "pack_state_file", "unpack_state_file", "write_state_file", "read_state_file", "read_state_fd",
    "encode_state", "decode_state", "save_state", "load_state",
]

MAGIC = b"UVMSNAP\0"
VERSION = (2, 0)  # (major, minor): a reader accepts any minor of its own major
# Why a reader refuses an older major (the message says so): what that major lacks.
_OLDER_MAJORS = {1: "format 1 does not name its memory file's identity, so a state file could be loaded with "
                    "another snapshot's memory; take the snapshot again with this version"}
DEFAULT_MAX_SIZE = 64 << 20
_HEADER = struct.Struct("<8sHHQ")
_DIGEST_LEN = 32
_OVERHEAD = _HEADER.size + _DIGEST_LEN


class SnapshotFormatError(Exception):
    """A state file or state body is not something this version can read."""


class BadMagic(SnapshotFormatError):
    pass


class UnsupportedVersion(SnapshotFormatError):
    pass


class Truncated(SnapshotFormatError):
    pass


class ChecksumMismatch(SnapshotFormatError):
    pass


class TooLarge(SnapshotFormatError):
    pass


class TrailingData(SnapshotFormatError):
    pass


class NoMemoryTrailer(SnapshotFormatError):
    """A memory file does not end with a valid identity trailer (an older snapshot's, or no snapshot's)."""


def _digest(data) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST_LEN).digest()


def pack_state_file(body: bytes, version: tuple[int, int] = VERSION) -> bytes:
    """The complete file contents for `body` (exposed for tests and for in-memory transport)."""
    head = _HEADER.pack(MAGIC, version[0], version[1], len(body))
    return head + body + _digest(head + body)


def unpack_state_file(data: bytes, name: str = "<memory>",
                      max_size: int = DEFAULT_MAX_SIZE) -> tuple[tuple[int, int], bytes]:
    """Validate file contents; return ((major, minor), body). Raises a SnapshotFormatError subclass."""
    size = len(data)
    if size == 0:
        raise Truncated(f"{name}: empty file, not a snapshot state file")
    if size > max_size:
        raise TooLarge(f"{name}: {size} bytes exceeds the limit of {max_size}")
    magic = data[:len(MAGIC)]
    if magic != MAGIC[:len(magic)]:
        raise BadMagic(f"{name}: bad magic: not a snapshot state file (it does not begin with UVMSNAP)")
    if size < _HEADER.size:
        raise Truncated(f"{name}: truncated header ({size} of {_HEADER.size} bytes)")
    _, major, minor, length = _HEADER.unpack_from(data)
    if major != VERSION[0]:
        newer = "newer" if major > VERSION[0] else "older"
        why = f" ({_OLDER_MAJORS[major]})" if major in _OLDER_MAJORS else ""
        raise UnsupportedVersion(f"{name}: format version {major}.{minor} is {newer} than this "
                                 f"reader's major version {VERSION[0]}{why}")
    expected = _OVERHEAD + length
    if expected > max_size:
        raise TooLarge(f"{name}: header declares a {length}-byte body, over the limit of {max_size} bytes")
    if size < expected:
        raise Truncated(f"{name}: truncated: {size} bytes, header declares {expected}")
    if size > expected:
        raise TrailingData(f"{name}: {size - expected} bytes of trailing data after the checksum")
    view = memoryview(data)
    if _digest(view[:-_DIGEST_LEN]) != bytes(view[-_DIGEST_LEN:]):
        raise ChecksumMismatch(f"{name}: checksum mismatch (file is corrupt)")
    return (major, minor), bytes(view[_HEADER.size:-_DIGEST_LEN])


def write_state_file(path: str | os.PathLike, body: bytes) -> None:
    """Atomically write a state file holding `body`."""
    atomic_write(path, pack_state_file(body))


def read_state_file(path: str | os.PathLike,
                    max_size: int = DEFAULT_MAX_SIZE) -> tuple[tuple[int, int], bytes]:
    """Read and validate a state file; return ((major, minor), body). A path that is not a regular file (a FIFO,
    whose open would block; a device) is refused before anything is read."""
    name = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotFormatError(f"{name}: not a regular file, not a snapshot state file")
        return unpack_state_file(read_state_fd(fd, name, max_size), name, max_size)
    finally:
        os.close(fd)


def read_state_fd(fd: int, name: str, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """The whole of an open state file (from its start), its size checked against ``max_size`` before anything
    is read into memory; not yet validated (``unpack_state_file``)."""
    size = os.fstat(fd).st_size
    if size > max_size:  # checked before reading anything into memory
        raise TooLarge(f"{name}: {size} bytes exceeds the limit of {max_size}")
    pieces, left, offset = [], max_size + 1, 0  # +1: a file that grew after fstat is still caught
    while left > 0:
        piece = os.pread(fd, min(left, 1 << 20), offset)
        if not piece:
            break
        pieces.append(piece)
        offset += len(piece)
        left -= len(piece)
    return b"".join(pieces)


# --- memory-file identity trailer --------------------------------------------------------------

MEMORY_TRAILER_MAGIC = b"UVMMEMID"
MEMORY_TRAILER_VERSION = (1, 0)  # (major, minor) of the trailer's own layout
MEMORY_TRAILER_SIZE = 4096  # one page, after the last byte of guest memory
MEMORY_ID_LEN = 16  # a random 128-bit id; the snapshot id is 128 bits too
# magic, major, minor, trailer size, memory id, snapshot id, data size: 56 bytes
_TRAILER_HEAD = struct.Struct("<8sHHI16s16sQ")
_TRAILER_DIGEST_AT = MEMORY_TRAILER_SIZE - _DIGEST_LEN  # BLAKE2b-256 of bytes 0 .. 4064, at 4064


@dataclasses.dataclass(frozen=True)
class MemoryTrailer:
    """What a memory file says of itself: its random id, the id of the snapshot it was written for, and the bytes
    of guest memory before the trailer."""
    memory_id: bytes
    snapshot_id: bytes
    data_size: int


def pack_memory_trailer(memory_id: bytes, snapshot_id: bytes, data_size: int) -> bytes:
    """The 4 KiB trailer written at offset ``data_size`` of a memory file whose guest memory is ``data_size``
    bytes (the file is then exactly ``data_size + MEMORY_TRAILER_SIZE`` bytes)."""
    if len(memory_id) != MEMORY_ID_LEN or len(snapshot_id) != MEMORY_ID_LEN or data_size < 0:
        raise ValueError(f"a memory trailer needs {MEMORY_ID_LEN}-byte ids and a size >= 0")
    head = _TRAILER_HEAD.pack(MEMORY_TRAILER_MAGIC, *MEMORY_TRAILER_VERSION, MEMORY_TRAILER_SIZE, memory_id,
                              snapshot_id, data_size)
    body = head + bytes(_TRAILER_DIGEST_AT - len(head))
    return body + _digest(body)


def unpack_memory_trailer(data: bytes, name: str = "<memory>") -> MemoryTrailer:
    """Validate a trailer's bytes (exactly MEMORY_TRAILER_SIZE); raises a SnapshotFormatError subclass naming
    ``name`` (never quoting the bytes)."""
    if len(data) != MEMORY_TRAILER_SIZE or data[:len(MEMORY_TRAILER_MAGIC)] != MEMORY_TRAILER_MAGIC:
        raise NoMemoryTrailer(f"{name}: does not end with a memory identity trailer (a memory file written "
                              f"before snapshot format {VERSION[0]}, or not a snapshot memory file)")
    _, major, minor, size, memory_id, snapshot_id, data_size = _TRAILER_HEAD.unpack_from(data)
    if major != MEMORY_TRAILER_VERSION[0]:
        newer = "newer" if major > MEMORY_TRAILER_VERSION[0] else "older"
        raise UnsupportedVersion(f"{name}: memory trailer version {major}.{minor} is {newer} than this reader's "
                                 f"major version {MEMORY_TRAILER_VERSION[0]}")
    if size != MEMORY_TRAILER_SIZE:
        raise SnapshotFormatError(f"{name}: its memory trailer declares {size} bytes, not {MEMORY_TRAILER_SIZE}")
    view = memoryview(data)
    if _digest(view[:_TRAILER_DIGEST_AT]) != bytes(view[_TRAILER_DIGEST_AT:]):
        raise ChecksumMismatch(f"{name}: memory trailer checksum mismatch (file is corrupt)")
    return MemoryTrailer(bytes(memory_id), bytes(snapshot_id), data_size)


def read_memory_trailer(fd: int, name: str) -> MemoryTrailer:
    """The trailer that ends the open memory file ``fd`` (one fstat and one 4 KiB pread: guest memory is not
    read), checked against the file's size."""
    size = os.fstat(fd).st_size
    if size < MEMORY_TRAILER_SIZE:
        raise NoMemoryTrailer(f"{name}: {size} bytes, too short to end with a memory identity trailer")
    data = os.pread(fd, MEMORY_TRAILER_SIZE, size - MEMORY_TRAILER_SIZE)
    if len(data) != MEMORY_TRAILER_SIZE:
        raise OSError(errno.EIO, f"{name}: short read of its last {MEMORY_TRAILER_SIZE} bytes (it is changing)")
    trailer = unpack_memory_trailer(data, name)
    if trailer.data_size != size - MEMORY_TRAILER_SIZE:
        raise Truncated(f"{name}: its trailer follows {trailer.data_size} bytes of memory, but the file holds "
                        f"{size - MEMORY_TRAILER_SIZE} before it (truncated or extended)")
    return trailer


def memory_data_size(fd: int, name: str = "<memory>") -> int:
    """Bytes of guest memory in an open file: before its identity trailer if it ends with one (a snapshot memory
    file), else the whole file (raw memory). A trailer that is present but damaged is an error."""
    try:
        return read_memory_trailer(fd, name).data_size
    except NoMemoryTrailer:
        return os.fstat(fd).st_size


# --- strict dataclass <-> msgpack codec -------------------------------------------------------

T = TypeVar("T")
_Decoder = Callable[[Any], Any]


class _FieldError(Exception):
    """Internal: carries the failing path outwards without building strings on the fast path."""

    def __init__(self, what: str):
        self.what = what
        self.path: list[str] = []


def _kind(v) -> str:
    """A decoded value's msgpack kind, for messages."""
    return {tuple: "array", dict: "map", type(None): "nil"}.get(type(v), type(v).__name__)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _scalar_decoder(tp) -> _Decoder:
    def dec(v):
        if type(v) is not tp:  # exact: bool is not accepted for int, nor int for bool
            raise _FieldError(f"expected {tp.__name__}, got {_kind(v)}")
        return v
    return dec


def _seq_decoder(container, item: _Decoder) -> _Decoder:
    def dec(v):
        if type(v) is not tuple:  # msgpack arrays decode as tuples (_unpack_bounded)
            raise _FieldError(f"expected array, got {_kind(v)}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except _FieldError as e:
                e.path.append(f"[{i}]")
                raise
        return container(out)
    return dec


def _fixed_tuple_decoder(items: list[_Decoder]) -> _Decoder:
    n = len(items)

    def dec(v):
        if type(v) is not tuple or len(v) != n:
            raise _FieldError(f"expected array of {n} items, got {_kind(v)}"
                              + (f" of {len(v)}" if type(v) is tuple else ""))
        out = []
        for i, (d, x) in enumerate(zip(items, v)):
            try:
                out.append(d(x))
            except _FieldError as e:
                e.path.append(f"[{i}]")
                raise
        return tuple(out)
    return dec


def _optional_decoder(inner: _Decoder) -> _Decoder:
    return lambda v: None if v is None else inner(v)


def _dataclass_decoder(cls) -> _Decoder:
    hints = typing.get_type_hints(cls)
    fields = [(f.name, _decoder_for(hints[f.name])) for f in dataclasses.fields(cls) if f.init]
    names = frozenset(n for n, _ in fields)

    def dec(v):
        if type(v) is not dict:
            raise _FieldError(f"expected map for {cls.__name__}, got {_kind(v)}")
        if len(v) != len(fields) or not names.issuperset(v):
            unknown = sorted(map(str, set(v) - names))
            missing = sorted(names - set(v))
            if unknown:  # not named: the name is the file's bytes, and a reply never quotes those
                e = _FieldError(f"unknown field in {cls.__name__} ({len(unknown)} not among its fields)")
            else:
                e = _FieldError(f"missing field in {cls.__name__}")
                e.path.append("." + missing[0])
            raise e
        kwargs = {}
        for name, d in fields:
            try:
                kwargs[name] = d(v[name])
            except _FieldError as e:
                e.path.append("." + name)
                raise
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:  # a __post_init__ validation refused the values (not quoted: they
            raise _FieldError(f"{cls.__name__} rejected its fields ({type(exc).__name__})") from None  # are the file's)
    return dec


_decoders: dict[Any, _Decoder] = {}


def _decoder_for(tp) -> _Decoder:
    try:
        return _decoders[tp]
    except (KeyError, TypeError):
        pass
    if tp in (int, bool, str, bytes):
        dec = _scalar_decoder(tp)
    elif dataclasses.is_dataclass(tp) and isinstance(tp, type):
        real: list[_Decoder] = []
        _decoders[tp] = lambda v: real[0](v)  # forwarder, so self-referential types terminate
        real.append(_dataclass_decoder(tp))
        dec = real[0]
    else:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1 or len(args) != 2:
                raise TypeError(f"unsupported union {tp}: only Optional[X] is allowed")
            dec = _optional_decoder(_decoder_for(rest[0]))
        elif origin is list and len(args) == 1:
            dec = _seq_decoder(list, _decoder_for(args[0]))
        elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            dec = _seq_decoder(tuple, _decoder_for(args[0]))
        elif origin is tuple and args and Ellipsis not in args:
            dec = _fixed_tuple_decoder([_decoder_for(a) for a in args])
        else:
            raise TypeError(f"unsupported field type {tp!r} for a state dataclass")
    _decoders[tp] = dec
    return dec


def _to_plain(obj, path: str):
    t = type(obj)
    if t in (int, bool, str, bytes) or obj is None:
        return obj
    if t in (tuple, list):
        return [_to_plain(x, f"{path}[{i}]") for i, x in enumerate(obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name), f"{path}.{f.name}")
                for f in dataclasses.fields(obj) if f.init}
    raise TypeError(f"state field {path or '<root>'}: cannot encode {t.__name__}")


def encode_state(obj) -> bytes:
    """msgpack of a (nested) dataclass instance: each dataclass becomes a map keyed by field name."""
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f"encode_state expects a dataclass instance, got {type(obj).__name__}")
    _decoder_for(type(obj))  # fail early on field types decode would not accept
    plain = _to_plain(obj, type(obj).__name__)
    try:
        return msgpack.packb(plain, use_bin_type=True)
    except OverflowError as exc:
        raise ValueError(f"{type(obj).__name__}: integer out of the 64-bit range: {exc}") from None


# Bounds on what a body may make msgpack build, so a hand-made body with a valid checksum cannot make decoding take
# many times its size in memory (16 MiB of empty maps became 1.1 GiB of dicts, 16 MiB of one-byte arrays 1 GiB of
# lists, before these). A state has a few dozen maps (one per dataclass instance); its only long arrays are lists of
# small tuples (cpuid entries, MSRs, diff page runs), at least 3 bytes of body each. Arrays are decoded as tuples
# (an empty one is a shared singleton), and every array or map counts against the body's length.
MAX_STATE_MAPS = 4096
_BYTES_PER_CONTAINER = 3


class _TooManyContainers(Exception):
    pass


def _unpack_bounded(data: bytes):
    budget = [len(data) // _BYTES_PER_CONTAINER + 64, MAX_STATE_MAPS]

    def on_array(items):
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooManyContainers("arrays and maps")
        return items

    def on_map(pairs):
        budget[0] -= 1
        budget[1] -= 1
        if budget[0] < 0 or budget[1] < 0:
            raise _TooManyContainers("maps")
        return dict(pairs)

    return msgpack.unpackb(data, raw=False, use_list=False, list_hook=on_array, object_pairs_hook=on_map,
                           strict_map_key=True, max_array_len=len(data) // _BYTES_PER_CONTAINER + 64)


def decode_state(data: bytes, cls: type[T]) -> T:
    """Decode what encode_state produced, strictly: unknown, missing or mistyped fields are refused."""
    dec = _decoder_for(cls)
    try:
        plain = _unpack_bounded(data)
    except _TooManyContainers as exc:
        raise SnapshotFormatError(f"state body holds more {exc} than a state has") from None
    except Exception as exc:  # msgpack raises several unrelated types for malformed input (their text may quote
        raise SnapshotFormatError(f"state body is not valid msgpack ({type(exc).__name__})") from None  # bytes)
    try:
        return dec(plain)
    except _FieldError as e:
        path = cls.__name__ + "".join(reversed(e.path))
        raise SnapshotFormatError(f"state field {path}: {e.what}") from None


def save_state(path: str | os.PathLike, obj) -> None:
    write_state_file(path, encode_state(obj))


def load_state(path: str | os.PathLike, cls: type[T], max_size: int = DEFAULT_MAX_SIZE) -> T:
    name = os.fspath(path)
    _, body = read_state_file(path, max_size)
    try:
        return decode_state(body, cls)
    except SnapshotFormatError as exc:
        raise type(exc)(f"{name}: {exc}") from None
