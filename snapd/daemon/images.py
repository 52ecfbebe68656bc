"""The image registry: snapshots registered with the daemon, each turned into a compressed base image.

Layout under the state directory:
    images/ID.json   the record (below), written last and atomically: an image exists once its record does
    images/ID.state  a copy of the snapshot's state file (the caller may delete the original)
    images/ID.img    the base image index (docs/image-format.md)
    images/ID.img.loadset  the image's loading set, when it has one (snapd.loadset; docs/page-server.md)
    store/           the content-addressed chunk store shared by every image (equal chunks stored once)

Loading sets (REAP/FaaSnap before any restore): an image registered with a loading set, or given one later
(POST /v1/images/{id}/loading-set, a file or recorded from the clones' faults), has it pre-filled into its
shared memfd(s) in the background, first touch first: a clone then finds its working set in the page cache.
The set is kept beside the image, so a new shard or a restarted daemon pre-fills from it too
(PageServer.add_image reads ChunkTable.loading_set). The route functions at the end of this module are
called by snapd.daemon.http with the Daemon (duck-typed: its images, lock, register_image).
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import logging
import time

from snapd.atomic import atomic_write
from snapd.daemon.errors import BadRequest, Conflict, NotFound
from snapd.image import DEFAULT_CHUNK_SIZE, ImageError, build_image
from snapd.image.codecs import CodecError
from snapd.loadset import LoadingSet, LoadingSetError, default_path
from vmm.prebuilt import VmShape
from vmm.persist import MicrovmState
from vmm.snapshot import SnapshotError, check_memory_file, memory_file_size, read_snapshot_fd, refuse_diff


log = logging.getLogger("snapd")


class ImageRegistrationError(ValueError):
    """The snapshot cannot be registered (missing or invalid files, a Diff snapshot, bad build options)."""


@dataclasses.dataclass
class SnapshotSource:
    """A snapshot to register, opened once and checked: its state (parsed from ``state_bytes``, the state file as
    read, which the registry keeps a copy of) and a descriptor of its memory file, checked to be the state file's
    own (its identity trailer), exactly the layout's size plus that trailer."""
    state: MicrovmState
    state_bytes: bytes
    mem_fd: int
    state_name: str  # absolute names, for the record and messages
    mem_name: str

    @property
    def mem_size(self) -> int:
        return memory_file_size(self.state)

    def close(self) -> None:
        if self.mem_fd >= 0:
            os.close(self.mem_fd)
            self.mem_fd = -1


