"""Guest memory served by a page server over userfaultfd (Firecracker's `Uffd` memory backend).

The VMM registers its guest memory with a new userfaultfd and hands the fd, with the region list, to the page
server listening at ``backend_path`` (docs/page-server.md). The connection stays open: the server reports
``ready`` and errors on it, and EOF means the server died. Either stops the VM with a clear error instead of
leaving a vCPU waiting forever on a fault nobody will serve.
"""
import os
import socket
import threading

from snapd.uffd import UffdError, create_registered_uffd
from snapd.uffd_handshake import PageServerDied, Region, ServerMessages, send_uffd
from vmm.errors import VmmError
from vmm.memory import PAGE_SIZE, GuestMemory
from vmm.native import ffi, lib


class UffdBackendError(VmmError):
    """The page server refused, failed or died."""


class UffdBackend:
    def __init__(self, memory: GuestMemory, backend: str | socket.socket, mode: str = "missing"):
        """``backend``: the page server's socket path, or a connection to it already made (a jailed worker is
        handed one: it reaches no socket by name)."""
        self.server_name = f"page server at {backend}" if isinstance(backend, str) else "page server"
        self.memory = memory
        self.closing = False  # our own close ends the connection too: that is not a server failure
        self.uffd = -1
        self.sock = None
        try:
            self.uffd = create_registered_uffd([(r.host_addr, r.size) for r in memory.regions], mode)
            regions = [Region(r.host_addr, r.size, r.layout.file_offset, PAGE_SIZE) for r in memory.regions]
            self.sock = send_uffd(backend, self.uffd, regions)
        except (OSError, UffdError) as exc:
            self.close()
            raise UffdBackendError(f"cannot hand guest memory to the {self.server_name}: {exc}") from None
        self.messages = ServerMessages(self.sock)
        for region in memory.regions:
            region.backing = "uffd"  # untouched pages hold image data, not zeros: snapshots must read them
        memory.backend = self
        self.failures = []
        self.on_failure = None
        self._settled = threading.Event()  # ready, or failed
        threading.Thread(target=self._read_messages, name="uffd-messages", daemon=True).start()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for the server's ``ready`` (in eager mode: every chunk installed); raise on its failure."""
        if not self._settled.wait(timeout):
            raise UffdBackendError(f"{self.server_name} was not ready within {timeout} s")
        if self.failures:
            raise UffdBackendError(self.failures[0])

    def write_while_attaching(self, write_state, timeout: float = 30.0) -> None:
        """``write_state()`` while the server attaches (a fault meanwhile, on the mailbox say, is simply served),
        then wait for its ``ready``. An error after the server reported a failure is that failure."""
        try:
            write_state()
            self.wait_ready(timeout)
        except Exception as exc:
            if self.failures and not isinstance(exc, UffdBackendError):
                raise UffdBackendError(self.failures[0]) from None
            raise

    def sever(self) -> None:
        """Cut guest memory off from the page server without ever showing the guest a wrong page.

        A vCPU waiting on a fault is not woken by a signal here. Closing the uffd wakes it, but its retried fault
        would then find plain anonymous memory (zeros); with the memory made inaccessible first, the retry fails
        and KVM_RUN returns an error instead. Host-side accesses go through vmm_self_read/write and fail too."""
        self.memory.inaccessible_reason = f"cut off from the {self.server_name}"
        for region in self.memory.regions:
            lib.vmm_mprotect(ffi.cast("void *", region.host_addr), region.size, lib.PROT_NONE)
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1

    def _fail(self, message: str) -> None:
        if self.closing:
            return
        self.failures.append(message)
        self._settled.set()
        if self.on_failure is not None:
            self.on_failure(message)  # first, so the VM's recorded fault is this one, not the vCPU's EFAULT
        self.sever()

    def _read_messages(self) -> None:
        """The one reader of the server's messages, for the whole life of the connection."""
        try:
            while self.sock is not None:
                for message in self.messages.read(timeout=None):
                    if "error" in message:
                        self._fail(f"{self.server_name}: {message['error']}")
                        return
                    if message.get("ready"):
                        self._settled.set()
        except PageServerDied as exc:
            self._fail(f"{self.server_name} died: {exc}")
        except (OSError, ValueError):
            if self.sock is not None:
                self._fail(f"lost the {self.server_name}")

    def set_failure_handler(self, on_failure) -> None:
        """``on_failure(message)`` from now on; called at once if the server already failed."""
        self.on_failure = on_failure
        if self.failures:
            on_failure(self.failures[0])

    def close(self) -> None:
        """Close the uffd before guest memory is unmapped: with the UNMAP event requested, munmap of registered
        memory waits for a reader of that event, and a dead server reads nothing."""
        self.closing = True
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(2)
            except OSError:
                pass
            sock.close()
