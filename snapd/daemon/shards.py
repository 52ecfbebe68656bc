"""An image's runtime in the daemon: its page-server shards, each one C fault loop and one shared memfd.

The C page server serves at most SNAPD_MAX_VMS VMs per instance, so an image gets another shard (another server
and memfd) once its shards are full. ``ImageRuntime`` holds an image's record, chunk table and shards, and
counts its clones; ``Shard`` counts the page-server slots taken on it and reports its faults and memfd size.
"""
from __future__ import annotations

import os
import socket

from snapd.daemon.images import ImageRecord
from snapd.pageserver import ChunkTable, Image, Listener, PageServer
from snapd.uffd import lib as uffd_lib

# The C page server serves at most SNAPD_MAX_VMS VMs per instance; an image gets another shard (another
# server and memfd) beyond that. Some slots stay spare: a deleted clone's slot is freed when its VMM is gone.
VMS_PER_SHARD = uffd_lib.SNAPD_MAX_VMS - 16


class Shard:
    """One page server (its own C fault loop) and its copy of the image in one memfd."""

    def __init__(self, record: ImageRecord, table: ChunkTable, sock_path: str, huge_dir: str | None = None):
        self.server = PageServer().start()
        try:
            self.image: Image = self.server.add_image(table, shared=True, huge_dir=huge_dir)
            self.listener: Listener = self.server.serve(sock_path, self.image, "lazy")
        except BaseException:
            self.server.close()
            raise
        self.sock_path = sock_path
        self.clones = 0

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A connection to this shard's page server for a worker, which sends its userfaultfd over it: a jailed
        worker can reach no socket by name, so the daemon connects and hands the socket over."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(self.sock_path)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock

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
    def __init__(self, record: ImageRecord, run_dir: str, huge_dir: str | None = None):
        self.record = record
        self.table = ChunkTable.from_base_image(record.image_path)
        self.run_dir = run_dir
        self.huge_dir = huge_dir
        self.shards: list[Shard] = []
        self.clones = 0
        self.deleting = False
        # The daemon's copy of the state file, open for good: workers read the state from it (they open nothing)
        self.state_fd = os.open(record.state_path, os.O_RDONLY | os.O_CLOEXEC)

    def worker_fds(self, shard: Shard, connection: socket.socket) -> tuple[int, int, int]:
        """What a worker restoring this image is sent (snapd.pool.worker RESTORE_FDS): the shard's memfd, a
        connection to its page server, the state file."""
        return shard.image.memfd, connection.fileno(), self.state_fd

    def shard_for_new_clone(self) -> Shard:
        """Called with the daemon lock held."""
        for shard in self.shards:
            if shard.clones < VMS_PER_SHARD:
                return shard
        sock = os.path.join(self.run_dir, f"ps-{self.record.id}-{len(self.shards)}.sock")
        shard = Shard(self.record, self.table, sock, self.huge_dir)
        self.shards.append(shard)
        return shard

    def assign_slot(self, worker) -> Shard:
        """A page-server slot of a shard for ``worker`` (it will restore this image), counted from now on and
        freed when the worker is gone or its clone deleted. Called with the daemon lock held."""
        shard = self.shard_for_new_clone()
        shard.clones += 1
        worker.shard = shard
        return shard

    def huge_pages(self) -> bool:
        """Whether the image's shared copies are on 2 MiB pages."""
        return bool(self.shards) and all(shard.image.huge for shard in self.shards)

    def huge_refused(self) -> str:
        """Why the daemon's huge pages were not used for this image ("" if they were, or are off)."""
        return next((shard.image.huge_refused for shard in self.shards if shard.image.huge_refused), "")

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
        self.shards.clear()
        if self.state_fd >= 0:
            os.close(self.state_fd)
            self.state_fd = -1
