"""The daemon's image methods: register, list, get and delete images, and bring one into service.

A mixin of ``Daemon`` (snapd.daemon.core), which holds the state these methods use (``images``, ``lock``,
``registry``, ``pool``, ``zygote``, ``config``, ``run_dir``). Bringing an image into service (``_activate``)
starts its first page-server shard, has the zygote and idle workers preload its state, and tells the pool to
keep workers of its shape (and prepared ones for it).
"""
from __future__ import annotations

from snapd.daemon.errors import BadRequest, Conflict, NotFound
from snapd.daemon.images import ImageRecord, ImageRegistrationError, SnapshotSource, open_snapshot
from snapd.daemon.shards import ImageRuntime
from snapd.pageserver_image import HUGE_PAGE


class ImageOps:
    """The image methods of ``Daemon`` (a mixin: the state is the daemon's)."""

    def _activate(self, record: ImageRecord) -> ImageRuntime:
        runtime = ImageRuntime(record, self.run_dir, self.config.huge_dir)
        runtime.shard_for_new_clone()  # the page server and memfd exist before the first restore needs them
        with self.lock:
            self.images[record.id] = runtime
        self.zygote.preload(record.id, record.state_path)
        for worker in self.pool.idle_workers():
            if worker.shape == record.shape:
                worker.send_quietly({"op": "preload", "image": record.id}, fds=[runtime.state_fd])
        self.pool.add_shape(record.shape)
        self.pool.add_image(record.id, record.shape)
        return runtime

    def register_image(self, body: dict) -> dict:
        """Register the snapshot at the body's paths (beneath the import roots: snapd.daemon.paths)."""
        source = open_snapshot(self.paths, body["state_path"], body["mem_path"])
        try:
            return self.register_snapshot(source, body.get("chunk_size", self.default_chunk_size()),
                                          body.get("codec", "lz4"))
        finally:
            source.close()

    def register_snapshot(self, source: SnapshotSource, chunk_size: int | None, codec: str) -> dict:
        """Build the base image of an opened, checked snapshot and bring it into service."""
        try:
            record = self.registry.register(source, chunk_size, codec)
        except ImageRegistrationError as exc:
            raise BadRequest(f"images: {exc}") from None
        self._activate(record)
        return self._image_json(self.images[record.id])

    def default_chunk_size(self) -> int | None:
        """With huge pages, images are built of whole 2 MiB pages (the only ones that can live on them)."""
        return self.config.chunk_size or (HUGE_PAGE if self.config.huge_dir else None)

    def _image_json(self, runtime: ImageRuntime) -> dict:
        r = runtime.record
        return {"id": r.id, "vcpu_count": r.vcpu_count, "mem_size_mib": r.mem_size_mib, "chunk_size": r.chunk_size,
                "codec": r.codec, "clones": runtime.clones, "state_path": r.state_path, "image_path": r.image_path,
                "shared_bytes": sum(s.memfd_bytes() for s in runtime.shards), "created": r.created,
                "huge_pages": runtime.huge_pages(), "huge_pages_refused": runtime.huge_refused()}

    def list_images(self) -> dict:
        with self.lock:
            runtimes = list(self.images.values())
        return {"images": [self._image_json(r) for r in runtimes]}

    def get_image(self, image_id: str) -> dict:
        return self._image_json(self._image(image_id))

    def _image(self, image_id: str) -> ImageRuntime:
        runtime = self.images.get(image_id)
        if runtime is None or runtime.deleting:
            raise NotFound(f"no image {image_id!r} (GET /v1/images lists them)")
        return runtime

    def delete_image(self, image_id: str) -> None:
        with self.lock:
            runtime = self._image(image_id)
            in_flight = self.lane.close_image(image_id)  # the lane takes none of its workers from now on
            if runtime.clones or in_flight:
                self.lane.reopen_image(image_id)
                raise Conflict(f"image {image_id} is used by {runtime.clones + in_flight} clone(s): delete them first")
            runtime.deleting = True
            del self.images[image_id]
        self.pool.remove_image(image_id)
        self.pool.remove_shape(runtime.record.shape)
        self.zygote.forget(image_id)
        runtime.close()
        self.registry.remove(runtime.record)