def open_snapshot(paths, state_path: str, mem_path: str, where: str = "images") -> SnapshotSource:
    """Open and check a snapshot at a caller's paths beneath the import roots (snapd.daemon.paths): the state file
    at most the format's size and valid, a Full snapshot; the memory file exactly the size its layout says plus
    its identity trailer, and that trailer the one the state file names (400 naming both files otherwise). Each
    file is opened once; the bytes read are the ones used. Raises an ApiError naming the field and the problem
    (never quoting the files' bytes)."""
    from snapd.snapfile import DEFAULT_MAX_SIZE, MEMORY_TRAILER_SIZE
    with paths.opened(state_path, f"{where}.state_path", DEFAULT_MAX_SIZE) as (state_fd, state_name):
        try:
            state, data = read_snapshot_fd(state_fd, state_path)
            refuse_diff(state, state_path)
        except SnapshotError as exc:
            raise BadRequest(f"{where}: {exc}") from None
    need = memory_file_size(state) + MEMORY_TRAILER_SIZE
    mem_fd, mem_name = paths.open_import(mem_path, f"{where}.mem_path", need)
    try:
        have = os.fstat(mem_fd).st_size
        if have != need:
            raise BadRequest(f"{where}.mem_path: memory file {mem_path!r} is {have} bytes; the memory layout of "
                             f"snapshot file {state_path!r} needs exactly {need} (with its "
                             f"{MEMORY_TRAILER_SIZE}-byte identity trailer)")
        try:
            check_memory_file(mem_fd, state, repr(state_path), repr(mem_path))
        except SnapshotError as exc:
            raise BadRequest(f"{where}.mem_path: {exc}") from None
    except BaseException:
        os.close(mem_fd)
        raise
    return SnapshotSource(state, data, mem_fd, state_name, mem_name)


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
        """Every complete record (a build interrupted before its record was written left only leftovers). A
        record that cannot be read is reported and skipped: one damaged file must not keep the daemon down. So is
        an image whose state file this version cannot read (format 1, registered by an older daemon, does not
        name its memory's identity: docs/snapshot-format.md); its snapshot must be registered again."""
        from snapd.snapfile import SnapshotFormatError, read_state_file
        records = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".json") and not name.startswith("."):
                path = os.path.join(self.dir, name)
                try:
                    with open(path) as f:
                        record = ImageRecord(**json.load(f))
                except (OSError, ValueError, TypeError) as exc:
                    log.error("image record %s is skipped: it cannot be read (%s: %s)", path, type(exc).__name__, exc)
                    continue
                try:
                    read_state_file(record.state_path)
                except (OSError, SnapshotFormatError) as exc:
                    log.error("image %s is not served: its state file cannot be used: %s", record.id, exc)
                    continue
                records.append(record)
        self._remove_leftovers({r.id for r in records} | self._recorded())
        return records

    def _recorded(self) -> set[str]:
        return {name[:-len(".json")] for name in os.listdir(self.dir) if name.endswith(".json")}

    def _remove_leftovers(self, keep: set[str]) -> None:
        """Files of a registration killed before its record was written (and atomic_write's temporaries): no
        record names them, nothing will. A record that exists but is not served keeps its files."""
        for name in os.listdir(self.dir):
            if name.split(".", 1)[0] in keep and not name.startswith("."):
                continue
            log.info("removing %s: a leftover of an interrupted image registration", name)
            try:
                os.unlink(os.path.join(self.dir, name))
            except OSError:
                pass

    def register(self, source: SnapshotSource, chunk_size: int | None = None, codec: str = "lz4") -> ImageRecord:
        """Copy the state file (the bytes read) and build the base image from the open memory file."""
        state = source.state
        image_id = "img-" + secrets.token_hex(6)
        base = os.path.join(self.dir, image_id)
        try:
            atomic_write(base + ".state", source.state_bytes)
            build_image(source.mem_fd, self.store, base + ".img", chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
                        codec=codec, source_id=state.snapshot_id, mem_size=source.mem_size)
        except (ValueError, CodecError, ImageError, OSError) as exc:
            self._remove_files(image_id)
            raise ImageRegistrationError(f"cannot build the base image of {source.mem_name}: {exc}") from None
        record = ImageRecord(image_id, base + ".state", base + ".img", state.config.vcpu_count,
                             state.config.mem_size_mib, chunk_size or DEFAULT_CHUNK_SIZE, codec,
                             source.state_name, source.mem_name, time.time())
        atomic_write(base + ".json", json.dumps(record.to_json(), indent=1).encode())
        return record

    def remove(self, record: ImageRecord) -> None:
        """Forget the image; its chunks stay in the shared store (other images may hold the same chunks)."""
        os.unlink(os.path.join(self.dir, record.id + ".json"))
        self._remove_files(record.id)

    def _remove_files(self, image_id: str) -> None:
        for suffix in (".state", ".img", ".img.loadset"):
            try:
                os.unlink(os.path.join(self.dir, image_id + suffix))
            except FileNotFoundError:
                pass


# -- loading sets and pre-fill (routes: POST /v1/images, GET|POST /v1/images/{image_id}/loading-set) ----------

def _runtime(daemon, image_id: str):
    runtime = daemon.images.get(image_id)
    if runtime is None or runtime.deleting:
        raise NotFound(f"no image {image_id!r} (GET /v1/images lists them)")
    return runtime


def _shard_images(daemon, runtime) -> list:
    with daemon.lock:
        return [shard.image for shard in runtime.shards]


