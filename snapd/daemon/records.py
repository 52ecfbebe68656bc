"""What the daemon started, recorded in its state directory so a restarted daemon leaves nothing unaccounted.

One small JSON file per process (``run/procs/PID.json``: pid, start time, role). Written when a worker becomes
ready (off the restore path), removed when the daemon stops it. A daemon starting up stops every recorded
process that is still the same process (pid and start time match): the page server that served those clones'
memory died with the previous daemon, so they cannot be re-adopted safely (docs/snapd.md, "Restart").
"""
from __future__ import annotations

import json
import os
import signal
import time

from snapd.pool.worker_handle import proc_stat, process_start_time


class ProcessRecords:
    def __init__(self, run_dir: str):
        self.dir = os.path.join(run_dir, "procs")
        os.makedirs(self.dir, exist_ok=True)

    def _path(self, pid: int) -> str:
        return os.path.join(self.dir, f"{pid}.json")

    def add(self, pid: int, start_time: int | None, role: str) -> None:
        # Written and renamed but not fsynced: the record must survive the daemon dying, which the page cache
        # guarantees; a machine crash takes the recorded processes with it.
        path = self._path(pid)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": pid, "start_time": start_time, "role": role, "recorded": time.time()}, f)
        os.rename(tmp, path)

    def remove(self, pid: int) -> None:
        try:
            os.unlink(self._path(pid))
        except FileNotFoundError:
            pass

    def stop_leftovers(self, timeout: float = 5.0) -> list[dict]:
        """SIGKILL every recorded process that still runs; return the records of those stopped."""
        stopped = []
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if not name.endswith(".json"):
                os.unlink(path)
                continue
            try:
                with open(path) as f:
                    record = json.load(f)
                pid, start = int(record["pid"]), record.get("start_time")
            except (OSError, ValueError, KeyError, TypeError):
                os.unlink(path)
                continue
            if start is not None and process_start_time(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                    stopped.append(record)
                except ProcessLookupError:
                    pass
            os.unlink(path)
        deadline = time.monotonic() + timeout
        for record in stopped:  # gone from /proc once its parent (the old zygote, or init) reaped it
            while process_start_time(record["pid"]) == record["start_time"] and time.monotonic() < deadline:
                if _is_zombie(record["pid"]):
                    break
                time.sleep(0.01)
        return stopped


def _is_zombie(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is None or fields[0] == b"Z"
