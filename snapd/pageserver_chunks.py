"""The chunk table: what the page server is told about an image (chunk size, memory size, where each chunk is).

A ``ChunkTable`` is read from a base image or diff layer (snapd.image) or from JSON, and names the image's
content id and the loading set kept beside it. ``ChunkRef`` describes one chunk; the ``CODEC_*`` constants are
the C page server's codec numbers for it. snapd.pageserver re-exports these names.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from snapd.image.reader import ChunkRef  # one chunk as BaseImage.chunk_table() describes it
from snapd.loadset import default_path
from snapd.uffd import lib

__all__ = ["CODEC_LZ4", "CODEC_RAW", "CODEC_ZERO", "CODEC_ZSTD", "ChunkRef", "ChunkTable"]

CODEC_ZERO, CODEC_RAW, CODEC_LZ4, CODEC_ZSTD = (lib.SNAPD_CODEC_ZERO, lib.SNAPD_CODEC_RAW,
                                                lib.SNAPD_CODEC_LZ4, lib.SNAPD_CODEC_ZSTD)


@dataclass
class ChunkTable:
    name: str
    chunk_size: int
    mem_size: int
    chunks: list[ChunkRef]
    identity: bytes = b""  # the image's content id: loading sets recorded on it carry it (b"": unknown)
    # The loading set kept beside the image (IMAGE.loadset) when there is one: add_image(shared=True)
    # pre-fills the image's memfd from it. "" for none.
    loading_set: str = ""

    @classmethod
    def from_base_image(cls, path: str, store: str | None = None) -> "ChunkTable":
        """A base image or a diff layer; a layer's table is the composition of its chain (top wins)."""
        from snapd.image.reader import BaseImage
        img = BaseImage.open(path, store)
        try:
            ls = default_path(path)
            return cls(os.path.basename(path), img.chunk_size, img.mem_size,
                       [ChunkRef(*c) for c in img.chunk_table()], img.header.content_id,
                       ls if os.path.exists(ls) else "")
        finally:
            img.close()

    def to_json(self) -> dict:
        return {"name": self.name, "chunk_size": self.chunk_size, "mem_size": self.mem_size,
                "chunks": [list(c) for c in self.chunks], "identity": self.identity.hex(),
                "loading_set": self.loading_set}

    @classmethod
    def from_json(cls, d: dict) -> "ChunkTable":
        return cls(d["name"], d["chunk_size"], d["mem_size"], [ChunkRef(*c) for c in d["chunks"]],
                   bytes.fromhex(d.get("identity", "")), d.get("loading_set", ""))
