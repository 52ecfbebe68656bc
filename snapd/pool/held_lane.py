"""The worker's channel, read through the restore lane's C side (snapd/csrc/lane_held.c).

While a prepared one-vCPU clone is held in its FN_NEXT read, the lane is armed with where that clone's vCPU and
mailbox are; a LANE_RESTORE message for it is then answered in C (new generation, first invocation, reply) and
Python only brings its records up to date afterwards. The same for a live clone parked there between
invocations, and a LANE_RESTORE with LANE_FLAG_LIVE (its next invocation). Every other message, and a lane restore the C side cannot
take, comes back as a message for the worker's ordinary dispatch.
"""
from __future__ import annotations

import os
import socket

from snapd._lane_native import ffi, lib
from snapd.pool import protocol
from vmm.devices.fnport import FN_DONE, FN_NEXT, FN_PORT_BASE
from vmm.native import ffi as vmm_ffi
from vmm.vcpu_runner import install_alarm_handler

EOF = lib.LANE_HELD_EOF
MESSAGE = lib.LANE_HELD_MESSAGE
SERVED = lib.LANE_HELD_SERVED
FALLBACK = lib.LANE_HELD_FALLBACK


def _address(pointer) -> int:
    return int(vmm_ffi.cast("uintptr_t", pointer))


class HeldLane:
    def __init__(self, channel_fd: int):
        self.channel = ffi.gc(lib.lane_channel_new(channel_fd), lib.lane_channel_free)
        if self.channel == ffi.NULL:
            raise OSError("could not map the lane's message buffers")
        self.buffer = lib.lane_channel_buffer(self.channel)
        self.held = ffi.new("struct lane_held *")
        self.result = ffi.new("struct lane_held_result *")
        install_alarm_handler()  # the lane bounds the guest with SIGALRM, as run_here does

    def arm(self, machine, image: str, live: bool = False, park_budget: float = 0.02) -> None:
        """``machine`` (paused, its one vCPU parked in FN_NEXT, the read left pending) may be answered in C: its
        restore (a prepared clone), or with ``live`` its next invocation (the worker's running clone). After
        its reply the guest gets ``park_budget`` seconds to come back to FN_NEXT and be parked there again."""
        fnport, held = machine.fnport, self.held
        held.live, held.generation, held.park_budget_ns = live, fnport.generation, int(park_budget * 1e9)
        held.vcpu_fd = machine.vcpus[0].fd
        held.run = ffi.cast("void *", _address(machine.vcpus[0].run))
        held.mailbox = _address(machine.memory.host_pointer(fnport.mailbox_gpa))
        region = next(r for r in machine.memory.regions
                      if r.guest_phys_addr <= fnport.mailbox_gpa < r.guest_phys_addr + r.size)
        held.region_start, held.region_end = region.host_addr, region.host_addr + region.size
        held.req_cap, held.resp_cap, held.seq = fnport.req_cap, fnport.resp_cap, fnport.seq
        held.fn_next_port, held.fn_done_port = FN_PORT_BASE + FN_NEXT, FN_PORT_BASE + FN_DONE
        held.image = image.encode()[:lib.LANE_IMAGE_MAX]
        held.stop = 0
        held.armed = 1

    def take_live(self) -> tuple[int, int, int]:
        """What the C side did for a live clone without returning: (invocations served and parked again, the
        last sequence number, the largest payload written), zeroed for the next call."""
        held = self.held
        taken = (held.live_served, held.seq, held.live_written)
        held.live_served = held.live_written = 0
        return taken

    def disarm(self) -> None:
        """Nothing is answered in C until armed again (called on the page server's failure, from its thread)."""
        self.held.stop = 1
        self.held.armed = 0

    def next(self) -> int:
        """Wait for the next message (the GIL released) and serve it if the lane can: EOF, MESSAGE, SERVED or
        FALLBACK."""
        kind = lib.lane_held_serve(self.channel, self.held, self.result)
        if kind < 0:
            raise OSError(-kind, f"receive on the daemon channel: {os.strerror(-kind)}")
        return kind

    def message(self) -> tuple[dict, bytes, list[int]]:
        """The message ``next`` returned MESSAGE for, decoded (protocol.decode)."""
        res = self.result
        raw = ffi.unpack(ffi.cast("char *", self.buffer), res.message_len)
        fds = [res.fds[i] for i in range(res.nfds)]
        return protocol.decode(raw, fds, socket.MSG_TRUNC if res.truncated else 0)  # refused there

    def payload(self) -> bytes:
        res = self.result
        return ffi.unpack(ffi.cast("char *", self.buffer + res.payload_offset), res.payload_len)
