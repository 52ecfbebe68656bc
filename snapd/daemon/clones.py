"""Clones: their records and lifecycle in the daemon (restore, invoke, snapshot, delete, failure).

``Clone`` is the daemon's record of one clone; ``CloneOps``, a mixin of ``Daemon`` (snapd.daemon.core), holds
the clone methods: a restore takes a warm (or prepared) worker from the pool and gives it a page-server slot of
one of the image's shards; the monitor thread marks a clone failed when its worker dies; a deleted clone's worker
is handed back to the pool to be prepared again for its image (worker reuse) or retired. The state used
(``clones``, ``deleted``, ``watched``, ``epoll``, ``lock``, ``pool``, counters) is created by ``Daemon``.
"""
from __future__ import annotations

import base64
import dataclasses
import logging
import select
import time

from snapd._lane_native import lib as lane_lib
from snapd.daemon.errors import ApiError, BadRequest, CloneFailed, Conflict, GuestTimeout, NotFound, Unavailable
from snapd.daemon.lane import clone_endpoints, new_clone_id
from snapd.daemon.shards import ImageRuntime, Shard
from snapd.pool import protocol
from snapd.pool.pool import PoolError, WorkerError, WorkerFailed, WorkerHandle
from snapd.pool.worker_handle import PROCESS_EXITED, WorkerUnanswered
from vmm.api.fields import decode_base64

# An invocation's reply is awaited its own timeout plus this, by the lane (C) and here alike: a worker that has
# not answered by then (stopped, hung) is killed and its clone failed, and the caller has its 504.
REPLY_GRACE_S = lane_lib.LANE_REPLY_GRACE_MS / 1e3

log = logging.getLogger("snapd")


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
                "endpoints": clone_endpoints(socket_path, self.id)}


