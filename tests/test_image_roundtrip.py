import os
import random

import pytest

from snapd.image import BaseImage, ChunkStore, build_image
from snapd.image import codecs

CHUNK = 4096


def make_mem(path, nchunks, chunk=CHUNK, seed=0, tail=0):
    """Memory with random, text-like, zero and repeated chunks, plus an optional partial last chunk."""
    rnd = random.Random(seed)
    parts = []
    for i in range(nchunks):
        kind = i % 4
        if kind == 0:
            parts.append(rnd.randbytes(chunk))                         # incompressible -> raw
        elif kind == 1:
            parts.append((b"guest text %d " % rnd.randrange(1 << 30) * chunk)[:chunk])  # compressible
        elif kind == 2:
            parts.append(bytes(chunk))                                  # zero
        else:
            parts.append(b"\xab" * chunk)                               # duplicate within the image
    parts.append(rnd.randbytes(tail))
    data = b"".join(parts)
    path.write_bytes(data)
    return data


def store_bytes(store_dir):
    packs = os.path.join(store_dir, "packs")
    return sum(os.path.getsize(os.path.join(packs, n)) for n in os.listdir(packs))


@pytest.mark.parametrize("codec", ["lz4", "zstd", "raw"])
@pytest.mark.parametrize("chunk", [4096, 65536, 2 << 20])
def test_every_chunk_round_trips(tmp_path, codec, chunk):
    mem = make_mem(tmp_path / "mem", 12 if chunk < (1 << 20) else 4, chunk, seed=chunk, tail=100)
    r = build_image(tmp_path / "mem", tmp_path / "store", tmp_path / "img", chunk_size=chunk, codec=codec)
    with BaseImage.open(tmp_path / "img") as img:
        assert (img.chunk_size, img.mem_size) == (chunk, len(mem))
        assert img.nchunks == r.nchunks == -(-len(mem) // chunk)
        assert b"".join(img.read_chunk(i) for i in range(img.nchunks)) == mem
        img.verify()
        used = {t.codec for t in img.chunk_table()}
        assert codecs.ZERO in used and codecs.RAW in used
        if codec != "raw":
            assert codecs.BY_NAME[codec] in used


def test_lz4_levels_and_hc_round_trip(tmp_path):
    mem = make_mem(tmp_path / "mem", 8)
    for level in (-4, 0, 9):
        build_image(tmp_path / "mem", tmp_path / f"s{level}", tmp_path / f"i{level}", chunk_size=CHUNK, level=level)
        img = BaseImage.open(tmp_path / f"i{level}")
        assert b"".join(img.read_chunk(i) for i in range(img.nchunks)) == mem


def test_chunk_table_points_at_plain_pack_bytes(tmp_path):
    mem = make_mem(tmp_path / "mem", 8, tail=10)
    build_image(tmp_path / "mem", tmp_path / "store", tmp_path / "img", chunk_size=CHUNK, codec="zstd")
    img = BaseImage.open(tmp_path / "img")
    for i, ref in enumerate(img.chunk_table()):
        raw_len = min(CHUNK, len(mem) - i * CHUNK)
        if ref.codec == codecs.ZERO:
            assert mem[i * CHUNK:i * CHUNK + raw_len] == bytes(raw_len)
            continue
        with open(ref.pack_path, "rb") as f:  # what the C page server does: open, seek, read, decode
            f.seek(ref.offset)
            stored = f.read(ref.stored_len)
        assert codecs.decode(ref.codec, stored, raw_len) == mem[i * CHUNK:i * CHUNK + raw_len]


def test_zero_chunks_take_no_space(tmp_path):
    (tmp_path / "mem").write_bytes(bytes(64 * CHUNK))
    r = build_image(tmp_path / "mem", tmp_path / "store", tmp_path / "img", chunk_size=CHUNK)
    assert (r.zero_chunks, r.new_chunks, r.new_stored_bytes) == (64, 0, 0)
    img = BaseImage.open(tmp_path / "img")
    assert img.stats().stored_bytes == 0 and img.stats().zero_fraction == 1.0
    assert img.read_chunk(5) == bytes(CHUNK)
    assert os.path.getsize(tmp_path / "img") < 64 * 64 + 1024  # index only: 64 bytes per chunk


def test_dedup_within_image(tmp_path):
    block = random.Random(1).randbytes(CHUNK)
    (tmp_path / "mem").write_bytes(block * 10)
    r = build_image(tmp_path / "mem", tmp_path / "store", tmp_path / "img", chunk_size=CHUNK)
    assert (r.new_chunks, r.dup_chunks) == (1, 9)
    s = BaseImage.open(tmp_path / "img").stats()
    assert s.unique_chunks == 1 and s.dup_fraction == pytest.approx(0.9)
    assert s.stored_bytes == CHUNK  # random: stored raw, once


def test_dedup_across_images_store_grows_only_by_new_chunks(tmp_path):
    rnd = random.Random(2)
    shared = [rnd.randbytes(CHUNK) for _ in range(8)]
    (tmp_path / "a").write_bytes(b"".join(shared))
    build_image(tmp_path / "a", tmp_path / "store", tmp_path / "a.img", chunk_size=CHUNK)
    before = store_bytes(tmp_path / "store")
    extra = rnd.randbytes(CHUNK)
    (tmp_path / "b").write_bytes(b"".join(shared[::-1]) + extra)
    r = build_image(tmp_path / "b", tmp_path / "store", tmp_path / "b.img", chunk_size=CHUNK, codec="zstd")
    assert (r.new_chunks, r.dup_chunks) == (1, 8)
    grown = store_bytes(tmp_path / "store") - before
    assert r.new_stored_bytes == CHUNK  # random chunk stored raw
    assert CHUNK <= grown <= CHUNK + 128  # plus one record header
    assert b"".join(BaseImage.open(tmp_path / "b.img").read_chunk(i) for i in range(9)) == \
        b"".join(shared[::-1]) + extra


def test_first_stored_encoding_wins(tmp_path):
    (tmp_path / "m").write_bytes(b"compressible " * (CHUNK // 13 + 1))
    (tmp_path / "m").write_bytes((tmp_path / "m").read_bytes()[:CHUNK])
    build_image(tmp_path / "m", tmp_path / "store", tmp_path / "lz4.img", chunk_size=CHUNK, codec="lz4")
    build_image(tmp_path / "m", tmp_path / "store", tmp_path / "zstd.img", chunk_size=CHUNK, codec="zstd")
    ref = BaseImage.open(tmp_path / "zstd.img").chunk_table()[0]
    assert ref.codec == codecs.LZ4
    assert BaseImage.open(tmp_path / "zstd.img").header.codec == codecs.ZSTD


def test_store_reopen_sees_chunks_and_concurrent_store_objects_agree(tmp_path):
    a = ChunkStore(tmp_path / "store")
    b = ChunkStore(tmp_path / "store")
    from snapd.image.chunkstore import NewChunk
    import xxhash
    c1 = NewChunk(b"\1" * 32, codecs.RAW, b"one", 3, xxhash.xxh3_64_intdigest(b"one"))
    c2 = NewChunk(b"\2" * 32, codecs.RAW, b"two", 3, xxhash.xxh3_64_intdigest(b"two"))
    where_a, added_a, _ = a.add([c1])
    where_b, added_b, _ = b.add([c1, c2])  # b must see a's chunk and not store it twice
    assert (added_a, added_b) == (1, 1)
    assert where_b[c1.hash] == where_a[c1.hash]
    assert len(ChunkStore(tmp_path / "store")) == 2


def test_torn_index_tail_is_cut_off(tmp_path):
    make_mem(tmp_path / "mem", 4)
    build_image(tmp_path / "mem", tmp_path / "store", tmp_path / "img", chunk_size=CHUNK)
    idx = tmp_path / "store" / "chunks.idx"
    good = idx.stat().st_size
    with open(idx, "ab") as f:
        f.write(b"\x99" * 100)  # a crashed writer's partial entry
    store = ChunkStore(tmp_path / "store")
    assert idx.stat().st_size == good and len(store) == 3


def test_build_progress_and_empty_memory(tmp_path):
    make_mem(tmp_path / "mem", 8)
    seen = []
    build_image(tmp_path / "mem", tmp_path / "store", tmp_path / "img", chunk_size=CHUNK,
                progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (8 * CHUNK, 8 * CHUNK) and len(seen) == 8
    (tmp_path / "empty").write_bytes(b"")
    build_image(tmp_path / "empty", tmp_path / "store", tmp_path / "e.img", chunk_size=CHUNK)
    assert BaseImage.open(tmp_path / "e.img").nchunks == 0


@pytest.mark.parametrize("bad", [1000, 3 << 20, 8192 + 4096])
def test_bad_chunk_size_refused(tmp_path, bad):
    make_mem(tmp_path / "mem", 1)
    with pytest.raises(ValueError, match="power of two"):
        build_image(tmp_path / "mem", tmp_path / "store", tmp_path / "img", chunk_size=bad)
