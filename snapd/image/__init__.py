"""Compressed, content-addressed base images (layout: docs/image-format.md)."""
from snapd.image.builder import DEFAULT_CHUNK_SIZE, DEFAULT_CODEC, BuildResult, build_image
from snapd.image.chunkstore import ChunkStore
from snapd.image.errors import (ChunkCorrupt, ChunkOutOfBounds, ImageError, ImageFormatError,
                                IndexTruncated, PackMissing, StoreCorrupt)
from snapd.image.reader import BaseImage, ChunkRef, ImageStats

__all__ = ["build_image", "BuildResult", "DEFAULT_CHUNK_SIZE", "DEFAULT_CODEC", "ChunkStore",
           "BaseImage", "ChunkRef", "ImageStats", "ImageError", "ImageFormatError", "IndexTruncated",
           "ChunkCorrupt", "ChunkOutOfBounds", "PackMissing", "StoreCorrupt"]
