"""Typed errors for base images and the chunk store; each names the image (or store) and chunk."""
from __future__ import annotations


class ImageError(Exception):
    def __init__(self, where: str, message: str, chunk: int | None = None):
        self.where = str(where)
        self.chunk = chunk
        self.detail = message
        at = f" chunk {chunk}:" if chunk is not None else ""
        super().__init__(f"{self.where}:{at} {message}")


class ImageFormatError(ImageError):
    """The index file is not a readable image index (magic, version, layout, whole-index checksum)."""


class IndexTruncated(ImageFormatError):
    pass


class ChunkCorrupt(ImageError):
    """Stored bytes fail their checksum, do not decompress, or do not hash to the content hash."""


class ChunkOutOfBounds(ImageError):
    """The index points past the end of a pack file (pack truncated or index wrong)."""


class PackMissing(ImageError):
    """A pack file the index refers to does not exist."""


class StoreCorrupt(ImageError):
    """The chunk store's own hash index or pack headers are damaged."""


class LayerParentMissing(ImageError):
    """A diff layer's parent image (base) is not where the layer says it is."""


class LayerParentMismatch(ImageError):
    """A diff layer's parent image is not the one it was built on (content id or geometry differs)."""
