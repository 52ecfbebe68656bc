import os
import random

import pytest

from snapd.image import (BaseImage, ChunkCorrupt, ChunkOutOfBounds, ImageFormatError, IndexTruncated,
                         PackMissing, build_image)
from snapd.image import codecs

CHUNK = 4096


@pytest.fixture
def image(tmp_path):
    rnd = random.Random(7)
    data = b"".join([rnd.randbytes(CHUNK), bytes(CHUNK), (b"abc" * CHUNK)[:CHUNK], rnd.randbytes(CHUNK)])
    (tmp_path / "mem").write_bytes(data)
    build_image(tmp_path / "mem", tmp_path / "store", tmp_path / "img", chunk_size=CHUNK)
    return tmp_path / "img"


def ref(image, i):
    return BaseImage.open(image).chunk_table()[i]


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("chunk", [0, 2])  # a raw chunk and an lz4 chunk
def test_flipped_stored_byte_is_chunk_corrupt(image, chunk):
    r = ref(image, chunk)
    flip_byte(r.pack_path, r.offset + r.stored_len // 2)
    img = BaseImage.open(image)
    with pytest.raises(ChunkCorrupt, match=rf"{image}: chunk {chunk}: checksum mismatch") as exc:
        img.read_chunk(chunk)
    assert exc.value.chunk == chunk
    assert img.read_chunk(3)  # other chunks stay readable
    with pytest.raises(ChunkCorrupt):
        img.verify()


def test_pack_truncated_is_out_of_bounds(image):
    r = ref(image, 3)
    os.truncate(r.pack_path, r.offset + 10)
    with pytest.raises(ChunkOutOfBounds, match=r"chunk 3: points at bytes .* which has"):
        BaseImage.open(image).read_chunk(3)


def test_missing_pack(image):
    os.unlink(ref(image, 0).pack_path)
    img = BaseImage.open(image)
    assert img.read_chunk(1) == bytes(CHUNK)  # zero chunks need no pack
    with pytest.raises(PackMissing, match=r"chunk 0: pack .* is missing"):
        img.read_chunk(0)


def test_index_checksum(image):
    flip_byte(image, os.path.getsize(image) - 40)  # inside the last entry
    with pytest.raises(ImageFormatError, match="index checksum mismatch"):
        BaseImage.open(image)


@pytest.mark.parametrize("keep", [0, 10, 80, 200, -1])
def test_truncated_index(image, keep):
    data = image.read_bytes()
    image.write_bytes(data[:keep if keep >= 0 else len(data) - 1])
    with pytest.raises(IndexTruncated, match=str(image)):
        BaseImage.open(image)


def test_bad_magic_and_trailing_data(image, tmp_path):
    data = image.read_bytes()
    (tmp_path / "m").write_bytes(b"X" + data[1:])
    with pytest.raises(ImageFormatError, match="not an image index"):
        BaseImage.open(tmp_path / "m")
    (tmp_path / "t").write_bytes(data + b"\0")
    with pytest.raises(ImageFormatError, match="trailing"):
        BaseImage.open(tmp_path / "t")


def test_every_index_bit_flip_is_detected(image):
    data = image.read_bytes()
    rnd = random.Random(3)
    for bit in rnd.sample(range(8 * len(data)), 200):
        bad = bytearray(data)
        bad[bit // 8] ^= 1 << (bit % 8)
        image.write_bytes(bytes(bad))
        with pytest.raises(ImageFormatError):
            BaseImage.open(image)


def test_index_pointing_elsewhere_with_valid_checksums_fails_content_hash(image):
    # A consistent but wrong index (e.g. writer bug): the stored checksum passes, the content hash does not.
    from snapd.image.index import decode_index, encode_index, Entry, ENTRY
    hdr, entries = decode_index(image.read_bytes(), str(image))
    es = [Entry._make(e) for e in ENTRY.iter_unpack(entries)]
    es[0], es[3] = es[0]._replace(hash=es[3].hash), es[3]._replace(hash=es[0].hash)
    image.write_bytes(encode_index(hdr, es))
    img = BaseImage.open(image)
    img.read_chunk(0)  # stored checksum alone cannot tell
    with pytest.raises(ChunkCorrupt, match="chunk 0: content does not match"):
        img.verify()


def test_corrupt_compressed_stream_with_matching_checksum(tmp_path):
    import xxhash
    from snapd.image.index import ENTRY, Entry, decode_index, encode_index
    (tmp_path / "mem").write_bytes((b"abc" * CHUNK)[:CHUNK])
    build_image(tmp_path / "mem", tmp_path / "store", tmp_path / "img", chunk_size=CHUNK, codec="zstd")
    img_path = tmp_path / "img"
    r = ref(img_path, 0)
    assert r.codec == codecs.ZSTD
    with open(r.pack_path, "r+b") as f:  # garbage with a recomputed checksum: decode must fail cleanly
        f.seek(r.offset)
        f.write(b"\xff" * r.stored_len)
    hdr, entries = decode_index(img_path.read_bytes(), str(img_path))
    e = Entry._make(ENTRY.unpack_from(entries))._replace(checksum=xxhash.xxh3_64_intdigest(b"\xff" * r.stored_len))
    img_path.write_bytes(encode_index(hdr, [e]))
    with pytest.raises(ChunkCorrupt, match="chunk 0: zstd data does not decompress"):
        BaseImage.open(img_path).read_chunk(0)
