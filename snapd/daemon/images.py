"""The image registry: snapshots registered with the daemon, each turned into a compressed base image.

Layout under the state directory:
    images/ID.json   the record (below), written last and atomically: an image exists once its record does
    images/ID.state  a copy of the snapshot's state file (the caller may delete the original)
    images/ID.img    the base image index (docs/image-format.md)
    store/           the content-addressed chunk store shared by every image (equal chunks stored once)
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import time

from snapd.atomic import atomic_write
from snapd.image import DEFAULT_CHUNK_SIZE, ImageError, build_image
from snapd.image.codecs import CodecError
from vmm.prebuilt import VmShape
from vmm.snapshot import SnapshotError, open_memory_file, read_snapshot, refuse_diff


class ImageRegistrationError(ValueError):
    """The snapshot cannot be registered (missing or invalid files, a Diff snapshot, bad build options)."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    id: str
    state_path: str
    image_path: str
    vcpu_count: int
    mem_size_mib: int
    chunk_size: int
    codec: str
    source_state_path: str
    source_mem_path: str
    created: float

    @property
    def shape(self) -> VmShape:
        return VmShape(self.vcpu_count, self.mem_size_mib)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class ImageRegistry:
    def __init__(self, state_dir: str):
        self.dir = os.path.join(state_dir, "images")
        self.store = os.path.join(state_dir, "store")
        os.makedirs(self.dir, exist_ok=True)

    def load(self) -> list[ImageRecord]:
        """Every complete record (a build interrupted before its record was written left only leftovers)."""
        records = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".json") and not name.startswith("."):
                with open(os.path.join(self.dir, name)) as f:
                    records.append(ImageRecord(**json.load(f)))
        return records

    def register(self, state_path: str, mem_path: str, chunk_size: int | None = None,
                 codec: str = "lz4") -> ImageRecord:
        try:
            state = read_snapshot(state_path)
            refuse_diff(state, state_path)
            os.close(open_memory_file(mem_path, state))
        except SnapshotError as exc:
            raise ImageRegistrationError(str(exc)) from None
        image_id = "img-" + secrets.token_hex(6)
        base = os.path.join(self.dir, image_id)
        try:
            shutil.copyfile(state_path, base + ".state")
            build_image(mem_path, self.store, base + ".img", chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
                        codec=codec, source_id=state.snapshot_id)
        except (ValueError, CodecError, ImageError, OSError) as exc:
            self._remove_files(image_id)
            raise ImageRegistrationError(f"cannot build the base image of {mem_path}: {exc}") from None
        record = ImageRecord(image_id, base + ".state", base + ".img", state.config.vcpu_count,
                             state.config.mem_size_mib, chunk_size or DEFAULT_CHUNK_SIZE, codec,
                             os.path.abspath(state_path), os.path.abspath(mem_path), time.time())
        atomic_write(base + ".json", json.dumps(record.to_json(), indent=1).encode())
        return record

    def remove(self, record: ImageRecord) -> None:
        """Forget the image; its chunks stay in the shared store (other images may hold the same chunks)."""
        os.unlink(os.path.join(self.dir, record.id + ".json"))
        self._remove_files(record.id)

    def _remove_files(self, image_id: str) -> None:
        for suffix in (".state", ".img"):
            try:
                os.unlink(os.path.join(self.dir, image_id + suffix))
            except FileNotFoundError:
                pass
