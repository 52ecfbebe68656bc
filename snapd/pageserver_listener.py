"""The page server's listener: accepts VMM connections on a socket path and attaches each VM to the server.

A ``Listener`` runs one Python accept thread per socket; each VMM's Firecracker handshake (uffd + regions) is
received there and the VM attached to the PageServer with the listener's image, mode and loading set. A bad VMM
is answered with an error and does not stop the listener. snapd.pageserver re-exports it.
"""
from __future__ import annotations

import os
import socket
import threading
from typing import TYPE_CHECKING

from snapd import uffd_handshake as hs
from snapd.loadset import LoadingSet, LoadingSetError
from snapd.pageserver_image import Image

if TYPE_CHECKING:
    from snapd.pageserver import PageServer
    from snapd.pageserver_staging import Stage


class Listener:
    """Accepts VMM connections on a socket path and attaches each to the server (a Python thread)."""

    def __init__(self, server: "PageServer", sock_path: str, image: Image, mode: str, minor: bool = False,
                 loading_set: LoadingSet | None = None,
                 record: bool = False, stage: "Stage | None" = None):
        self.server, self.sock_path, self.image, self.mode, self.minor = server, sock_path, image, mode, minor
        self.loading_set, self.record = loading_set, record
        self.stage = stage  # the loading set staged ahead of the restore (owned: closed with the listener)
        self.loading_set_error: LoadingSetError | None = None  # set when a loading set was refused
        self.vm_ids: list[int] = []
        self._attached = threading.Condition()
        self.errors: list[Exception] = []
        self._sock = hs.listen(sock_path)
        self._thread = threading.Thread(target=self._accept_loop, name=f"snapd-accept:{sock_path}",
                                        daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed by close()
            try:
                uffd_fd, regions = hs.recv_handshake(conn)
                vm_id = self.server.attach(self.image, uffd_fd, conn, regions, self.mode, self.minor,
                                           loading_set=self.loading_set, record=self.record, stage=self.stage)
                with self._attached:
                    self.vm_ids.append(vm_id)
                    self._attached.notify_all()
            except Exception as e:  # a bad VMM must not stop the listener
                self.errors.append(e)
                hs.send_message(conn, {"error": f"handshake rejected: {e}"})
                conn.close()

    def wait_for_vms(self, n: int, timeout: float = 5.0) -> list[int]:
        """The ids of the first n VMs attached through this listener (ready may arrive first)."""
        with self._attached:
            if not self._attached.wait_for(lambda: len(self.vm_ids) >= n, timeout):
                raise TimeoutError(f"{len(self.vm_ids)} of {n} VMs attached on {self.sock_path}")
            return self.vm_ids[:n]

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)
        if self.stage is not None and not self._thread.is_alive():
            self.stage.close()  # VMs attached with it keep the buffer until they close
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
