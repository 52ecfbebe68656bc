"""Chunk codecs. The numeric ids are a fixed ABI: the C page server decompresses by id."""
from __future__ import annotations

import threading

import lz4.block
import zstandard

ZERO, RAW, LZ4, ZSTD = 0, 1, 2, 3
NAMES = {ZERO: "zero", RAW: "raw", LZ4: "lz4", ZSTD: "zstd"}
BY_NAME = {v: k for k, v in NAMES.items()}
DEFAULT_LEVEL = {RAW: 0, LZ4: 0, ZSTD: 3}
# Store raw when compression saves less than 10%: decompressing costs more than it saves.
RAW_THRESHOLD = 0.9

_local = threading.local()  # zstd (de)compressor objects are not safe to share across threads


class CodecError(ValueError):
    pass


def codec_id(name: str) -> int:
    try:
        return BY_NAME[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r} (choose from lz4, zstd, raw)") from None


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _local.__dict__.setdefault("zc", {})
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                                    write_checksum=False)
    return c


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def compress_raw(data, codec: int, level: int) -> bytes:
    """Compress with exactly `codec` (no raw fallback). lz4 level: <=2 default, >=3 HC, <0 acceleration."""
    if codec == LZ4:
        if level >= 3:
            return lz4.block.compress(data, mode="high_compression", compression=level, store_size=False)
        if level < 0:
            return lz4.block.compress(data, mode="fast", acceleration=-level, store_size=False)
        return lz4.block.compress(data, store_size=False)
    if codec == ZSTD:
        return _zstd_compressor(level).compress(data)
    if codec == RAW:
        return bytes(data)
    raise CodecError(f"cannot compress with codec id {codec}")


def encode(data, codec: int, level: int) -> tuple[int, bytes]:
    """(codec actually used, stored bytes); falls back to RAW when compression does not pay."""
    if codec != RAW:
        stored = compress_raw(data, codec, level)
        if len(stored) < RAW_THRESHOLD * len(data):
            return codec, stored
    return RAW, bytes(data)


def decode(codec: int, stored, raw_len: int) -> bytes:
    """Inverse of encode; raises CodecError when the stored bytes do not decode to raw_len bytes."""
    try:
        if codec == LZ4:
            out = lz4.block.decompress(stored, uncompressed_size=raw_len)
        elif codec == ZSTD:
            out = _zstd_decompressor().decompress(stored, max_output_size=raw_len)
        elif codec == RAW:
            out = bytes(stored)
        elif codec == ZERO:
            return bytes(raw_len)
        else:
            raise CodecError(f"unknown codec id {codec}")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as exc:
        raise CodecError(f"{NAMES[codec]} data does not decompress: {exc}") from None
    if len(out) != raw_len:
        raise CodecError(f"{NAMES[codec]} data decompresses to {len(out)} bytes, expected {raw_len}")
    return out
