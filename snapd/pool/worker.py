"""A warm VMM worker: one process, one prebuilt VM shell, one microVM once a restore request arrives.

Forked from the zygote (snapd.pool.zygote), the worker builds a PrebuiltVm for its shape (VM, memory slot over
a placeholder, irqchip, PIT, vCPUs parked in their threads) and tells the daemon it is ready. A restore then
only: maps the image's shared memfd MAP_PRIVATE over the placeholder, registers it with a userfaultfd and hands
that to the daemon's page server, writes the parsed snapshot state, releases the vCPUs and replies.

The main loop waits on the daemon channel; besides the vCPU threads, the Uffd backend's reader thread watches
the page server and reports its failure to the daemon as an event. EOF on the daemon channel means the daemon
is gone: the worker exits, so no VMM outlives the daemon that accounted for it.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time

from snapd.pool import held_lane, protocol
from snapd.uffd import UffdError, create_registered_uffd, unregister as uffd_unregister
from snapd.uffd_handshake import Region
from vmm.devices.fnport import FN_NEXT, FN_PORT_BASE, MAILBOX_HEADER
from vmm.errors import InvocationError, VmmError
from vmm.jail import host_pid
from vmm.machine import PAUSED, STOPPED
from vmm.native import ffi, lib
from vmm.prebuilt import PrebuiltVm, VmShape
from vmm.snapshot import create_snapshot_fds, machine_config_of, read_snapshot_fd, restore_into, resume_restored
from vmm.uffd_backend import UffdBackend, UffdBackendError


READ_MEMORY_MAX = 1 << 20
# After an invocation answered on the main thread, how long the guest may take to come back to its FN_NEXT read
# and be parked there (its next invocation then answered with no thread to wake, in C if the lane can); a guest
# busy for longer goes on on its vCPU thread. The lane's C side gets it when armed.
HOLD_BUDGET_S = 0.02
PAGE = 4096
MADV_POPULATE_WRITE = 23  # Linux 5.14+, <linux/mman.h>
# The descriptors of a prepare, recycle or full restore, in this order (the daemon's ImageRuntime.worker_fds).
RESTORE_FDS = ("the image memfd", "a page-server connection", "the state file")


def discard_console(data: bytes) -> None:
    """Guest console output of a clone is dropped: schedulers talk to it through invocations."""


class Worker:
    def __init__(self, channel: socket.socket, shape: VmShape, states: dict):
        self.channel = channel
        self.shape = shape
        self.states = states  # image id -> parsed MicrovmState (inherited from the zygote, or loaded here)
        self.prebuilt = PrebuiltVm(shape, serial_sink=discard_console)
        self.machine = None
        self.backend: UffdBackend | None = None
        self.image = ""
        self.prepared = None  # a machine restored ahead of a request for self.image, its guest held in FN_NEXT
        self.prepare_timings: dict = {}
        self.reuses = 0  # clones this worker ran before the current one (op recycle)
        self.held = False  # self.machine is paused by _prepare: resumed once the restore's reply is sent
        self.lane: held_lane.HeldLane | None = None  # the channel's reader; answers a held clone's restore in C
        self.lane_counts = {"served": 0, "fallbacks": 0}  # restores the lane answered, or handed to Python mid-way
        for image, state in list(states.items()):
            try:
                self._rehearse(state)
            except (VmmError, OSError) as exc:  # KVM refuses this image's state: its own restores will say so,
                states.pop(image, None)          # and every other image's workers must still come up
                print(f"snapd worker: image {image} cannot be restored: {exc}", file=sys.stderr)

    def _rehearse(self, state) -> None:
        """Run the restore's code over the parsed state once, before any request: a forked worker shares the
        zygote's pages copy-on-write, and the first touch of each object (a reference count) copies its page,
        a fault that costs microseconds on this nested host. Done here, those copies leave the restore path.
        Everything written now is overwritten by the real restore; the placeholder page the mailbox write
        touches is dropped by the remap."""
        if machine_config_of(state).mem_size_mib != self.shape.mem_size_mib or len(state.vcpus) != self.shape.vcpu_count:
            return
        machine = self.prebuilt.machine
        restore_into(machine, state, discard_console)
        uffd = create_registered_uffd([(r.host_addr, r.size) for r in machine.memory.regions], "missing")
        os.close(uffd)
        json.dumps([Region(r.host_addr, r.size, r.layout.file_offset).to_json() for r in machine.memory.regions])

    # -- the loop
    def serve(self) -> None:
        protocol.send(self.channel, {"event": "ready", "pid": host_pid()})
        self.lane = lane = held_lane.HeldLane(self.channel.fileno())
        while True:
            self._arm_lane()
            kind = lane.next()
            self._take_live_records()
            if kind == held_lane.SERVED:
                self._lane_served()
            elif kind == held_lane.FALLBACK:
                self._lane_fallback()
            elif kind == held_lane.EOF:
                return  # the daemon is gone
            else:
                try:
                    header, data, fds = lane.message()
                except protocol.PeerGone:
                    return
                self._dispatch(header, data, fds)

    def _take_live_records(self) -> None:
        """The live clone's invocations the lane served in C without returning (lane_held_serve's loop): into
        the function port's records, the dirty-page notes of the mailbox, and the counts."""
        served, seq, written = self.lane.take_live()
        if served and self.machine is not None:
            fnport = self.machine.fnport
            fnport.adopt(fnport.generation, seq)
            self.machine.memory.note_host_write(fnport.mailbox_gpa, MAILBOX_HEADER + written)
            self.lane_counts["served"] += served

    def _arm_lane(self) -> None:
        """Let the lane answer the next restore itself if a prepared clone is held in FN_NEXT (worker._prepare),
        or the next invocation if the live clone is parked there (_settle_held)."""
        if self._parked_in_next(self.prepared):
            self.lane.arm(self.prepared, self.image, park_budget=HOLD_BUDGET_S)
        elif self.held and self._parked_in_next(self.machine):
            self.lane.arm(self.machine, self.image, live=True, park_budget=HOLD_BUDGET_S)
        else:
            self.lane.disarm()

    def _parked_in_next(self, machine) -> bool:
        return (machine is not None and machine.state == PAUSED and machine.io_left_pending
                and len(machine.runners) == 1 and machine.runners[0].pending_word_read() == FN_PORT_BASE + FN_NEXT
                and machine.fnport.mailbox_gpa and not (self.backend is not None and self.backend.failures))

    def _dispatch(self, header: dict, data: bytes, fds: list[int]) -> None:
        op = header.get("op")
        try:
            if op == "restore" and header.get("prepared"):
                reply, out = self._restore_prepared(header, data)
            elif op == "restore":
                reply, out = self._restore(header, data, fds)
            elif op == "prepare":
                reply, out = self._prepare(header, fds), b""
            elif op == "recycle":
                reply, out = self._recycle(header, fds), b""
            elif op == "invoke":
                reply, out = self._invoke(data, header.get("timeout", 10.0), here=self.held)
            elif op == "snapshot":
                reply, out = self._snapshot(header, fds), b""
            elif op == "preload":
                if self.machine is None and self.prepared is None and len(fds) == 1:
                    self._rehearse(self._state(header["image"], fds[0]))
                return  # no reply: sent to idle workers in the background
            elif op == "read_memory":
                reply, out = self._read_memory(header["gpa"], header["size"])
            elif op == "status":
                reply, out = self._status(), b""
            elif op == "stop":
                os._exit(0)
            else:
                reply, out = {"ok": False, "error": f"unknown operation {op!r}", "kind": "protocol"}, b""
        except (VmmError, OSError, KeyError) as exc:
            reply, out = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "kind": "vmm"}, b""
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._reply(header, reply, out)

    def _reply(self, header: dict, reply: dict, out: bytes) -> None:
        reply["id"] = header.get("id", 0)
        if header.get("lane"):
            protocol.send_raw(self.channel, protocol.encode_lane_reply(reply, out))
        else:
            protocol.send(self.channel, reply, out)
        self._settle_held()  # after the reply: the daemon (and the client) need not wait for it

    def _settle_held(self, first=None) -> None:
        """A held clone whose invocation ran on this thread goes back to its FN_NEXT read and is parked there
        again (Microvm.hold_at_next), so that its next invocation needs no thread hand-off either; one that does
        not get there in HOLD_BUDGET_S, or has more vCPUs, goes on on its vCPU thread. ``first``: the exit the
        lane left pending, dispatched before."""
        machine = self.machine
        if not self.held or machine is None or machine.state != PAUSED:
            return
        if first is None and self._parked_in_next(machine):
            return  # still in (or back in) the read it was held in
        if len(machine.runners) == 1 and not machine.stop_requested:
            if machine.hold_at_next(time.monotonic() + HOLD_BUDGET_S, first):
                return
        self._release_held()

    def _release_held(self) -> None:
        """Give a held clone's vCPU back to its thread (it waits in FN_NEXT again, or finishes an invocation
        that outlived run_here's deadline)."""
        machine = self.machine
        if self.held and machine is not None:
            self.held = False
            if machine.state == PAUSED and not machine.stop_requested:
                try:
                    machine.resume()
                except VmmError:  # it stopped between the check and here (a guest fault's stop thread)
                    pass

    # -- operations
    def _state(self, image: str, state_fd: int):
        """The parsed state of ``image``: inherited from the zygote, or read once from the daemon's descriptor
        of its state file (a jailed worker opens no file by name)."""
        state = self.states.get(image)
        if state is None:
            state = self.states[image] = read_snapshot_fd(state_fd, f"the state file of image {image}")[0]
        return state

    def _prepare(self, header: dict, fds: list[int]) -> dict:
        """Everything of a restore that does not make the clone unique, done before any request: map the image's
        memfd, register it with the page server, write the snapshot's VM/vCPU/device state, and let the guest run
        up to its FN_NEXT, where the function port holds it (the guest only reads the mailbox's generation after
        FN_NEXT answers, docs/function-port.md). The restore request then writes a fresh generation and entropy
        and hands over the invocation. The vCPU's first KVM_RUN after the restore, kvmclock and the faults of
        the guest's way back to FN_NEXT are off the request's path too."""
        t0 = time.perf_counter()
        if self.machine is not None or self.prepared is not None:
            return {"ok": False, "error": "this worker is already in use", "kind": "protocol"}
        if len(fds) != len(RESTORE_FDS):
            return {"ok": False, "error": f"prepare needs {RESTORE_FDS}, got {len(fds)} fds", "kind": "protocol"}
        machine = self._restore_paused(header, fds, {})
        machine.fnport.ready.clear()
        resume_restored(machine)
        held = machine.fnport.ready.wait(header.get("timeout", 10.0))  # set when the guest reaches FN_NEXT
        if not held or machine.state == STOPPED or (self.backend is not None and self.backend.failures):
            why = machine.fault or machine.stop_reason or (self.backend.failures[0] if self.backend and
                                                          self.backend.failures else "no FN_NEXT in time")
            return {"ok": False, "error": f"prepared guest did not reach FN_NEXT: {why}", "kind": "vmm"}
        t1 = time.perf_counter()
        self._populate_hot_pages(machine)
        if len(machine.runners) == 1:
            # Parked in its FN_NEXT read, left pending: the request's first invocation then answers that read and
            # runs the vCPU on this thread (Microvm.invoke_paused), not handed to the vCPU thread and back.
            machine.pause(complete_io=False)
        self.prepared = machine
        t2 = time.perf_counter()
        self.prepare_timings = {"prepare_us": (t1 - t0) * 1e6, "populate_us": (t2 - t1) * 1e6}
        # What the daemon records for the clone this becomes, known now: a lane restore's reply carries only
        # what the restore itself makes (generation, first reply). "held": the daemon may send LANE_RESTORE.
        return {"ok": True, "pid": host_pid(), "held": machine.state == PAUSED, "req_cap": machine.fnport.req_cap,
                "timings": self.prepare_timings,
                "regions": [[r.guest_phys_addr, r.size, r.host_addr] for r in machine.memory.regions]}

    def _populate_hot_pages(self, machine) -> None:
        """Break copy-on-write, ahead of the request, for the pages every invocation writes: the mailbox (the
        VMM writes the request into it, the guest its reply) and the page under the held vCPU's stack pointer
        (the built-in guest is identity-mapped; for another guest a wrong guess costs one private page).
        MADV_POPULATE_WRITE faults the pages in writable without changing a byte, so it is safe while other
        vCPUs run. Measured in-process (512 MiB hello guest, median of 15): first invocation 410 -> 280 us; the
        rest of its extra cost is the guest's first touches of its handler's pages under this nested KVM."""
        fnport = machine.fnport
        ranges = []
        if fnport.mailbox_gpa:
            ranges.append((fnport.mailbox_gpa, MAILBOX_HEADER + fnport.req_cap + fnport.resp_cap))
        try:
            rsp = machine.vcpus[0].get_regs().rsp  # the vCPU thread waits in the function port, not in KVM_RUN
            ranges.append(((rsp & ~(PAGE - 1)) - PAGE, 2 * PAGE))
        except VmmError:
            pass
        for gpa, size in ranges:
            start, end = gpa & ~(PAGE - 1), (gpa + size + PAGE - 1) & ~(PAGE - 1)
            if not machine.memory.contains(start, end - start):
                continue
            address = int(ffi.cast("uintptr_t", machine.memory.host_pointer(start, end - start)))
            lib.vmm_madvise(ffi.cast("void *", address), end - start, MADV_POPULATE_WRITE)  # best effort

    def _recycle(self, header: dict, fds: list[int]) -> dict:
        """The daemon deleted this worker's clone and reuses the worker for another clone of the same image: stop
        the vCPUs, drop the userfaultfd and the page-server connection, and prepare again on the same VM (no
        fork, no VM build, no VM teardown). The new clone starts from the image's state exactly as a fresh one:
        the memfd is mapped again over the whole guest memory (MAP_FIXED drops every private page the old clone
        wrote, and KVM's MMU notifier its mappings of them), and the VM, vCPU and device state is written whole
        from the snapshot; the restore request then gives it a new generation and entropy as usual. A clone that
        failed (guest fault, page-server error, stopped VM) is refused here: the daemon then retires the worker."""
        t0 = time.perf_counter()
        machine = self.machine
        if machine is None or self.prepared is not None:
            return {"ok": False, "error": "this worker runs no clone to recycle", "kind": "protocol"}
        if len(fds) != len(RESTORE_FDS):
            return {"ok": False, "error": f"recycle needs {RESTORE_FDS}, got {len(fds)} fds", "kind": "protocol"}
        if header.get("image") != self.image:
            return {"ok": False, "error": f"this worker ran {self.image}, not {header.get('image')}",
                    "kind": "protocol"}
        backend = self.backend
        if (machine.state == STOPPED or machine.fault is not None or machine.stop_requested
                or (backend is not None and backend.failures) or machine.memory.inaccessible_reason):
            return {"ok": False, "error": "the clone failed: its worker is not reused", "kind": "vmm"}
        self._release_held()  # its parked read is completed before the VM is rewritten for the next clone
        machine.pause()
        if machine.state == STOPPED or machine.fault is not None:
            return {"ok": False, "error": "the clone stopped while it was paused", "kind": "vmm"}
        self.machine = None
        if machine.serial._irq_level:  # the next clone's UART starts with its line low, as a new VM's would
            machine._serial_irq(0)
        self.backend = None
        if backend is not None:
            # Unregister before closing: the page server's copy of the uffd would otherwise make the remap below
            # wait for it to read an UNMAP event. Closing the connection frees the server's slot for this VM.
            for region in machine.memory.regions:
                try:
                    uffd_unregister(backend.uffd, region.host_addr, region.size)
                except UffdError:
                    pass
            backend.close()
        machine.memory.backend = None
        self.prebuilt.used = False  # the shell is reused: _restore_paused remaps and rewrites all of it
        self.reuses += 1
        reply = self._prepare(header, fds)
        if reply.get("ok"):
            self.prepare_timings["recycle_us"] = (time.perf_counter() - t0) * 1e6
            self.prepare_timings["reuses"] = self.reuses
        return reply

    def _restore_prepared(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        t0 = time.perf_counter()
        machine = self.prepared
        if machine is None or header.get("image") != self.image:
            return {"ok": False, "error": f"this worker is not prepared for {header.get('image')}",
                    "kind": "protocol"}, b""
        if machine.state == STOPPED or (self.backend is not None and self.backend.failures):
            return {"ok": False, "error": f"the prepared clone failed: {machine.fault or machine.stop_reason}",
                    "kind": "vmm"}, b""
        self._take_prepared()
        # The guest waits in FN_NEXT (its vCPU thread in the function port, not running guest code): a new
        # generation and entropy now are what it sees with its first invocation.
        machine.fnport.new_generation()
        timings = {"new_generation_us": (time.perf_counter() - t0) * 1e6}
        return self._restored(machine, timings, header, payload, t0, prepared=True)

    def _take_prepared(self):
        """The prepared clone becomes the running one (still paused if held: released after the reply)."""
        machine, self.prepared = self.prepared, None
        self.machine = machine
        self.held = machine.state == PAUSED
        return machine

    def _lane_served(self) -> None:
        """The lane restored the held clone and ran its first invocation, or ran the live clone's next one, and
        sent the reply: records only, and the clone goes back to its FN_NEXT read."""
        res = self.lane.result
        self.lane_counts["served"] += 1
        machine = self.machine if res.flags & protocol.LANE_FLAG_LIVE else self._take_prepared()
        machine.fnport.adopt(res.generation, res.seq)
        self._note_lane_writes(machine, res)
        if res.exit_pending:  # the lane ran the guest on after its reply and met an exit it leaves to Python
            self._settle_held(machine.runners[0].dispatch_pending_exit)
        elif not res.parked:  # its budget ran out, a stop came or KVM_RUN failed: the vCPU thread carries on
            self._release_held()

    def _lane_fallback(self) -> None:
        """The lane handed the guest the first invocation, then met what it leaves to Python (an exit other than
        FN_DONE, the deadline, an error): carry the invocation on from there and answer the request."""
        res, t0 = self.lane.result, time.perf_counter()
        self.lane_counts["fallbacks"] += 1
        live = res.flags & protocol.LANE_FLAG_LIVE
        machine = self.machine if live else self._take_prepared()
        payload = self.lane.payload()
        invocation = machine.fnport.adopt(res.generation, res.seq, payload)
        self._note_lane_writes(machine, res)
        header = {"id": res.id, "lane": True, "invoke": True, "timeout": res.timeout_ns / 1e9}
        delivered = (invocation, res.deadline_ns / 1e9, bool(res.exit_pending))
        if live:
            reply, out = self._invoke(payload, header["timeout"], delivered=delivered)
        else:
            timings = {"new_generation_us": res.generation_ns / 1e3}
            reply, out = self._restored(machine, timings, header, payload, t0, prepared=True, delivered=delivered)
        self._reply(header, reply, out)

    @staticmethod
    def _note_lane_writes(machine, res) -> None:
        """The lane wrote the mailbox's generation (and the request): pages a diff snapshot must carry."""
        fnport = machine.fnport
        invoked = res.flags & protocol.LANE_FLAG_INVOKE
        machine.memory.note_host_write(fnport.mailbox_gpa, MAILBOX_HEADER + (res.payload_len if invoked else 0))

    def _restored(self, machine, timings: dict, header: dict, payload: bytes, t0: float,
                  prepared: bool = False, delivered=None) -> tuple[dict, bytes]:
        """The reply to a restore: what it made (the generation, its timings) and, when the request carried a
        payload, the first invocation's reply (run on this thread if the clone is held). Where the clone's memory
        is goes with a full restore only: a prepared clone's went with the prepare reply, with its timings."""
        reply = {"ok": True, "timings": timings, "generation": machine.fnport.generation}
        if not prepared:
            reply["regions"] = [[r.guest_phys_addr, r.size, r.host_addr] for r in machine.memory.regions]
        result = b""
        if header.get("invoke"):
            reply["invoke"], result = self._invoke(payload, header.get("timeout", 10.0), here=self.held,
                                                   delivered=delivered)
        reply["total_us"] = (time.perf_counter() - t0) * 1e6
        return reply, result

    def _restore_paused(self, header: dict, fds: list[int], marks: dict):
        """Remap, register with the page server, write the state; the vCPUs stay parked. ``fds``: RESTORE_FDS."""
        memfd, page_server_fd, state_fd = fds
        self.image = header["image"]
        state = self._state(self.image, state_fd)

        def register_with_page_server(machine) -> None:
            marks["remap"] = time.perf_counter()
            # Lazy mode: the server sends "ready" at once and serves faults as they come; a fault raised before
            # it has attached simply waits in the uffd, so the restore does not wait for that round trip.
            connection = socket.socket(fileno=os.dup(page_server_fd))  # the message's fds are closed after it
            self.backend = UffdBackend(machine.memory, connection)
            self.backend.set_failure_handler(lambda error: self._page_server_failed(machine, error))
            marks["uffd"] = time.perf_counter()

        marks["start"] = time.perf_counter()
        return self.prebuilt.restore(state, memfd, shared=False, before_state=register_with_page_server,
                                     resume=False)

    def _restore(self, header: dict, payload: bytes, fds: list[int]) -> tuple[dict, bytes]:
        t0 = time.perf_counter()
        if self.machine is not None or self.prepared is not None:
            return {"ok": False, "error": "this worker already runs a clone", "kind": "protocol"}, b""
        if len(fds) != len(RESTORE_FDS):
            return {"ok": False, "error": f"restore needs {RESTORE_FDS}, got {len(fds)} fds", "kind": "protocol"}, b""
        marks = {}
        machine = self._restore_paused(header, fds, marks)
        t2 = time.perf_counter()
        self.machine = machine
        resume_restored(machine)
        t3 = time.perf_counter()
        timings = {"state_lookup_us": (marks["start"] - t0) * 1e6, "remap_us": (marks["remap"] - marks["start"]) * 1e6,
                   "uffd_handshake_us": (marks["uffd"] - marks["remap"]) * 1e6,
                   "write_state_us": (t2 - marks["uffd"]) * 1e6, "resume_us": (t3 - t2) * 1e6}
        return self._restored(machine, timings, header, payload, t0)

    def _invoke(self, payload: bytes, timeout: float, here: bool = False, delivered=None) -> tuple[dict, bytes]:
        """One invocation; ``here``: the clone is held (paused), run its vCPU on this thread; ``delivered``:
        (invocation, deadline, exit_pending) the lane already handed the held guest (_lane_fallback)."""
        machine = self.machine
        if machine is None:
            return {"ok": False, "error": "no clone is running in this worker", "kind": "protocol"}, b""
        t0 = time.perf_counter()
        try:
            if here or delivered is not None:
                deadline = time.monotonic() + timeout
                if delivered is not None:  # the lane's clock started at its own delivery, not here
                    invocation, deadline, exit_pending = delivered
                    first = machine.runners[0].dispatch_pending_exit if exit_pending else None
                    machine.continue_paused(invocation, deadline, first)
                else:
                    invocation = machine.invoke_paused(payload, timeout)
                if not invocation.done.is_set():
                    self._release_held()  # the vCPU thread carries on (or the VM is stopping)
                if not invocation.done.wait(max(0.0, deadline - time.monotonic())):
                    raise InvocationError(f"invocation {invocation.seq} got no reply within {timeout:.3f} s")
                result = invocation.wait(0)
            else:
                result = machine.invoke(payload, timeout)
        except InvocationError as exc:
            stopped = machine.state == STOPPED or machine.stop_requested
            # vmm: the VM stopped under the call (the clone is broken); invocation: the guest refused this call
            kind = "vmm" if stopped else "timeout" if "no reply within" in str(exc) else "invocation"
            return {"ok": False, "error": str(exc), "kind": kind}, b""
        return {"ok": True, "latency_us": (time.perf_counter() - t0) * 1e6,
                "generation": machine.fnport.generation}, result

    def _snapshot(self, header: dict, fds: list[int]) -> dict:
        """A Full snapshot into the two files the daemon opened (state, memory: SCM_RIGHTS with the request): the
        worker opens no path (it may run where none can be opened); the daemon fsyncs and renames them."""
        machine = self.machine
        if machine is None:
            return {"ok": False, "error": "no clone is running in this worker", "kind": "protocol"}
        if len(fds) != 2:
            return {"ok": False, "error": f"a snapshot takes the state and memory files' descriptors, {len(fds)} "
                    "came", "kind": "protocol"}
        self._release_held()  # a parked read must be completed (by its vCPU thread) before the state is saved
        machine.pause()
        try:
            create_snapshot_fds(machine, fds[0], fds[1])
        finally:
            if machine.state != STOPPED:
                machine.resume()
        return {"ok": True}

    def _read_memory(self, gpa: int, size: int) -> tuple[dict, bytes]:
        """Guest memory as this clone sees it (diagnostics, tests). Read here, not through /proc/PID/mem: a page
        not yet fetched from the image raises its userfaultfd fault only for an access by this process."""
        if self.machine is None:
            return {"ok": False, "error": "no clone is running in this worker", "kind": "protocol"}, b""
        if size > READ_MEMORY_MAX:
            return {"ok": False, "error": f"read at most {READ_MEMORY_MAX} bytes at once", "kind": "protocol"}, b""
        return {"ok": True}, self.machine.memory.read(gpa, size)

    def _status(self) -> dict:
        machine = self.machine
        if machine is None:
            return {"ok": True, "state": "idle", "lane": self.lane_counts}
        state = "Running" if self.held and machine.state == PAUSED else machine.state  # parked between calls
        return {"ok": True, "state": state, "lane": self.lane_counts, "stop_reason": machine.stop_reason,
                "fault": str(machine.fault) if machine.fault else None}

    def _page_server_failed(self, machine, error: str) -> None:
        """The page server reported an error or died (called on the backend's reader thread, which then makes
        guest memory inaccessible): stop the VM and tell the daemon (one SEQPACKET message: atomic)."""
        if self.lane is not None:
            self.lane.disarm()  # a clone whose memory is going away is not restored in C
        machine.fail(UffdBackendError(error))
        try:
            protocol.send(self.channel, {"event": "failed", "error": error})
        except OSError:
            pass  # the daemon is gone (its page servers with it): the main loop sees the hang-up and exits


def run_worker(channel: socket.socket, shape: VmShape, states: dict) -> None:
    """A forked worker's whole life: build the VM shell, serve the daemon until its channel closes, exit.
    Never returns (the zygote's stack must not unwind in the child)."""
    # The main thread hands each invocation to a vCPU thread and waits for it: with the default 5 ms switch
    # interval a thread that wants the GIL back can wait that long (as the daemon, snapd/serve.py).
    sys.setswitchinterval(0.0002)
    try:
        worker = Worker(channel, shape, states)
    except (VmmError, OSError) as exc:
        try:
            protocol.send(channel, {"event": "error", "pid": host_pid(),  # the daemon reaps a jailed one
                                    "error": f"the worker could not build its VM: {exc}"})
        finally:
            os._exit(1)
    try:
        worker.serve()
    finally:
        os._exit(0)
