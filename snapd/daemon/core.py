"""The daemon's core: images, their page servers and shared memfds, the warm pool, clones, metrics.

No HTTP here (snapd.daemon.http routes requests to these methods); every method takes validated JSON and returns
a JSON-ready dict, or raises an ApiError naming the problem.
"""
from __future__ import annotations

import base64
import dataclasses
import logging
import os
import secrets
import select
import threading
import time

from snapd.daemon import metrics
from snapd.daemon.errors import BadRequest, CloneFailed, Conflict, GuestTimeout, NotFound, Unavailable
from snapd.daemon.images import ImageRecord, ImageRegistrationError, ImageRegistry
from snapd.daemon.records import ProcessRecords
from snapd.pageserver import ChunkTable, Image, Listener, PageServer
from snapd.pool.pool import PoolError, WarmPool, WorkerError, WorkerFailed, WorkerHandle, Zygote
from snapd.uffd import lib as uffd_lib
from vmm.api.fields import decode_base64

log = logging.getLogger("snapd")
# The C page server serves at most SNAPD_MAX_VMS VMs per instance; an image gets another shard (another
# server and memfd) beyond that. Some slots stay spare: a deleted clone's slot is freed when its VMM is gone.
VMS_PER_SHARD = uffd_lib.SNAPD_MAX_VMS - 16


@dataclasses.dataclass
class DaemonConfig:
    state_dir: str
    pool_size: int = 2             # ready workers kept per VM shape
    max_spawning: int = 4          # worker forks in flight at once
    max_clones: int = 1024         # live clones, all images
    max_count: int = 64            # clones per POST /v1/clones
    restore_timeout: float = 30.0  # waiting for a warm worker plus its restore
    prepared: int | None = None    # workers kept restored ahead per image (None: pool_size)
    reuse_workers: bool | None = None  # a deleted clone's worker is prepared again for its image (None: on,
                                       # unless SNAPD_REUSE=0); needs prepared > 0
    chunk_size: int | None = None  # base image chunk size (default: snapd.image's)


class Shard:
    """One page server (its own C fault loop) and its copy of the image in one memfd."""

    def __init__(self, record: ImageRecord, table: ChunkTable, sock_path: str):
        self.server = PageServer().start()
        try:
            self.image: Image = self.server.add_image(table, shared=True)
            self.listener: Listener = self.server.serve(sock_path, self.image, "lazy")
        except BaseException:
            self.server.close()
            raise
        self.sock_path = sock_path
        self.clones = 0

    def memfd_bytes(self) -> int:
        return os.fstat(self.image.memfd).st_blocks * 512

    def faults(self) -> dict[str, int]:
        totals = {"faults": 0, "shared_fills": 0, "shared_wakes": 0, "errors": 0}
        for vm_id in range(uffd_lib.SNAPD_MAX_VMS):
            try:
                stats = self.server.stats(vm_id)
            except Exception:
                continue
            if stats.state != "free":
                for key in totals:
                    totals[key] += getattr(stats, key)
        return totals

    def close(self) -> None:
        self.server.close()


class ImageRuntime:
    def __init__(self, record: ImageRecord, run_dir: str):
        self.record = record
        self.table = ChunkTable.from_base_image(record.image_path)
        self.run_dir = run_dir
        self.shards: list[Shard] = []
        self.clones = 0
        self.deleting = False

    def shard_for_new_clone(self) -> Shard:
        """Called with the daemon lock held."""
        for shard in self.shards:
            if shard.clones < VMS_PER_SHARD:
                return shard
        sock = os.path.join(self.run_dir, f"ps-{self.record.id}-{len(self.shards)}.sock")
        shard = Shard(self.record, self.table, sock)
        self.shards.append(shard)
        return shard

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
        self.shards.clear()