def loading_set_json(daemon, image_id: str, error: str = "") -> dict:
    """The image's loading set and the pre-fill progress of each of its shards' memfds."""
    runtime = _runtime(daemon, image_id)
    path = default_path(runtime.record.image_path)
    chunks = nbytes = 0
    if os.path.exists(path):
        try:
            ls = LoadingSet.load(path)
            chunks, nbytes = len(ls.chunks), ls.bytes_covered()
        except LoadingSetError as exc:
            error = error or str(exc)
    else:
        path = ""
    prefill = []
    for image in _shard_images(daemon, runtime):
        st = image.prefill_stats()
        prefill.append({"running": st.running, "total": st.total, "done": st.done, "filled": st.filled,
                        "skipped": st.skipped, "errors": st.errors, "bytes": st.bytes, "ms": round(st.ns / 1e6, 3),
                        "present_chunks": st.present_chunks, "error": st.error})
    return {"image": image_id, "path": path, "chunks": chunks, "bytes": nbytes, "error": error, "prefill": prefill}


def _install(daemon, runtime, ls: LoadingSet) -> None:
    """Check ls against the image, keep it beside the image, and pre-fill every shard (background)."""
    images = _shard_images(daemon, runtime)
    for image in images:
        ls.check_image(image)  # LoadingSetError: nothing changed
    path = default_path(runtime.record.image_path)
    LoadingSet(ls.identity, ls.chunk_size, ls.mem_size, ls.chunks).save(path)
    runtime.table.loading_set = path  # shards made later pre-fill from it (PageServer.add_image)
    for image in images:
        image.prefill(path)


def _read_loading_set(daemon, path: str, field: str, mem_size: int, chunk_size: int) -> LoadingSet:
    """A caller's loading-set file beneath the import roots, bounded by the largest set an image of that geometry
    can have, read once from its descriptor."""
    with daemon.paths.opened(path, field) as (fd, _):
        try:
            return LoadingSet.read_fd(fd, path, LoadingSet.max_file_size(mem_size, chunk_size))
        except LoadingSetError as exc:
            raise BadRequest(f"{field}: {exc}") from None


def register_image(daemon, body: dict) -> dict:
    """POST /v1/images: the snapshot's files opened beneath the import roots and checked, then, with
    "loading_set", that file read (an unreadable one is refused, 400, before anything is built); then
    Daemon.register_snapshot builds the image and its pre-fill starts in the background (the reply does not wait
    for it). A set recorded on another image is refused in the reply's loading_set.error and the image is served
    by plain lazy paging."""
    source = open_snapshot(daemon.paths, body["state_path"], body["mem_path"])
    try:
        chunk_size = body.get("chunk_size", daemon.default_chunk_size())
        ls = None
        if "loading_set" in body:
            ls = _read_loading_set(daemon, body["loading_set"], "images.loading_set", source.mem_size,
                                   chunk_size or DEFAULT_CHUNK_SIZE)
        reply = daemon.register_snapshot(source, chunk_size, body.get("codec", "lz4"))
    finally:
        source.close()
    if ls is not None:
        error = ""
        try:
            _install(daemon, _runtime(daemon, reply["id"]), ls)
        except LoadingSetError as exc:
            error = f"{exc}; image {reply['id']} is served by plain lazy paging, without pre-fill"
            log.warning("%s", error)
        reply["loading_set"] = loading_set_json(daemon, reply["id"], error)
    return reply


def get_loading_set(daemon, image_id: str) -> dict:
    """GET /v1/images/{image_id}/loading-set"""
    return loading_set_json(daemon, image_id)


def set_loading_set(daemon, body: dict, image_id: str) -> dict:
    """POST /v1/images/{image_id}/loading-set: {"path": FILE} uses that loading set; {} records one from the
    image's first shared memfd (every chunk its clones faulted in, first fill first: after one clone's first
    reply, that clone's working set). Either way it is kept beside the image and pre-filled into every shard."""
    runtime = _runtime(daemon, image_id)
    if "path" in body:
        table = runtime.table
        ls = _read_loading_set(daemon, body["path"], "loading_set.path", table.mem_size, table.chunk_size)
        try:
            _install(daemon, runtime, ls)
        except LoadingSetError as exc:
            raise BadRequest(f"loading_set: {exc}; image {image_id} is unchanged") from None
        return loading_set_json(daemon, image_id)
    images = _shard_images(daemon, runtime)
    ls = images[0].recorded_loading_set() if images else None
    if ls is None or not ls.chunks:
        raise Conflict(f"loading_set: nothing to record: no clone of image {image_id} has faulted memory in yet "
                       "(create one with a payload first, then record)")
    _install(daemon, runtime, ls)
    return loading_set_json(daemon, image_id)