class CloneOps:
    """The clone methods of ``Daemon`` (a mixin: the state is the daemon's)."""

    # -- failure
    def _monitor(self) -> None:
        """Notices a clone's worker dying (its channel hung up) and marks the clone failed."""
        while not self.closed:
            try:
                events = self.epoll.poll(0.5)
            except (OSError, ValueError):
                return
            if self.closed:  # the daemon is stopping its clones' workers itself: no failure to report
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
                    self._mark_failed(clone, clone.worker.failure or PROCESS_EXITED)

    def _mark_failed(self, clone: Clone, error: str) -> None:
        self.lane.withdraw_clone(clone.id)  # its invocations go the Python way, which refuses them
        if clone.state != "failed":
            clone.state, clone.error = "failed", error
            self.counters["clones_failed"] += 1
            log.warning("clone %s failed: %s", clone.id, error)

    # -- restore, use, delete
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
            if not self.lane.reserve():  # counted with the lane's restores (snapd.daemon.lane)
                raise Conflict(f"the daemon runs {len(self.clones)} clones, its limit (max_clones) "
                               f"is {self.config.max_clones}")
            runtime.clones += 1
            clone_id = new_clone_id()
            self.clones[clone_id] = None  # reserves the slot against the limit
        deadline = time.monotonic() + self.config.restore_timeout
        try:
            for attempt in range(3):  # an idle worker may have died since it was ready: take another
                try:
                    worker = self.pool.take(runtime.record.shape, max(0.0, deadline - time.monotonic()), image_id)
                except PoolError as exc:
                    raise Unavailable(f"clones: {exc}") from None
                lane = worker.image == image_id and worker.prepared.get("held") and self.lane.enabled
                connection = None
                if worker.image == image_id:  # prepared: memory mapped, page server attached, state written
                    header = {"op": "restore", "prepared": True, "image": image_id, "invoke": payload is not None,
                              "timeout": invoke_timeout}
                    fds = ()
                else:
                    with self.lock:
                        shard = runtime.assign_slot(worker)
                    header = {"op": "restore", "image": image_id, "invoke": payload is not None,
                              "timeout": invoke_timeout}
                try:
                    if worker.image != image_id:
                        try:
                            connection = shard.connect()
                        except OSError as exc:
                            raise WorkerFailed(f"the page server of {image_id} cannot be reached: {exc}") from None
                        fds = runtime.worker_fds(shard, connection)
                    timeout = max(1.0, deadline - time.monotonic()) + invoke_timeout
                    if lane:  # the worker answers from C: a struct each way, its records known from the prepare
                        reply, result = worker.restore_held(image_id, payload, invoke_timeout, timeout)
                    else:
                        reply, result = worker.request(header, payload or b"", fds, timeout=timeout)
                    if worker.image == image_id:
                        reply = self._prepared_reply(worker, reply)
                    first = reply.get("invoke")
                    if first is not None and not first.get("ok"):  # restored, but the first invocation failed
                        raise WorkerError(first.get("error", "the first invocation failed"),
                                          first.get("kind", "invocation"))
                    break
                except WorkerFailed as exc:
                    self._retire(worker)  # frees its shard slot
                    if attempt == 2 or time.monotonic() > deadline:
                        raise CloneFailed(f"clones: restore of {image_id} failed: {exc}") from None
                except WorkerError as exc:
                    raise self._restore_refused(worker, exc, image_id, invoke_timeout) from None
                finally:
                    if connection is not None:
                        connection.close()  # the worker has its own copy
        except BaseException:
            self._restore_undone(clone_id, runtime)
            raise
        clone = self._record(clone_id, runtime, worker, reply, time.perf_counter() - t0)
        return self._clone_reply(clone, reply, result, payload is not None)

    def _restore_refused(self, worker: WorkerHandle, exc: WorkerError, image_id: str,
                         invoke_timeout: float) -> ApiError:
        """A worker refused a restore (or its first invocation): retire it, and the error to answer with."""
        self._retire(worker)
        if exc.kind == "timeout":
            return GuestTimeout(f"clones: the restored guest did not answer the first invocation "
                                f"within {invoke_timeout:.3f} s")
        if exc.kind == "invocation":
            return BadRequest(f"clones: the first invocation failed: {exc}")
        return CloneFailed(f"clones: restore of {image_id} failed: {exc}")

    def _restore_undone(self, clone_id: str, runtime: ImageRuntime) -> None:
        with self.lock:
            self.clones.pop(clone_id, None)
            runtime.clones -= 1
        self.lane.release()
        self.counters["restore_failures"] += 1

    def _record(self, clone_id: str, runtime: ImageRuntime, worker: WorkerHandle, reply: dict, elapsed: float,
                created: float | None = None) -> Clone:
        """The restored clone enters the daemon's books (its slot in the count is already reserved)."""
        clone = Clone(clone_id, runtime, worker.shard, worker, created or time.time(), elapsed * 1e6,
                      reply["timings"], reply["regions"])
        with self.lock:  # watched before anyone can see it: a DELETE may come at once (the lane answered first)
            self.epoll.register(worker.fileno(), select.EPOLLRDHUP | select.EPOLLHUP)
            worker.shard = None  # the slot is the clone's now (freed by delete_clone)
            self.watched[worker.fileno()] = clone
            self.clones[clone_id] = clone
            self.lane.offer_clone(clone, runtime.record.id)  # its invocations may be answered in C now
        self.latency.observe(elapsed)
        self.counters["restores"] += 1
        return clone

    def _clone_reply(self, clone: Clone, reply: dict, result: bytes, invoked: bool) -> dict:
        out = clone.to_json(self.socket_path)
        if invoked:
            out["result"] = base64.b64encode(result).decode()
            out["invoke_latency_us"] = round(reply["invoke"]["latency_us"], 1)
        return out

    # -- restores the lane (snapd.daemon.lane) took
    def _lane_taken(self, ticket) -> ImageRuntime:
        """The ticket's worker leaves the pool and its image counts the clone (the image cannot have been
        deleted: delete_image refuses while a ticket of it is taken)."""
        self.pool.discard_prepared(ticket.worker, ticket.image_id)
        with self.lock:
            runtime = self._image(ticket.image_id)
            runtime.clones += 1
            self.clones[ticket.clone_id] = None
        return runtime

    @staticmethod
    def _prepared_reply(worker: WorkerHandle, reply: dict) -> dict:
        """A prepared clone's restore reply, with what the worker's prepare reply said (regions, the prepare's
        timings): sent once, at prepare time."""
        return dict(reply, regions=worker.prepared["regions"],
                    timings=dict(worker.prepared["timings"], **reply.get("timings", {})))

    def lane_served(self, out) -> None:
        """The lane restored a clone and answered its request: record it (the HTTP handler calls this)."""
        ticket = self.lane.ticket(out.token)
        try:
            runtime = self._lane_taken(ticket)
            if self.closed:  # the daemon stopped its clones meanwhile: this one goes too
                raise Unavailable("the daemon is stopping")
            reply = self._prepared_reply(ticket.worker, {"timings": {"new_generation_us": out.generation_ns / 1e3}})
            self._record(ticket.clone_id, runtime, ticket.worker, reply, out.restore_us / 1e6, out.created)
        except BaseException:
            self._lane_dropped(ticket)
            raise
        finally:
            self.lane.settle(out.token)
        self.counters["lane_restores"] += 1
        self.pool.restored_elsewhere()

    def _lane_dropped(self, ticket) -> None:
        """A clone the lane restored that the daemon cannot keep: its worker and its place in the books go."""
        self._retire(ticket.worker)
        with self.lock:
            runtime = self.images.get(ticket.image_id)
            placeholder = ticket.clone_id in self.clones and self.clones[ticket.clone_id] is None
            if placeholder:
                self.clones.pop(ticket.clone_id)
                if runtime is not None:
                    runtime.clones -= 1
        self.lane.release()
        self.counters["restore_failures"] += 1

    def lane_handoff(self, out, data: bytes) -> dict:
        """The lane took a ticket, then stopped (out.stage): finish the request here, as _restore_one would."""
        t0 = time.perf_counter()
        ticket = self.lane.ticket(out.token)
        worker, invoked, invoke_timeout = ticket.worker, bool(out.invoke), out.timeout_ms / 1e3
        try:
            try:
                runtime = self._lane_taken(ticket)
            except BaseException:
                self._lane_dropped(ticket)
                raise
            if out.stage == lane_lib.LANE_STAGE_UNWRITTEN:  # restored: the client is gone, the clone is not
                self._record(ticket.clone_id, runtime, worker, self._prepared_reply(worker, {}), out.restore_us / 1e6)
                return {}
            try:
                if out.stage == lane_lib.LANE_STAGE_REFUSED:
                    raise WorkerError(data.decode("utf-8", "replace"), protocol.LANE_KINDS.get(out.status, "vmm"))
                if out.stage == lane_lib.LANE_STAGE_UNSENT:
                    raise WorkerFailed(f"worker {worker.pid} did not take the restore: {worker.failure or 'gone'}")
                reply, result = worker.await_reply("restore", out.request_id,
                                                   invoke_timeout + self.config.restore_timeout)
                reply = self._prepared_reply(worker, reply)
                clone = self._record(ticket.clone_id, runtime, worker, reply, time.perf_counter() - t0)
            except WorkerError as exc:
                self._restore_undone(ticket.clone_id, runtime)
                raise self._restore_refused(worker, exc, ticket.image_id, invoke_timeout) from None
            except WorkerFailed as exc:
                self._retire(worker)
                self._restore_undone(ticket.clone_id, runtime)
                if out.stage != lane_lib.LANE_STAGE_UNSENT:  # it may have run: never twice
                    raise CloneFailed(f"clones: restore of {ticket.image_id} failed: {exc}") from None
                body = {"image": ticket.image_id, "timeout_ms": out.timeout_ms}
                if invoked:
                    body["payload"] = base64.b64encode(data).decode()
                return self.create_clones(body)  # the restore never reached it: another worker, the ordinary way
            except BaseException:
                self._retire(worker)
                self._restore_undone(ticket.clone_id, runtime)
                raise
            return {"clones": [self._clone_reply(clone, reply, result, invoked)]}
        finally:
            self.lane.settle(out.token)

    def _clone(self, clone_id: str, wait: bool = True) -> Clone:
        """The clone's record; ``wait``: for one the lane has answered but not yet recorded (never with
        ``self.lock`` held: the recording needs it)."""
        clone = self.clones.get(clone_id)
        if clone is None and wait:
            self.lane.wait_if_in_flight(clone_id, self.config.restore_timeout)
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
            self._mark_failed(clone, clone.worker.failure or PROCESS_EXITED)
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
        return self._invoke_reply(clone, lambda: clone.worker.invoke_live(clone.image.record.id, payload, timeout,
                                                                          timeout=timeout + REPLY_GRACE_S))

    def lane_invoke_handoff(self, out, data: bytes) -> dict:
        """The lane took a live clone's ticket for an invocation, then stopped (out.stage): finish it as invoke()
        would. At stage SENT this thread still holds the worker channel's lock (the lane's)."""
        clone = self.lane.clone_ticket(out.token)  # known while its ticket is taken, even if deleted meanwhile
        clone_id, worker = clone.id, clone.worker
        locked = out.stage == lane_lib.LANE_STAGE_SENT

        def exchange():
            nonlocal locked
            if out.stage == lane_lib.LANE_STAGE_UNSENT:
                worker.poll_events()
                raise WorkerFailed(f"worker {worker.pid} took no invocation: {worker.failure or 'it is gone'}")
            if out.stage == lane_lib.LANE_STAGE_REFUSED:
                raise WorkerError(data.decode("utf-8", "replace"), protocol.LANE_KINDS.get(out.status, "vmm"))
            locked = False  # await_reply releases it; it waits only what the lane has not waited already
            left = max(0.0, out.timeout_ms / 1e3 + REPLY_GRACE_S - out.restore_us / 1e6)
            return worker.await_reply("invoke", out.request_id, left, locked=True)
        try:
            return self._invoke_reply(clone, exchange)  # as an invocation begun before a DELETE ends in Python
        finally:
            if locked:
                worker.lock.release()
            if self.clones.get(clone_id) is not clone or clone.state != "running":
                self.lane.withdraw_clone(clone_id)  # before the untake: never offered again
            self.lane.untake_clone(out.token)

    def _invoke_reply(self, clone: Clone, exchange) -> dict:
        """An invocation's answer from ``exchange()`` (the worker's reply and result), or its error mapped."""
        clone_id = clone.id
        try:
            reply, result = exchange()
        except WorkerUnanswered as exc:  # stopped or hung past its own timeout: killed, and the clone with it
            self._mark_failed(clone, str(exc))
            raise GuestTimeout(f"clone {clone_id} failed: {exc}") from None
        except WorkerFailed as exc:
            self._mark_failed(clone, str(exc))
            raise CloneFailed(f"clone {clone_id} failed: {exc}") from None
        except WorkerError as exc:
            if exc.kind == "timeout":
                raise GuestTimeout(f"clone {clone_id}: {exc}") from None
            if clone.worker.failure or exc.kind == "vmm":  # its VM stopped under the call: the clone is broken
                why = clone.worker.failure or str(exc)
                self._mark_failed(clone, why)
                raise CloneFailed(f"clone {clone_id} failed: {why}") from None
            raise BadRequest(f"clone {clone_id}: {exc}") from None
        if clone.worker.failure and clone.state == "running":  # answered, but the worker reported a failure
            self._mark_failed(clone, clone.worker.failure)
        return {"result": base64.b64encode(result).decode(), "latency_us": round(reply["invoke"]["latency_us"], 1)}

    def snapshot_clone(self, body: dict, clone_id: str) -> dict:
        """A Full snapshot of the clone into two new files beneath STATE/snapshots (snapd.daemon.paths): the daemon
        creates them (temporary names, O_EXCL, in the targets' directories), the worker writes into the
        descriptors it is sent (it opens no path), and the daemon fsyncs and puts both in place once both are
        complete. On any failure neither target exists and the temporaries are gone."""
        clone = self._usable(clone_id)
        stem = f"{clone_id}-{int(time.time() * 1000)}"
        files = self.paths.snapshot_files(body.get("state_path") or stem + ".state",
                                          body.get("mem_path") or stem + ".mem")
        try:
            try:
                clone.worker.request({"op": "snapshot"}, b"", files.fds, timeout=600)
            except WorkerFailed as exc:
                self._mark_failed(clone, str(exc))
                raise CloneFailed(f"clone {clone_id} failed: {exc}") from None
            except WorkerError as exc:
                raise BadRequest(f"clone {clone_id}: snapshot failed: {exc}") from None
            files.commit()
            return files.paths
        finally:
            files.close()

    def delete_clone(self, clone_id: str) -> None:
        self._clone(clone_id)  # waits, outside the lock, if the lane's record of it is still to come
        with self.lock:
            clone = self._clone(clone_id, wait=False)
            del self.clones[clone_id]
            self.deleted.add(clone_id)
            if self.watched.pop(clone.worker.fileno(), None) is not None:
                try:
                    self.epoll.unregister(clone.worker.fileno())
                except (OSError, ValueError):
                    pass
            clone.shard.clones -= 1
            clone.image.clones -= 1
            self.lane.withdraw_clone(clone_id)  # an invocation in flight in the lane finishes first (below)
        self.lane.release()
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
            shard = runtime.assign_slot(worker)
        worker.image = ""  # not takeable as prepared until the pool has its reply
        with shard.connect() as connection:
            return worker.send_request({"op": "recycle", "image": runtime.record.id, "timeout": 10.0}, b"",
                                       runtime.worker_fds(shard, connection))