@dataclasses.dataclass
class Clone:
    id: str
    image: ImageRuntime
    shard: Shard
    worker: WorkerHandle
    created: float
    restore_us: float
    timings: dict
    regions: list = dataclasses.field(default_factory=list)  # [guest_phys_addr, size, host_addr] in the worker
    state: str = "running"  # running | failed
    error: str = ""

    def to_json(self, socket_path: str) -> dict:
        return {"id": self.id, "image": self.image.record.id, "state": self.state, "error": self.error,
                "pid": self.worker.pid, "created": self.created, "restore_us": round(self.restore_us, 1),
                "timings_us": {k: round(v, 1) for k, v in self.timings.items()},
                "endpoints": {"socket": socket_path, "invoke": f"/v1/clones/{self.id}/invoke",
                              "snapshot": f"/v1/clones/{self.id}/snapshot"}}


class Daemon:
    def __init__(self, config: DaemonConfig, socket_path: str = ""):
        self.config = config
        self.socket_path = socket_path
        self.state_dir = os.path.abspath(config.state_dir)
        self.run_dir = os.path.join(self.state_dir, "run")
        os.makedirs(self.run_dir, exist_ok=True)
        os.makedirs(os.path.join(self.state_dir, "snapshots"), exist_ok=True)
        self.lock = threading.Lock()
        self.records = ProcessRecords(self.run_dir)
        self.stale_stopped = self.records.stop_leftovers()
        if self.stale_stopped:
            log.warning("stopped %d VMM process(es) left by the previous daemon: their page server is gone",
                        len(self.stale_stopped))
        for name in os.listdir(self.run_dir):  # page-server sockets of the previous daemon
            if name.endswith(".sock"):
                os.unlink(os.path.join(self.run_dir, name))
        self.registry = ImageRegistry(self.state_dir)
        self.images: dict[str, ImageRuntime] = {}
        self.clones: dict[str, Clone] = {}
        self.deleted: set[str] = set()
        self.latency = metrics.Histogram()
        self.counters = {"restores": 0, "restore_failures": 0, "clones_failed": 0}
        self.zygote = Zygote()
        self.records.add(self.zygote.pid, self.zygote.start_time, "zygote")
        prepared = config.prepared
        if prepared is None:  # SNAPD_PREPARED: an operator's (and bench/clones.py's) override without a flag
            prepared = int(os.environ.get("SNAPD_PREPARED", config.pool_size))
        reuse = config.reuse_workers
        if reuse is None:
            reuse = os.environ.get("SNAPD_REUSE", "1") != "0"
        self.reuse_workers = bool(reuse) and prepared > 0
        self.pool = WarmPool(self.zygote, config.pool_size, config.max_spawning, on_ready=self._worker_ready,
                             on_gone=self._worker_gone, prepare=self._prepare_worker, prepared_target=prepared)
        self.epoll = select.epoll()
        self.watched: dict[int, Clone] = {}
        self.closed = False
        for record in self.registry.load():
            self._activate(record)
        self.monitor = threading.Thread(target=self._monitor, name="snapd-monitor", daemon=True)
        self.monitor.start()

    # -- worker bookkeeping
    def _worker_ready(self, worker: WorkerHandle) -> None:
        self.records.add(worker.pid, worker.start_time, "worker")
        for runtime in list(self.images.values()):  # images registered after this worker's fork
            if runtime.record.shape == worker.shape:
                worker.send_quietly({"op": "preload", "image": runtime.record.id,
                                     "state_path": runtime.record.state_path})

    def _worker_gone(self, worker: WorkerHandle) -> None:
        if worker.pid:
            self.records.remove(worker.pid)
        with self.lock:
            shard, worker.shard = worker.shard, None
            if shard is not None:  # a prepared worker that never became a clone: its page-server slot is free
                shard.clones -= 1

    def _prepare_worker(self, worker: WorkerHandle, image_id: str) -> bool:
        """Restore ``image_id`` into an idle worker ahead of any request (the pool's refill thread calls this):
        it registers with a shard's page server now, so that shard's slot is counted from now on."""
        with self.lock:
            runtime = self.images.get(image_id)
            if runtime is None or runtime.deleting or self.closed:
                return False
            shard = runtime.shard_for_new_clone()
            shard.clones += 1
            worker.shard = shard
        try:
            worker.request({"op": "prepare", "image": image_id, "state_path": runtime.record.state_path,
                            "page_server": shard.sock_path, "timeout": 10.0}, b"", [shard.image.memfd], timeout=30.0)
        except (WorkerFailed, WorkerError) as exc:
            log.warning("could not prepare a worker for %s: %s", image_id, exc)
            return False  # the pool retires it (which frees the shard slot)
        worker.image = image_id
        return True

    def _monitor(self) -> None:
        """Notices a clone's worker dying (its channel hung up) and marks the clone failed."""
        while not self.closed:
            try:
                events = self.epoll.poll(0.5)
            except (OSError, ValueError):
                return
            for fd, _ in events:
                with self.lock:
                    clone = self.watched.pop(fd, None)
                    if clone is not None:
                        try:
                            self.epoll.unregister(fd)
                        except (OSError, ValueError):
                            pass
                if clone is not None and clone.state == "running":
                    clone.worker.poll_events()
                    self._mark_failed(clone, clone.worker.failure or "the clone's VMM process exited")

    def _mark_failed(self, clone: Clone, error: str) -> None:
        if clone.state != "failed":
            clone.state, clone.error = "failed", error
            self.counters["clones_failed"] += 1
            log.warning("clone %s failed: %s", clone.id, error)

    # -- images
    def _activate(self, record: ImageRecord) -> ImageRuntime:
        runtime = ImageRuntime(record, self.run_dir)
        runtime.shard_for_new_clone()  # the page server and memfd exist before the first restore needs them
        with self.lock:
            self.images[record.id] = runtime
        self.zygote.preload(record.id, record.state_path)
        for worker in self.pool.idle_workers():
            if worker.shape == record.shape:
                worker.send_quietly({"op": "preload", "image": record.id, "state_path": record.state_path})
        self.pool.add_shape(record.shape)
        self.pool.add_image(record.id, record.shape)
        return runtime

    def register_image(self, body: dict) -> dict:
        try:
            record = self.registry.register(body["state_path"], body["mem_path"],
                                            body.get("chunk_size", self.config.chunk_size), body.get("codec", "lz4"))
        except ImageRegistrationError as exc:
            raise BadRequest(f"images: {exc}") from None
        self._activate(record)
        return self._image_json(self.images[record.id])

    def _image_json(self, runtime: ImageRuntime) -> dict:
        r = runtime.record
        return {"id": r.id, "vcpu_count": r.vcpu_count, "mem_size_mib": r.mem_size_mib, "chunk_size": r.chunk_size,
                "codec": r.codec, "clones": runtime.clones, "state_path": r.state_path, "image_path": r.image_path,
                "shared_bytes": sum(s.memfd_bytes() for s in runtime.shards), "created": r.created}

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
            if runtime.clones:
                raise Conflict(f"image {image_id} is used by {runtime.clones} clone(s): delete them first")
            runtime.deleting = True
            del self.images[image_id]
        self.pool.remove_image(image_id)
        self.pool.remove_shape(runtime.record.shape)
        self.zygote.forget(image_id)
        runtime.close()
        self.registry.remove(runtime.record)

    # -- clones
    def create_clones(self, body: dict) -> dict:
        count = body.get("count", 1)
        if count > self.config.max_count:
            raise BadRequest(f"clones.count {count} is above this daemon's limit of {self.config.max_count} "
                             "per request")
        payload = decode_base64(body["payload"], "clones.payload") if "payload" in body else None
        timeout = body.get("timeout_ms", 10_000) / 1e3
        image_id = body["image"]
        created = []
        self.pool.restore_started()
        try:
            for _ in range(count):
                created.append(self._restore_one(image_id, payload, timeout))
        except BaseException:
            self.pool.restore_finished()
            for clone_json in created:  # all or nothing: a scheduler asked for `count` clones
                self.delete_clone(clone_json["id"])
            raise
        self.pool.restore_finished()
        return {"clones": created}

    def _restore_one(self, image_id: str, payload: bytes | None, invoke_timeout: float) -> dict:
        t0 = time.perf_counter()
        with self.lock:
            runtime = self._image(image_id)
            if len(self.clones) >= self.config.max_clones:
                raise Conflict(f"the daemon runs {len(self.clones)} clones, its limit (max_clones) "
                               f"is {self.config.max_clones}")
            runtime.clones += 1
            clone_id = "c-" + secrets.token_hex(6)
            self.clones[clone_id] = None  # reserves the slot against the limit
        deadline = time.monotonic() + self.config.restore_timeout
        try:
            for attempt in range(3):  # an idle worker may have died since it was ready: take another
                try:
                    worker = self.pool.take(runtime.record.shape, max(0.0, deadline - time.monotonic()), image_id)
                except PoolError as exc:
                    raise Unavailable(f"clones: {exc}") from None
                if worker.image == image_id:  # prepared: memory mapped, page server attached, state written
                    header = {"op": "restore", "prepared": True, "image": image_id, "invoke": payload is not None,
                              "timeout": invoke_timeout}
                    fds = ()
                else:
                    with self.lock:
                        shard = runtime.shard_for_new_clone()
                        shard.clones += 1
                        worker.shard = shard
                    header = {"op": "restore", "image": image_id, "state_path": runtime.record.state_path,
                              "page_server": shard.sock_path, "invoke": payload is not None,
                              "timeout": invoke_timeout}
                    fds = (shard.image.memfd,)
                try:
                    reply, result = worker.request(header, payload or b"", fds,
                                                   timeout=max(1.0, deadline - time.monotonic()) + invoke_timeout)
                    break
                except WorkerFailed as exc:
                    self._retire(worker)  # frees its shard slot
                    if attempt == 2 or time.monotonic() > deadline:
                        raise CloneFailed(f"clones: restore of {image_id} failed: {exc}") from None
                except WorkerError as exc:
                    self._retire(worker)
                    if exc.kind == "timeout":
                        raise GuestTimeout(f"clones: the restored guest did not answer the first invocation "
                                           f"within {invoke_timeout:.3f} s") from None
                    raise CloneFailed(f"clones: restore of {image_id} failed: {exc}") from None
        except BaseException:
            with self.lock:
                self.clones.pop(clone_id, None)
                runtime.clones -= 1
            self.counters["restore_failures"] += 1
            raise
        with self.lock:
            shard, worker.shard = worker.shard, None  # the slot is the clone's now (freed by delete_clone)
        elapsed = time.perf_counter() - t0
        self.latency.observe(elapsed)
        self.counters["restores"] += 1
        clone = Clone(clone_id, runtime, shard, worker, time.time(), elapsed * 1e6, reply["timings"], reply["regions"])
        with self.lock:
            self.clones[clone_id] = clone
            self.watched[worker.fileno()] = clone
        self.epoll.register(worker.fileno(), select.EPOLLRDHUP | select.EPOLLHUP)
        out = clone.to_json(self.socket_path)
        if payload is not None:
            out["result"] = base64.b64encode(result).decode()
            out["invoke_latency_us"] = round(reply["invoke"]["latency_us"], 1)
        return out

    def _retire(self, worker: WorkerHandle) -> None:
        worker.stop()
        self._worker_gone(worker)

    def _clone(self, clone_id: str) -> Clone:
        clone = self.clones.get(clone_id)
        if clone is None:
            if clone_id in self.deleted:
                raise NotFound(f"clone {clone_id} was deleted")
            raise NotFound(f"no clone {clone_id!r} (GET /v1/clones lists them)")
        return clone

    def list_clones(self) -> dict:
        with self.lock:
            clones = [c for c in self.clones.values() if c is not None]
        return {"clones": [c.to_json(self.socket_path) for c in clones]}

    def get_clone(self, clone_id: str) -> dict:
        clone = self._clone(clone_id)
        if clone.state == "running" and not clone.worker.poll_events():
            self._mark_failed(clone, clone.worker.failure or "the clone's VMM process exited")
        elif clone.worker.failure and clone.state == "running":
            self._mark_failed(clone, clone.worker.failure)
        return clone.to_json(self.socket_path)

    def _usable(self, clone_id: str) -> Clone:
        clone = self._clone(clone_id)
        if clone.worker.failure and clone.state == "running":
            self._mark_failed(clone, clone.worker.failure)
        if clone.state == "failed":
            raise CloneFailed(f"clone {clone_id} failed: {clone.error}")
        return clone

    def invoke(self, body: dict, clone_id: str) -> dict:
        payload = decode_base64(body["payload"], "invoke.payload")
        timeout = body.get("timeout_ms", 10_000) / 1e3
        clone = self._usable(clone_id)
        try:
            reply, result = clone.worker.request({"op": "invoke", "timeout": timeout}, payload, timeout=timeout + 10)
        except WorkerFailed as exc:
            self._mark_failed(clone, str(exc))
            raise CloneFailed(f"clone {clone_id} failed: {exc}") from None
        except WorkerError as exc:
            if exc.kind == "timeout":
                raise GuestTimeout(f"clone {clone_id}: {exc}") from None
            if clone.worker.failure:
                self._mark_failed(clone, clone.worker.failure)
                raise CloneFailed(f"clone {clone_id} failed: {clone.worker.failure}") from None
            raise BadRequest(f"clone {clone_id}: {exc}") from None
        return {"result": base64.b64encode(result).decode(), "latency_us": round(reply["latency_us"], 1)}

    def snapshot_clone(self, body: dict, clone_id: str) -> dict:
        clone = self._usable(clone_id)
        directory = os.path.join(self.state_dir, "snapshots")
        stem = f"{clone_id}-{int(time.time() * 1000)}"
        state_path = body.get("state_path") or os.path.join(directory, stem + ".state")
        mem_path = body.get("mem_path") or os.path.join(directory, stem + ".mem")
        try:
            clone.worker.request({"op": "snapshot", "state_path": state_path, "mem_path": mem_path}, timeout=600)
        except WorkerFailed as exc:
            self._mark_failed(clone, str(exc))
            raise CloneFailed(f"clone {clone_id} failed: {exc}") from None
        except WorkerError as exc:
            raise BadRequest(f"clone {clone_id}: snapshot failed: {exc}") from None
        return {"state_path": state_path, "mem_path": mem_path}

    def delete_clone(self, clone_id: str) -> None:
        with self.lock:
            clone = self._clone(clone_id)
            del self.clones[clone_id]
            self.deleted.add(clone_id)
            if self.watched.pop(clone.worker.fileno(), None) is not None:
                try:
                    self.epoll.unregister(clone.worker.fileno())
                except (OSError, ValueError):
                    pass
            clone.shard.clones -= 1
            clone.image.clones -= 1
        worker = clone.worker
        if (self.reuse_workers and clone.state == "running" and not worker.failure and not worker.dead
                and not clone.image.deleting and not self.closed
                and self.pool.recycle(worker, clone.image.record.id, lambda w: self._send_recycle(w, clone.image))):
            return  # the worker is prepared again for the image (no fork, VM build or teardown)
        self._retire(worker)

    def _send_recycle(self, worker: WorkerHandle, runtime: "ImageRuntime") -> int:
        """Ask the worker of a deleted clone to drop it and prepare ``runtime``'s image again on the same VM
        (worker.py ``_recycle``); it takes a page-server slot of a shard as a prepared worker does."""
        with self.lock:
            if runtime.deleting or self.closed:
                raise WorkerFailed("the image is being deleted")
            shard = runtime.shard_for_new_clone()
            shard.clones += 1
            worker.shard = shard
        worker.image = ""  # not takeable as prepared until the pool has its reply
        return worker.send_request({"op": "recycle", "image": runtime.record.id,
                                    "state_path": runtime.record.state_path, "page_server": shard.sock_path,
                                    "timeout": 10.0}, b"", [shard.image.memfd])

    # -- metrics
    def metrics_text(self) -> str:
        with self.lock:
            clones = [c for c in self.clones.values() if c is not None]
            runtimes = list(self.images.values())
        by_state = {"running": 0, "failed": 0}
        private = pss = 0
        for clone in clones:
            by_state[clone.state] = by_state.get(clone.state, 0) + 1
            rollup = metrics.smaps_rollup(clone.worker.pid)
            private += rollup.get("Private_Dirty", 0)
            pss += rollup.get("Pss", 0)
        lines = self.latency.render("snapd_restore_latency_seconds",
                                    "Restore latency: request received to the clone running (and its first reply "
                                    "when the request carried a payload)")
        lines += metrics.family("snapd_clones", "gauge", "Live clones by state",
                                [({"state": s}, n) for s, n in sorted(by_state.items())])
        lines += metrics.family("snapd_restores_total", "counter", "Clones restored",
                                [({}, self.counters["restores"])])
        lines += metrics.family("snapd_restore_failures_total", "counter", "Restore requests that failed",
                                [({}, self.counters["restore_failures"])])
        lines += metrics.family("snapd_pool_idle_workers", "gauge", "Warm workers ready for a restore",
                                [({}, self.pool.idle_count())])
        lines += metrics.family("snapd_pool_prepared_workers", "gauge",
                                "Workers restored ahead for an image, waiting for a request",
                                [({}, self.pool.prepared_count())])
        lines += metrics.family("snapd_stale_vmms_stopped", "gauge",
                                "VMM processes of a previous daemon stopped at start-up", [({}, len(self.stale_stopped))])
        faults, shared = [], []
        for runtime in runtimes:
            totals = {"faults": 0, "shared_fills": 0, "shared_wakes": 0, "errors": 0}
            for shard in runtime.shards:
                for key, value in shard.faults().items():
                    totals[key] += value
            faults += [({"image": runtime.record.id, "kind": k}, v) for k, v in totals.items()]
            shared.append(({"image": runtime.record.id}, sum(s.memfd_bytes() for s in runtime.shards)))
        lines += metrics.family("snapd_page_faults", "gauge", "userfaultfd faults served (faults), chunks filled "
                                "into the shared memfd, wakes and errors, over the page server's live VM slots", faults)
        lines += metrics.family("snapd_shared_bytes", "gauge", "Bytes of image memory in the shared memfds", shared)
        lines += metrics.family("snapd_clone_private_bytes", "gauge",
                                "Private dirty bytes of all clone VMM processes (guest writes + VMM heap)",
                                [({}, private)])
        lines += metrics.family("snapd_clone_pss_bytes", "gauge", "Proportional set size of all clone VMM processes",
                                [({}, pss)])
        return "\n".join(lines) + "\n"

    # -- shutdown
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self.lock:
            clones = [c for c in self.clones.values() if c is not None]
            self.clones.clear()
        for clone in clones:
            self._retire(clone.worker)
        self.pool.close()
        self.zygote.close()
        self.records.remove(self.zygote.pid)
        self.monitor.join(5)
        self.epoll.close()
        for runtime in self.images.values():
            runtime.close()
        for name in os.listdir(self.run_dir):
            if name.endswith(".sock"):
                try:
                    os.unlink(os.path.join(self.run_dir, name))
                except FileNotFoundError:
                    pass
