"""The daemon's side of the restore lane (snapd/csrc/lane_daemon.c): tickets, the clone count, connections.

A ticket is a held prepared worker (worker.py ``_prepare`` said "held") put on the lane's board by the pool as
it becomes prepared, with the clone it will become already named and its JSON fields rendered. A
``POST /v1/clones`` for that image is then read, restored and answered in C (``LaneConnection.serve``), and the
daemon records the clone afterwards (CloneOps.lane_served). Whoever else wants a prepared worker first takes
its ticket back (``claim``), so a worker is never the lane's and Python's at once. The board also counts live
clones against max_clones for both paths (``reserve`` / ``release``).

A live clone has a ticket too (``offer_clone``, as the daemon records it): its invocations are read, sent to
its worker and answered in C, under the worker channel's lock that Python's requests take as well
(WorkerHandle.lock). The ticket is withdrawn before the worker is let go (``withdraw_clone``); one withdrawn
while an invocation holds it goes when that invocation is over.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import secrets
import threading

from snapd._lane_native import ffi, lib

log = logging.getLogger("snapd")

EOF_ = lib.LANE_CONN_EOF
SLOW = lib.LANE_CONN_SLOW
SERVED = lib.LANE_CONN_SERVED
HANDOFF = lib.LANE_CONN_HANDOFF
INVOKE = lib.LANE_REQ_INVOKE  # lane_served.kind of a live clone's invocation


@dataclasses.dataclass
class Ticket:
    token: int
    worker: object  # WorkerHandle
    image_id: str
    clone_id: str
    request_id: int


def new_clone_id() -> str:
    return "c-" + secrets.token_hex(6)


def clone_endpoints(socket_path: str, clone_id: str) -> dict:
    return {"socket": socket_path, "invoke": f"/v1/clones/{clone_id}/invoke",
            "snapshot": f"/v1/clones/{clone_id}/snapshot"}


def render_fields(clone_id: str, image_id: str, pid: int, socket_path: str, timings: dict) -> str:
    """The clone's JSON fields known before its restore (Clone.to_json's, less created, restore_us and the
    generation's timing), left open inside "timings_us" for the C side to finish."""
    known = json.dumps({"id": clone_id, "image": image_id, "state": "running", "error": "", "pid": pid,
                        "endpoints": clone_endpoints(socket_path, clone_id)})
    timings_open = json.dumps({k: round(v, 1) for k, v in timings.items()})[:-1]
    return f'{known[1:-1]}, "timings_us": {timings_open}{", " if timings else ""}'


