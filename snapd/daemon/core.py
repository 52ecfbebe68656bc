"""The daemon's core: the ``Daemon`` that owns the images, the warm pool, the clones and their monitor thread.

No HTTP here (snapd.daemon.http routes requests to these methods); every method takes validated JSON and returns
a JSON-ready dict, or raises an ApiError naming the problem. This module sets the daemon up, wires the warm pool
to it (worker bookkeeping, preparing workers ahead) and shuts it down; the image methods are in
snapd.daemon.image_ops, the clone methods in snapd.daemon.clones, image shards in snapd.daemon.shards and the
metrics text in snapd.daemon.metrics_text (their public names are re-exported here).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import select
import threading

from snapd.daemon import metrics
from snapd.daemon.clones import Clone, CloneOps
from snapd.daemon.image_ops import ImageOps
from snapd.daemon.images import ImageRegistry
from snapd.daemon.lane import DaemonLane
from snapd.daemon.metrics_text import render as render_metrics
from snapd.daemon.paths import ApiPaths, PathsConfigError
from snapd.daemon.records import ProcessRecords
from snapd.daemon.shards import VMS_PER_SHARD, ImageRuntime, Shard
from snapd.image import ImageError
from snapd.pool.jail import DEFAULT_UID_RANGE, WorkerJail
from snapd.pool.pool import WarmPool, WorkerError, WorkerFailed, WorkerHandle, Zygote
from snapd.pool.worker_handle import PROCESS_EXITED

__all__ = ["VMS_PER_SHARD", "Clone", "Daemon", "DaemonConfig", "ImageRuntime", "Shard"]

log = logging.getLogger("snapd")
SERVER = "snapd/0.1"  # the Server header of every reply (snapd.daemon.http, and the lane's)


class DaemonConfigError(ValueError):
    """A setting the daemon cannot start with (named in the message)."""


def _env_count(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise DaemonConfigError(f"{name} must be a whole number >= 0, not {text!r}")
    return value


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
    chunk_size: int | None = None  # base image chunk size (default: snapd.image's; 2 MiB with huge_dir)
    huge_dir: str | None = None    # a huge=always tmpfs (snapd.hugetmpfs): shared images on 2 MiB pages
    lane: bool = True              # restores of held prepared workers in C, daemon (snapd.daemon.lane) and worker
                                   # (snapd.pool.held_lane) sides; False: JSON and Python all the way
    jail: str = "on"               # on: every worker jailed (snapd.pool.jail; "user" mode when not root); off: none
    uid_range: tuple[int, int] = DEFAULT_UID_RANGE  # one uid and gid per live worker (root mode)
    clone_memory_mib: int | None = None  # a clone worker's memory limit (None: guest memory + VMM overhead)
    clone_cpu_cgroups: bool = True  # a cpu group (weight from its vCPUs) per worker; False: one for all workers
    import_roots: tuple[str, ...] = ()  # directories the API may read beneath, besides STATE/import (the first,
                                        # relative paths' base); snapd.daemon.paths


class Daemon(ImageOps, CloneOps):
    def __init__(self, config: DaemonConfig, socket_path: str = ""):
        self.config = config
        self.socket_path = socket_path
        self.state_dir = os.path.abspath(config.state_dir)
        self.run_dir = os.path.join(self.state_dir, "run")
        os.makedirs(self.run_dir, exist_ok=True)
        try:  # STATE/import and STATE/snapshots made here; a bad import root stops the start before any process
            self.paths = ApiPaths(self.state_dir, config.import_roots)
        except PathsConfigError as exc:
            raise DaemonConfigError(str(exc)) from None
        self._remove_snapshot_leftovers()
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
        self.counters = {"restores": 0, "lane_restores": 0, "restore_failures": 0, "clones_failed": 0}
        prepared = config.prepared  # settings first: a bad one must not leave a zygote behind
        if prepared is None:  # SNAPD_PREPARED: an operator's (and bench/clones.py's) override without a flag
            prepared = _env_count("SNAPD_PREPARED", config.pool_size)
        reuse = config.reuse_workers
        if reuse is None:
            reuse = os.environ.get("SNAPD_REUSE", "1") != "0"
        self.jail = WorkerJail("off" if config.jail == "off" else "root", self.state_dir, config.uid_range,
                               memory_mib=config.clone_memory_mib, cpu_per_clone=config.clone_cpu_cgroups)
        self.zygote = Zygote(self.jail, on_start=self._zygote_started)
        self.reuse_workers = bool(reuse) and prepared > 0
        self.lane = DaemonLane(config.max_clones, SERVER, socket_path, enabled=config.lane)
        self.pool = WarmPool(self.zygote, config.pool_size, config.max_spawning, on_ready=self._worker_ready,
                             on_gone=self._worker_gone, prepare=self._prepare_worker, prepared_target=prepared,
                             on_prepared=self.lane.offer, claim=self.lane.claim)
        self.epoll = select.epoll()
        self.watched: dict[int, Clone] = {}
        self.closed = False
        for record in self.registry.load():
            try:
                self._activate(record)
            except (ImageError, OSError) as exc:  # its base image is gone or damaged: the others still serve
                log.error("image %s is not served: %s", record.id, exc)
        self.monitor = threading.Thread(target=self._monitor, name="snapd-monitor", daemon=True)
        self.monitor.start()

    def _remove_snapshot_leftovers(self) -> None:
        """Temporary files of clone snapshots a previous daemon did not finish (snapd.daemon.paths)."""
        removed = self.paths.remove_snapshot_leftovers()
        if removed:
            log.info("removed %d temporary file(s) of unfinished snapshots under %s", len(removed),
                     self.paths.snapshots.path)

    # -- worker bookkeeping
    def _worker_ready(self, worker: WorkerHandle) -> None:
        self.records.add(worker.pid, worker.start_time, "worker")
        if worker.lease is not None:
            self.jail.watch(worker.lease, worker.pid, lambda reason: self._worker_exited(worker, reason))
        for runtime in list(self.images.values()):  # images registered after this worker's fork
            if runtime.record.shape == worker.shape:
                worker.send_quietly({"op": "preload", "image": runtime.record.id}, fds=[runtime.state_fd])

    def _zygote_started(self, zygote: Zygote, old_pid: int) -> None:
        if old_pid:
            self.records.remove(old_pid)
        self.records.add(zygote.pid, zygote.start_time, "zygote")

    def _worker_exited(self, worker: WorkerHandle, reason: str) -> None:
        """The reaper's news of a jailed worker's end (snapd.pool.jail): its clone, if any, fails with the
        reason (a seccomp kill, its memory limit), replacing the monitor's plainer word if it came first."""
        worker.failure = worker.failure or reason
        with self.lock:
            clone = next((c for c in self.clones.values() if c is not None and c.worker is worker), None)
        if clone is not None and clone.state == "running":
            self._mark_failed(clone, reason)
        elif clone is not None and clone.error == PROCESS_EXITED:
            clone.error = reason

    def _worker_gone(self, worker: WorkerHandle) -> None:
        if worker.pid:
            self.records.remove(worker.pid)
        with self.lock:
            shard, worker.shard = worker.shard, None
            if shard is not None:  # a prepared worker that never became a clone: its page-server slot is free
                shard.clones -= 1

    def _prepare_worker(self, worker: WorkerHandle, image_id: str) -> dict | None:
        """Restore ``image_id`` into an idle worker ahead of any request (the pool's refill thread calls this):
        it registers with a shard's page server now, so that shard's slot is counted from now on."""
        with self.lock:
            runtime = self.images.get(image_id)
            if runtime is None or runtime.deleting or self.closed:
                return None
            shard = runtime.assign_slot(worker)
        try:
            with shard.connect() as connection:
                reply, _ = worker.request({"op": "prepare", "image": image_id, "timeout": 10.0}, b"",
                                          runtime.worker_fds(shard, connection), timeout=30.0)
        except (WorkerFailed, WorkerError, OSError) as exc:
            log.warning("could not prepare a worker for %s: %s", image_id, exc)
            return None  # the pool retires it (which frees the shard slot)
        return reply  # the pool records it on the worker as it queues it

    def _retire(self, worker: WorkerHandle) -> None:
        self.lane.withdraw_worker(worker)  # no clone ticket may name a worker that is gone (its fd is reused)
        worker.stop()
        self._worker_gone(worker)

    # -- metrics
    def metrics_text(self) -> str:
        return render_metrics(self)

    # -- shutdown
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self.lock:
            clones = [c for c in self.clones.values() if c is not None]
            self.clones.clear()
        for clone in clones:
            clone.worker.kill()  # first: an invocation in flight (holding its worker's channel) ends now
        for clone in clones:
            self._retire(clone.worker)
        self.pool.close()
        self.zygote.close()
        self.jail.close()
        self.records.remove(self.zygote.pid)
        self.monitor.join(5)
        self.epoll.close()
        for runtime in self.images.values():
            runtime.close()
        self.paths.close()
        for name in os.listdir(self.run_dir):
            if name.endswith(".sock"):
                try:
                    os.unlink(os.path.join(self.run_dir, name))
                except FileNotFoundError:
                    pass
