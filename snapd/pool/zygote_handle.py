"""The daemon's handle on the zygote process: start it, ask it to fork workers, tell it what to preload.

A worker is asked for with one "fork" message to the zygote (snapd.pool.zygote) carrying one end of a new
SEQPACKET pair; the worker reports "ready" on that pair once its VM shell is built (the warm pool, snapd.pool.pool,
reads that hello). ``PoolError`` (no worker could be had) is raised here and by the pool.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from snapd.pool import protocol
from snapd.pool.jail import WorkerJail
from snapd.pool.worker_handle import WorkerHandle, process_start_time, readable
from vmm.prebuilt import VmShape

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PoolError(RuntimeError):
    """No worker could be had (the zygote died, every fork failed, or none came in time)."""


class Zygote:
    """The zygote child process and its control channel. A zygote that died is replaced by ``ensure`` (the pool's
    refill thread calls it, woken by the control channel's hang-up); the images it was told to preload are told to
    the new one. Workers it forked live on: they are the daemon's, not the zygote's."""

    def __init__(self, jail: WorkerJail, python: str = sys.executable, start_timeout: float = 60.0,
                 on_start=None):
        self.jail = jail
        self.python = python
        self.start_timeout = start_timeout
        self.on_start = on_start or (lambda zygote, old_pid: None)  # the daemon's records
        self.lock = threading.Lock()
        self.preloads: dict[str, str] = {}  # image -> state path, for a replacement zygote
        self.restarts = 0
        self._start()
        self.on_start(self, 0)

    def _start(self) -> None:
        ours, theirs = protocol.channel_pair()
        # Only what Python needs to find our code: the daemon's environment (its tokens, say) stays out of the
        # zygote and so out of every worker's /proc/PID/environ.
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
        self.control = ours
        try:
            self.process = subprocess.Popen([self.python, "-m", "snapd.pool.zygote", "--control-fd",
                                             str(theirs.fileno()), "--jail", json.dumps(self.jail.zygote_settings())],
                                            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        if not readable(ours, self.start_timeout):
            self.close()
            raise PoolError(f"the zygote did not start within {self.start_timeout} s")
        try:
            hello, _, _ = protocol.recv(ours)
        except protocol.ProtocolError as exc:
            self.close()
            raise PoolError(f"the zygote failed to start: {exc}") from None
        self.pid = hello["pid"]
        self.start_time = process_start_time(self.pid)

    def alive(self) -> bool:
        return self.process.poll() is None and not readable(self.control, 0)  # it never speaks after its hello

    def ensure(self) -> bool:
        """Replace the zygote if it died; True if it was replaced. Raises PoolError if no new one starts."""
        with self.lock:
            if self.alive():
                return False
            old_pid = self.pid
            self.close()
            self._start()
            self.restarts += 1
            for image, state_path in self.preloads.items():
                self._send({"op": "preload", "image": image, "state_path": state_path})
        self.on_start(self, old_pid)
        return True

    def _send(self, message: dict) -> None:
        """A message that needs no answer (lock held): a dead zygote is simply replaced later."""
        try:
            protocol.send(self.control, message)
        except OSError:
            pass

    def fork_worker(self, shape: VmShape) -> WorkerHandle:
        try:
            lease = self.jail.lease(shape.vcpu_count, shape.mem_size_mib)
        except OSError as exc:  # JailError: no free uid, or the cgroup could not be made
            raise PoolError(f"no jail for a new worker: {exc}") from None
        ours, theirs = protocol.channel_pair()
        try:
            with self.lock:
                protocol.send(self.control, {"op": "fork", "vcpu_count": shape.vcpu_count,
                                             "mem_size_mib": shape.mem_size_mib, **lease.fork_fields()},
                              fds=[theirs.fileno()])
        except OSError as exc:
            ours.close()
            self.jail.release(lease)
            raise PoolError(f"the zygote is gone: {exc}") from None
        finally:
            theirs.close()
        return WorkerHandle(ours, shape, lease)

    def preload(self, image: str, state_path: str) -> None:
        """Parse ``image``'s state once, in the zygote, for every worker forked after (an optimisation: a worker
        without it reads the state itself; a zygote gone meanwhile is told again when it is replaced)."""
        with self.lock:
            self.preloads[image] = state_path
            self._send({"op": "preload", "image": image, "state_path": state_path})

    def forget(self, image: str) -> None:
        with self.lock:
            self.preloads.pop(image, None)
            self._send({"op": "forget", "image": image})

    def close(self) -> None:
        self.control.close()  # EOF: the zygote leaves its loop
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