class DaemonLane:
    def __init__(self, capacity: int, server: str, socket_path: str, enabled: bool = True):
        self.board = ffi.gc(lib.lane_board_new(capacity, server.encode()), lib.lane_board_free)
        self.enabled = enabled
        self.socket_path = socket_path
        self.lock = threading.Condition()
        self.tickets: dict[int, Ticket] = {}     # token -> ticket, offered or taken and not yet settled
        self.by_clone: dict[str, Ticket] = {}
        self.closed_images: set[str] = set()     # being deleted: no ticket of theirs is offered or taken
        self.tokens = itertools.count(1)
        self.clone_tickets: dict[str, int] = {}               # live clone id -> its ticket's token
        self.live_tokens: dict[int, object] = {}              # token -> the Clone, until its ticket is freed
        self.closing: set[int] = set()                        # withdrawn while taken: freed when untaken

    # -- the clone count, both paths
    def reserve(self) -> bool:
        return bool(lib.lane_board_reserve(self.board))

    def release(self) -> None:
        lib.lane_board_release(self.board)

    # -- tickets
    def offer(self, worker, image_id: str) -> None:
        """Put a just-prepared worker on the board (the pool calls this with its lock held, as it queues the
        worker: no one can have taken it yet)."""
        prepared = worker.prepared
        if not self.enabled or not prepared.get("held") or worker.pid <= 0:
            return
        token, clone_id = next(self.tokens), new_clone_id()
        fields = render_fields(clone_id, image_id, worker.pid, self.socket_path, prepared.get("timings", {}))
        ticket = Ticket(token, worker, image_id, clone_id, worker.next_request_id())
        data = fields.encode()
        with self.lock:  # in Python's books first: the C side may take it the moment it is on the board
            if image_id in self.closed_images:
                return
            self.tickets[token] = ticket
            self.by_clone[clone_id] = ticket
            worker.lane_token = token
            rc = lib.lane_board_offer(self.board, token, image_id.encode(), worker.fileno(),
                                      prepared.get("req_cap", 0), ticket.request_id, data, len(data))
        if rc < 0:
            self._forget(token)
            log.warning("the lane did not take worker %d for %s: %s", worker.pid, image_id, os.strerror(-rc))

    def claim(self, worker) -> bool:
        """Take a prepared worker's ticket back before anyone else uses it; False: the lane has taken it (it is
        becoming a clone: leave it alone)."""
        token = worker.lane_token
        if not token:
            return True
        if lib.lane_board_withdraw(self.board, token) == lib.LANE_TICKET_TAKEN:
            return False
        worker.lane_token = 0
        self._forget(token)
        return True

    def ticket(self, token: int) -> Ticket:
        with self.lock:
            return self.tickets[token]

    def settle(self, token: int) -> None:
        """The taken ticket's outcome is recorded (the clone, or its failure): the board forgets it."""
        lib.lane_board_settle(self.board, token)
        self._forget(token)

    def _forget(self, token: int) -> None:
        with self.lock:
            ticket = self.tickets.pop(token, None)
            if ticket is not None:
                self.by_clone.pop(ticket.clone_id, None)
                if ticket.worker.lane_token == token:  # not a newer ticket of the same (reused) worker
                    ticket.worker.lane_token = 0
            self.lock.notify_all()

    def wait_if_in_flight(self, clone_id: str, timeout: float) -> None:
        """A clone the lane has answered for may be asked about (on another connection) before the daemon has
        recorded it: wait for that, not answer 404."""
        with self.lock:
            ticket = self.by_clone.get(clone_id)
            if ticket is None or not lib.lane_board_taken(self.board, ticket.token):
                return
            self.lock.wait_for(lambda: clone_id not in self.by_clone, timeout)

    def close_image(self, image_id: str) -> int:
        """Stop offering and taking the image's tickets (it is being deleted); returns how many are taken and
        not settled (restores in flight)."""
        with self.lock:  # serialised with offer: a ticket offered after this would not be marked closed
            self.closed_images.add(image_id)
            return lib.lane_board_close_image(self.board, image_id.encode(), 1)

    def reopen_image(self, image_id: str) -> None:
        with self.lock:
            self.closed_images.discard(image_id)
            lib.lane_board_close_image(self.board, image_id.encode(), 0)

    # -- live clones
    def offer_clone(self, clone, image_id: str) -> None:
        """Let the lane answer the recorded clone's invocations (the daemon calls this under its lock, as it
        records the clone: a DELETE cannot come between). Its req_cap, when the prepare reply gave one, sends a
        larger payload the Python way (a 400 there); otherwise the worker refuses it. ``clone``: its .id and
        .worker are what the lane needs (snapd.daemon.clones.Clone)."""
        if not self.enabled:
            return
        clone_id, worker = clone.id, clone.worker
        token = next(self.tokens)
        req_cap = worker.prepared.get("req_cap") or (1 << 20)
        with self.lock:
            self._sweep_locked()
            rc = lib.lane_board_offer_clone(self.board, token, clone_id.encode(), image_id.encode(), worker.fileno(),
                                            worker.lock.native, req_cap, (1 << 62) + (token << 32))
            if rc == 0:
                self.clone_tickets[clone_id] = token
                self.live_tokens[token] = clone  # its worker (and the worker's lock) live while C may use them
        if rc < 0:
            log.warning("the lane did not take clone %s: %s", clone_id, os.strerror(-rc))

    def withdraw_clone(self, clone_id: str) -> None:
        """Off the board, before the clone's worker is let go. An invocation the lane has in flight finishes (it
        holds the worker channel's lock, which stopping or recycling the worker waits for); its ticket goes
        then, never offered again."""
        with self.lock:
            token = self.clone_tickets.pop(clone_id, None)
            if token is not None and lib.lane_board_withdraw(self.board, token) == lib.LANE_TICKET_TAKEN:
                self.closing.add(token)
            elif token is not None:
                self.live_tokens.pop(token, None)

    def withdraw_worker(self, worker) -> None:
        """Every clone ticket of ``worker`` off the board (before it is stopped)."""
        with self.lock:
            clone_ids = [clone.id for clone in self.live_tokens.values() if clone.worker is worker]
        for clone_id in clone_ids:
            self.withdraw_clone(clone_id)

    def _sweep_locked(self) -> None:
        """Forget the tickets withdrawn while taken that the lane has since let go of."""
        for token in [t for t in self.closing if not lib.lane_board_taken(self.board, t)]:
            self.closing.discard(token)
            self.live_tokens.pop(token, None)

    def clone_ticket(self, token: int):
        """The clone whose ticket the lane has taken (it stays known until the ticket is let go)."""
        with self.lock:
            return self.live_tokens[token]

    def invocations(self) -> int:
        """Live invocations the lane answered (counted in C before the answer is written)."""
        return lib.lane_board_invocations(self.board)

    def untake_clone(self, token: int) -> None:
        """A live invocation the lane handed to Python is over: the ticket is offered again (or goes, if it was
        withdrawn meanwhile)."""
        lib.lane_board_untake(self.board, token)
        with self.lock:
            self._sweep_locked()

    def connection(self, fd: int) -> "LaneConnection":
        return LaneConnection(self, fd)


