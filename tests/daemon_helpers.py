"""Shared by the daemon tests: a hello snapshot, an in-process daemon serving its API on a Unix socket."""
import os
import threading

from vmm.snapshot import snapshot_builtin_guest
from snapd.client import SnapdClient
from snapd.daemon.core import Daemon, DaemonConfig
from snapd.daemon.http import SnapdUnixServer

MEM_MIB = 64


class RunningDaemon:
    """The tests write their snapshots beside the state directory: its parent is an import root (the API reads
    only beneath import roots, snapd.daemon.paths) unless ``import_roots`` says otherwise."""

    def __init__(self, state_dir: str, **config):
        self.socket_path = os.path.join(state_dir, "snapd.sock")
        config.setdefault("import_roots", (os.path.dirname(os.path.abspath(state_dir)),))
        self.daemon = Daemon(DaemonConfig(state_dir=state_dir, **config), self.socket_path)
        self.server = SnapdUnixServer(self.socket_path, self.daemon)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.client = SnapdClient(self.socket_path)

    def close(self) -> None:
        self.client.close()
        self.server.shutdown()
        self.server.server_close()
        self.daemon.close()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)


def clone_memory(daemon: RunningDaemon, clone_id: str, mem_mib: int = MEM_MIB) -> bytes:
    """Guest memory as the clone sees it, read by its worker (pages not yet fetched fault through the page
    server, as a guest access would)."""
    worker = daemon.daemon._clone(clone_id).worker
    pieces = []
    for gpa in range(0, mem_mib << 20, 1 << 20):
        _, data = worker.request({"op": "read_memory", "gpa": gpa, "size": 1 << 20})
        pieces.append(data)
    return b"".join(pieces)


def hello_snapshot(directory) -> tuple[str, str]:
    return snapshot_builtin_guest(str(directory), MEM_MIB, "workload=hello", "hello")


def write_process_memory(pid: int, address: int, data: bytes) -> None:
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(address)
        mem.write(data)


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def worker_processes(zygote_pid: int, daemon_pid: int | None = None) -> set[int]:
    """The daemon's worker processes: forked by the zygote, and, when jailed, handed to the daemon (their
    subreaper) once the parent that forked them into their pid namespace left."""
    found = set()
    for pid in children(zygote_pid) | children(daemon_pid or os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"snapd.pool.zygote" in f.read() and pid != zygote_pid:
                    found.add(pid)
        except OSError:
            pass
    return found


def thread_count(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads line")
