"""The warm pool per VM shape: ready and prepared workers, the refill thread, reuse of a deleted clone's worker.

The pool keeps ``target`` ready workers per shape and refills in a background thread, so a restore takes a ready
worker and never waits for a fork unless a burst outruns the refill. Workers are forked through the zygote
(snapd.pool.zygote_handle) and driven through their handles (snapd.pool.worker_handle); the names of those two
modules are re-exported here, where the daemon imports them from.
"""
from __future__ import annotations

import collections
import logging
import os
import select
import threading
import time
from typing import Callable

from snapd.pool import protocol
from snapd.pool.worker_handle import WorkerError, WorkerFailed, WorkerHandle, process_start_time, readable
from snapd.pool.zygote_handle import ROOT, PoolError, Zygote
from vmm.prebuilt import VmShape

log = logging.getLogger("snapd")

__all__ = ["QUIET_S", "ROOT", "PoolError", "WarmPool", "WorkerError", "WorkerFailed", "WorkerHandle", "Zygote",
           "process_start_time", "readable"]

# After a restore, its HTTP reply still has to be written and read; forking and building a replacement worker
# in that window would take the CPU from them on a 2-core host.
QUIET_S = 0.003


class WarmPool:
    """Ready workers per shape, refilled in the background up to ``target`` (plus any waiting demand)."""

    def __init__(self, zygote: Zygote, target: int = 2, max_spawning: int = 4,
                 on_ready: Callable[[WorkerHandle], None] | None = None,
                 on_gone: Callable[[WorkerHandle], None] | None = None,
                 prepare: Callable[[WorkerHandle, str], dict | None] | None = None, prepared_target: int = 0,
                 on_prepared: Callable[[WorkerHandle, str], None] | None = None,
                 claim: Callable[[WorkerHandle], bool] | None = None):
        self.zygote = zygote
        self.target = target
        # Prepared workers: restored ahead for one image, guest held in FN_NEXT (worker.py _prepare). The daemon's
        # ``prepare(worker, image)`` does it (on the refill thread, outside restores) and returns the worker's
        # reply (None: it failed); ``take`` prefers them.
        self.prepare = prepare
        self.prepared_target = prepared_target if prepare is not None else 0
        self.images: dict[str, VmShape] = {}
        self.prepared: dict[str, collections.deque[WorkerHandle]] = collections.defaultdict(collections.deque)
        self.preparing: dict[str, int] = collections.defaultdict(int)
        # Workers whose clone was deleted, being prepared again for the same image (``recycle``):
        # channel fd -> (worker, image, request id, deadline); counted in ``preparing``.
        self.recycling: dict[int, tuple[WorkerHandle, str, int, float]] = {}
        self.recycled = 0
        self.max_spawning = max_spawning
        self.on_ready = on_ready or (lambda worker: None)
        self.on_gone = on_gone or (lambda worker: None)
        # A prepared worker may also be offered elsewhere (the daemon's restore lane): ``on_prepared`` as it is
        # queued, ``claim`` before the pool hands it out or retires it (False: taken there, no longer ours).
        # Both are called with the pool's lock held, so a worker is never in two hands.
        self.on_prepared = on_prepared or (lambda worker, image: None)
        self.claim = claim or (lambda worker: True)
        self.shapes: dict[VmShape, int] = {}  # shape -> number of images needing it
        self.idle: dict[VmShape, collections.deque[WorkerHandle]] = collections.defaultdict(collections.deque)
        self.waiting: dict[VmShape, int] = collections.defaultdict(int)
        self.spawning: dict[int, WorkerHandle] = {}
        self.restoring = 0  # restores in flight: refilling now would take CPU from them (2 cores here)
        self.quiet_until = 0.0
        self.cond = threading.Condition()
        self.closed = False
        self.failures = 0
        self.last_error = ""
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._refill_loop, name="snapd-pool", daemon=True)
        self.thread.start()

    # -- shapes in use
    def add_shape(self, shape: VmShape) -> None:
        with self.cond:
            self.shapes[shape] = self.shapes.get(shape, 0) + 1
        self._wake()

    def remove_shape(self, shape: VmShape) -> None:
        with self.cond:
            left = self.shapes.get(shape, 0) - 1
            if left > 0:
                self.shapes[shape] = left
                return
            self.shapes.pop(shape, None)
            idle = list(self.idle.pop(shape, ()))
        for worker in idle:
            self._retire(worker)

    def add_image(self, image: str, shape: VmShape) -> None:
        with self.cond:
            self.images[image] = shape
        self._wake()

    def remove_image(self, image: str) -> list[WorkerHandle]:
        """Stop preparing for ``image``; its prepared workers are retired (they hold its page server)."""
        with self.cond:
            self.images.pop(image, None)
            prepared = [w for w in self.prepared.pop(image, ()) if self.claim(w)]
        for worker in prepared:
            self._retire(worker)
        return prepared

    def prepared_workers(self, image: str | None = None) -> list[WorkerHandle]:
        with self.cond:
            return [w for name, queue in self.prepared.items() if image in (None, name) for w in queue]

    def warm_workers(self) -> list[WorkerHandle]:
        """Every worker the pool holds ready: plain idle ones and prepared ones."""
        return self.idle_workers() + self.prepared_workers()

    def settled(self) -> bool:
        """Nothing in flight and nothing left to do: no fork, prepare or recycle running, no restore waiting for
        a worker, and every shape's idle target and every image's prepared target met. (Only "nothing in
        flight" was true too early: between an image's registration and the refill thread's first look.)"""
        with self.cond:
            if self.spawning or any(self.preparing.values()) or any(self.waiting.values()):
                return False
            return (all(len(self.idle[shape]) >= self.target for shape in self.shapes)
                    and all(len(self.prepared[image]) >= self.prepared_target for image in self.images))

    def prepared_count(self) -> int:
        with self.cond:
            return sum(len(q) for q in self.prepared.values())

    def idle_workers(self) -> list[WorkerHandle]:
        with self.cond:
            return [w for queue in self.idle.values() for w in queue]

    def idle_count(self) -> int:
        with self.cond:
            return sum(len(q) for q in self.idle.values())

    # -- taking a worker
    def take(self, shape: VmShape, timeout: float, image: str = "") -> WorkerHandle:
        """A worker prepared for ``image`` if one is ready, else a plain warm worker of ``shape``
        (``worker.image`` tells which)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            if shape not in self.shapes:
                raise PoolError(f"no image of shape {shape} is registered")
            worker = self._pop_locked(shape, image)
            if worker is not None:
                return worker
            self.waiting[shape] += 1
            self._wake_locked()
            try:
                while True:
                    worker = self._pop_locked(shape, image)
                    if worker is not None:
                        return worker
                    left = deadline - time.monotonic()
                    if self.closed or left <= 0:
                        raise PoolError(f"no warm {shape.vcpu_count}-vCPU/{shape.mem_size_mib} MiB worker within "
                                        f"{timeout:.1f} s" + (f" (last failure: {self.last_error})"
                                                              if self.last_error else ""))
                    self.cond.wait(left)
            finally:
                self.waiting[shape] -= 1

    def _pop_locked(self, shape: VmShape, image: str) -> WorkerHandle | None:
        prepared = self.prepared.get(image) if image else None
        worker = None
        while prepared and worker is None:
            worker = prepared.popleft()
            if not self.claim(worker):
                worker = None  # the lane is restoring it
        if worker is None and self.idle[shape]:
            worker = self.idle[shape].popleft()
        if worker is None:
            return None
        self._wake_locked()
        return worker

    def discard_prepared(self, worker: WorkerHandle, image: str) -> None:
        """A prepared worker the lane made a clone of leaves the queue (if no one popped it since)."""
        with self.cond:
            try:
                self.prepared[image].remove(worker)
            except ValueError:
                pass

    def restored_elsewhere(self) -> None:
        """A restore the pool did not see (the lane's) just ended: the same quiet period, then refill."""
        with self.cond:
            self.quiet_until = time.monotonic() + QUIET_S
            self._wake_locked()

    # -- reusing a worker after its clone is deleted
    def recycle(self, worker: WorkerHandle, image: str, send: Callable[[WorkerHandle], int],
                timeout: float = 30.0) -> bool:
        """Take back the worker of a deleted clone of ``image`` to be prepared again for it, if the image wants
        another prepared worker (prepared + in preparation below its target plus waiting requests). ``send``
        sends the worker its "recycle" request and returns the request id; the refill thread collects the reply.
        False: not wanted (or the request could not be sent): the caller retires the worker."""
        with self.cond:
            shape = self.images.get(image)
            if (self.closed or shape is None or shape != worker.shape or len(self.prepared[image])
                    + self.preparing[image] >= self.prepared_target + self.waiting[shape]):
                return False
            self.preparing[image] += 1
        try:
            request_id = send(worker)
        except Exception:  # noqa: BLE001 (the worker is retired by the caller, its failure logged there)
            with self.cond:
                self.preparing[image] -= 1
            return False
        with self.cond:
            self.recycling[worker.fileno()] = (worker, image, request_id, time.monotonic() + timeout)
            self._wake_locked()
        return True

    def _recycled(self, fd: int, expired: bool = False) -> None:
        """The refill thread: a recycling worker answered (or ran out of time)."""
        with self.cond:
            entry = self.recycling.get(fd)
        if entry is None:
            return
        worker, image, request_id, _ = entry
        reply = None
        if expired:
            worker._mark_dead("no reply to recycle in time")
        else:
            try:
                reply = worker.read_reply(request_id)
                if reply is None:
                    return  # an event only: the reply is still to come
            except (WorkerFailed, WorkerError) as exc:
                self._note_failure(f"recycling worker {worker.pid} for {image} failed: {exc}")
        with self.cond:
            self.recycling.pop(fd, None)
            if self._prepared_done_locked(worker, image, reply):
                self.recycled += 1
                return
        self._retire(worker)

    def _prepared_done_locked(self, worker: WorkerHandle, image: str, reply: dict | None) -> bool:
        """A prepare or recycle ended (``reply``: the worker's, None if it failed): the worker is queued as
        prepared for ``image`` if it succeeded and the image still wants it; False: the caller retires it."""
        self.preparing[image] -= 1
        if reply is None or self.closed or image not in self.images:
            return False
        worker.image, worker.prepared = image, reply
        self.prepared[image].append(worker)
        self.on_prepared(worker, image)
        self.cond.notify_all()
        return True

    def restore_started(self) -> None:
        with self.cond:
            self.restoring += 1

    def restore_finished(self) -> None:
        """The restore is done but its reply is still being written: the refill waits QUIET_S longer."""
        with self.cond:
            self.restoring -= 1
            self.quiet_until = time.monotonic() + QUIET_S
            if not self.restoring:
                self._wake_locked()

    # -- refill
    def _wake(self) -> None:
        with self.cond:
            self._wake_locked()

    def _wake_locked(self) -> None:
        if self.wake_write < 0:  # closed: a restore still in flight at shutdown has nothing to wake
            return
        try:
            os.write(self.wake_write, b"x")
        except BlockingIOError:
            pass

    def _wanted(self) -> list[VmShape]:
        """Shapes to fork for now, at most max_spawning in flight (called with the lock held)."""
        wanted = []
        in_flight = collections.Counter(w.shape for w in self.spawning.values())
        budget = self.max_spawning - len(self.spawning)
        for shape in self.shapes:
            busy = self.restoring or time.monotonic() < self.quiet_until
            if busy and self.idle[shape] and not self.waiting[shape]:
                continue  # a fork and a VM build now would compete with the restore for the CPU
            deficit = (self.target + self.waiting[shape] + self._prepare_deficit(shape)
                       - len(self.idle[shape]) - in_flight[shape])
            for _ in range(max(0, min(deficit, budget))):
                wanted.append(shape)
                budget -= 1
        return wanted

    def _prepare_deficit(self, shape: VmShape) -> int:
        return sum(max(0, self.prepared_target - len(self.prepared[image]) - self.preparing[image])
                   for image, image_shape in self.images.items() if image_shape == shape)

    def _prepare_some(self) -> None:
        """Turn idle workers into prepared ones while no restore runs (called on the refill thread)."""
        while True:
            with self.cond:
                if self.closed or self.restoring or time.monotonic() < self.quiet_until:
                    return
                choice = None
                for image, shape in self.images.items():
                    if (self.idle[shape] and not self.waiting[shape]
                            and len(self.prepared[image]) + self.preparing[image] < self.prepared_target):
                        choice = image, self.idle[shape].popleft()
                        break
                if choice is None:
                    return
                image, worker = choice
                self.preparing[image] += 1
            try:
                reply = self.prepare(worker, image)
            except Exception as exc:  # the daemon's bookkeeping failed: do not lose the refill thread
                self._note_failure(f"prepare for {image} failed: {exc}")
                reply = None
            with self.cond:
                kept = self._prepared_done_locked(worker, image, reply)
            if not kept:
                self._retire(worker)
                if reply is None:
                    return  # a failing prepare must not spin: the next wake-up tries again

    def _refill_loop(self) -> None:
        backoff = 0.0
        while True:
            if backoff <= time.monotonic() and not self._zygote_ready():
                backoff = time.monotonic() + 0.5
            with self.cond:
                if self.closed:
                    return
                wanted = [] if backoff > time.monotonic() else self._wanted()
            for shape in wanted:
                try:
                    worker = self.zygote.fork_worker(shape)
                except PoolError as exc:
                    self._note_failure(str(exc))
                    backoff = time.monotonic() + 0.5
                    break
                with self.cond:
                    self.spawning[worker.fileno()] = worker
            with self.cond:
                recycling = list(self.recycling.items())
            now = time.monotonic()
            for fd, entry in recycling:
                if entry[3] < now:
                    self._recycled(fd, expired=True)
            with self.cond:
                idle = {w.fileno(): w for queue in self.idle.values() for w in queue}
            # The zygote's channel (it hangs up when it dies) and the idle workers' (the same): replaced at once.
            watched = [self.wake_read, self.zygote.control.fileno(), *self.spawning, *idle,
                       *(fd for fd, e in recycling if e[3] >= now)]
            wait = 0.5 if not self.restoring else 0.05
            if self.quiet_until > time.monotonic():
                wait = min(wait, self.quiet_until - time.monotonic())
            poller = select.poll()
            for fd in watched:
                poller.register(fd, select.POLLIN)
            try:
                ready = [fd for fd, _ in poller.poll(wait * 1e3)]
            except OSError:
                ready = []
            if self.wake_read in ready:
                try:
                    while os.read(self.wake_read, 4096):
                        pass
                except BlockingIOError:
                    pass
            for fd in ready:
                if fd != self.wake_read and fd in self.spawning:
                    self._spawned(self.spawning[fd])
                elif fd != self.wake_read and fd in self.recycling:
                    self._recycled(fd)
                elif fd in idle:
                    self._idle_news(idle[fd])
            if self.prepared_target:
                self._prepare_some()

    def _zygote_ready(self) -> bool:
        """Replace a zygote that died (its workers live on); False if no new one could be started yet."""
        try:
            if self.zygote.ensure():
                log.warning("the zygote died and was replaced (pid %d)", self.zygote.pid)
            return True
        except PoolError as exc:
            self._note_failure(f"the zygote died and could not be replaced: {exc}")
            return False

    def _idle_news(self, worker: WorkerHandle) -> None:
        """An idle worker spoke unasked or hung up: one that is gone leaves the pool now (and is replaced)."""
        if worker.poll_events() and not worker.failure:
            return
        with self.cond:
            queue = self.idle.get(worker.shape)
            if queue is None or worker not in queue:
                return  # taken meanwhile: its taker sees the news
            queue.remove(worker)
        log.warning("idle worker %d is gone: %s", worker.pid, worker.failure or "it exited")
        self._retire(worker)

    def _spawned(self, worker: WorkerHandle) -> None:
        try:
            hello, _, extra = protocol.recv(worker.channel)
            for fd in extra:
                os.close(fd)
        except (protocol.ProtocolError, OSError) as exc:
            hello = {"event": "error", "error": f"the new worker exited before it was ready ({exc})"}
        with self.cond:
            self.spawning.pop(worker.fileno(), None)
        if hello.get("event") != "ready":
            worker.dead = True
            worker.channel.close()
            self._note_failure(hello.get("error", "bad hello"))
            if worker.lease is not None:  # reaped first if it got as far as its own pid namespace
                if hello.get("pid"):
                    self.zygote.jail.watch(worker.lease, hello["pid"], lambda reason: None)
                else:
                    self.zygote.jail.release(worker.lease)
            return
        worker.pid = hello["pid"]
        worker.start_time = process_start_time(worker.pid)
        self.on_ready(worker)
        with self.cond:
            if self.closed or worker.shape not in self.shapes:
                keep = False
            else:
                self.idle[worker.shape].append(worker)
                self.cond.notify_all()
                keep = True
        if not keep:
            self._retire(worker)

    def _note_failure(self, message: str) -> None:
        with self.cond:
            self.failures += 1
            self.last_error = message
            self.cond.notify_all()

    def _retire(self, worker: WorkerHandle) -> None:
        worker.stop()
        self.on_gone(worker)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            idle = [w for queue in self.idle.values() for w in queue]
            idle += [w for queue in self.prepared.values() for w in queue if self.claim(w)]
            idle += [entry[0] for entry in self.recycling.values()]
            self.idle.clear()
            self.prepared.clear()
            self.recycling.clear()
            self.cond.notify_all()
        self._wake()
        self.thread.join(10)
        for worker in idle:
            self._retire(worker)
        for worker in list(self.spawning.values()):
            worker.dead = True
            worker.channel.close()  # the new worker sees EOF after its build and exits
        self.spawning.clear()
        with self.cond:  # under the lock _wake_locked writes with: never to a closed (or reused) descriptor
            for fd in (self.wake_read, self.wake_write):
                if fd >= 0:  # (closed once)
                    os.close(fd)
            self.wake_read = self.wake_write = -1