class LaneBuffer:
    """The lane's input buffer of one connection: what it read and did not serve (``take``), what Python read
    beyond a request it served (``push``), and a HANDOFF's data."""

    def __init__(self, conn):
        self.conn = conn  # struct lane_conn *

    def take(self) -> bytes:
        size = lib.lane_conn_pending(self.conn)
        buffer = ffi.new("uint8_t[]", max(size, 1))
        n = lib.lane_conn_take(self.conn, buffer, size)
        return ffi.unpack(ffi.cast("char *", buffer), n)

    def push(self, data: bytes) -> None:
        if lib.lane_conn_push(self.conn, data, len(data)) < 0:
            raise ConnectionResetError("more pipelined bytes than the lane buffers")

    def data(self, out) -> bytes:
        """HANDOFF: the request's payload (stage UNSENT, SENT) or the worker's error text (REFUSED)."""
        return ffi.unpack(ffi.cast("char *", lib.lane_conn_data(self.conn)), out.data_len)


class LaneConnection(LaneBuffer):
    """One client connection read through the lane with blocking reads (the tests drive the lane this way; the
    daemon's connections are read without blocking by its connection server, snapd/csrc/lane_server.c, and
    reach Python as LaneBuffer); what it does not serve is handed to http_wire."""

    def __init__(self, lane: DaemonLane, fd: int):
        self.lane = lane
        conn = ffi.gc(lib.lane_conn_new(fd), lib.lane_conn_free)
        if conn == ffi.NULL:
            raise OSError("could not map the lane's connection buffers")
        super().__init__(conn)
        self.out = ffi.new("struct lane_served *")

    def serve(self) -> int:
        """Read the next request (the GIL released): EOF_, SLOW (take() has its bytes), SERVED or HANDOFF."""
        kind = lib.lane_conn_serve(self.conn, self.lane.board, self.out)
        if kind < 0:
            raise ConnectionResetError(-kind, os.strerror(-kind))
        return kind

    def data(self, out=None) -> bytes:
        return super().data(self.out if out is None else out)
