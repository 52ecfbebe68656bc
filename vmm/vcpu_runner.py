"""The vCPU loop: one thread per vCPU running KVM_RUN and dispatching exits.

Pause and stop are cooperative: the requester sets a flag and ``immediate_exit``, then kicks the thread with a
signal so KVM_RUN returns -EINTR. Before parking, the thread enters KVM_RUN once more with ``immediate_exit``
set, which completes a pending I/O exit without running guest code, so a saved vCPU is never mid-instruction.
"""
import errno
import signal
import struct
import threading
import time
from typing import Callable

from vmm.errors import GuestFault, VmmError
from vmm.native import ffi, lib

KICK_SIGNAL = signal.SIGUSR1
THROTTLE_SLICE_S = 0.005  # a throttled vCPU (a guest flooding its console) sees a pause or stop this often
_kick_installed = False


def _ignore_signal(signum, frame) -> None:
    """SIGALRM only has to interrupt KVM_RUN (run_here's deadline)."""


_alarm_installed = False


def install_alarm_handler() -> None:
    """SIGALRM interrupts KVM_RUN for run_here's deadline (and snapd's held lane, snapd/csrc/lane_held.c):
    installed once, never reset, so a request's path pays only the setitimer calls."""
    global _alarm_installed
    if not _alarm_installed:
        signal.signal(signal.SIGALRM, _ignore_signal)
        _alarm_installed = True


def install_kick_handler() -> None:
    global _kick_installed
    if not _kick_installed:
        ret = lib.vmm_install_kick_handler(KICK_SIGNAL)
        if ret < 0:
            raise VmmError(f"sigaction({KICK_SIGNAL.name}) failed: errno {-ret}")
        _kick_installed = True


def format_registers(vcpu) -> str:
    try:
        r, s = vcpu.get_regs(), vcpu.get_sregs()
    except VmmError as exc:
        return f"(registers unavailable: {exc})"
    names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
             "r14", "r15", "rip", "rflags")
    parts = [f"{n}={getattr(r, n):#018x}" for n in names]
    parts += [f"cr0={s.cr0:#x}", f"cr2={s.cr2:#x}", f"cr3={s.cr3:#x}", f"cr4={s.cr4:#x}", f"efer={s.efer:#x}",
              f"cs={s.cs.selector:#x}", f"ss={s.ss.selector:#x}"]
    return " ".join(parts)


class VcpuRunner:
    def __init__(self, vcpu, bus, machine):
        self.vcpu = vcpu
        self.bus = bus
        self.machine = machine  # on_vcpu_fault(), on_guest_stop(), control flags
        self.thread = None
        self.parked = threading.Event()
        self.exits = 0
        self.kvmclock_ctrl_pending = False

    def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name=f"vcpu{self.vcpu.index}", daemon=True)
        self.thread.start()

    def kick(self) -> None:
        if self.vcpu.run_map is None:  # closed: nothing runs any more
            return
        self.vcpu.run.immediate_exit = 1
        thread = self.thread
        if thread is not None and thread.ident is not None and thread.is_alive():
            try:
                signal.pthread_kill(thread.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def _main(self) -> None:
        try:
            self._loop()
        except GuestFault as fault:
            self.machine.on_vcpu_fault(self, fault)
        except VmmError as exc:
            self.machine.on_vcpu_fault(self, GuestFault(f"vCPU {self.vcpu.index}: {exc}", format_registers(self.vcpu)))
        except Exception as exc:  # a VMM bug: the VM fails (its thread must not end silently, the VM "running")
            self.machine.on_vcpu_fault(self, GuestFault(f"vCPU {self.vcpu.index}: the VMM failed: "
                                                        f"{type(exc).__name__}: {exc}", format_registers(self.vcpu)))
        finally:
            self.parked.set()

    def _loop(self) -> None:
        vcpu, run, machine = self.vcpu, self.vcpu.run, self.machine
        while True:
            if self.kvmclock_ctrl_pending:  # after a restore; this thread owns the vCPU, so the ioctl won't wait
                vcpu.kvmclock_ctrl()
                self.kvmclock_ctrl_pending = False
            if machine.stop_requested or machine.pause_requested:
                if machine.stop_requested or not machine.io_left_pending:
                    run.immediate_exit = 1
                    vcpu.run_once()  # completes a pending I/O exit; returns -EINTR at once
                if machine.stop_requested:
                    return
                resumes = machine.resumes  # read before parked is set: resume() comes after pause() saw it
                self.parked.set()
                machine.wait_for_resume(resumes)
                self.parked.clear()
                run.immediate_exit = 0
                continue
            if vcpu.run_once() == -errno.EINTR:
                continue
            self.exits += 1
            self._dispatch_exit(run.exit_reason)
            if machine.serial.tx_tokens <= 0:  # the serial device is replaced on a restore: looked up here
                self._throttle(machine.serial, lambda: machine.stop_requested or machine.pause_requested)

    def _throttle(self, serial, give_up: Callable[[], bool], deadline: float | None = None) -> None:
        """A guest past its console allowance (serial.TX_RATE) waits here, off the CPU, until it has one again; in
        slices of at most THROTTLE_SLICE_S, so that a pause, a stop or ``deadline`` ends the wait promptly."""
        while not give_up():
            delay = serial.tx_delay()
            if deadline is not None:
                delay = min(delay, deadline - time.monotonic())
            if delay <= 0:
                return
            time.sleep(min(delay, THROTTLE_SLICE_S))

    def run_here(self, done: Callable[[], bool], deadline: float,
                 park_at: tuple[int, int] | None = None) -> bool:
        """Run this vCPU on the calling thread, its own thread parked (machine paused), until ``done()``.
        A prepared clone's first invocation runs this way in the worker's main thread, which has the request:
        no hand-off to the vCPU thread and back (two wake-ups, ~0.15 ms on this nested host). False when
        ``deadline`` (time.monotonic()) passes first: the caller resumes the vCPU thread, which carries on from
        the same point. Raises GuestFault / VmmError as the vCPU thread's loop would. Main thread only (the
        deadline is a SIGALRM interval timer; SIGALRM is ignored from the first call on)."""
        vcpu, run, serial = self.vcpu, self.vcpu.run, self.machine.serial
        run.immediate_exit = 0
        # KVM_RUN returns -EINTR when a signal arrives: the interval timer bounds a guest that never answers.
        install_alarm_handler()
        signal.setitimer(signal.ITIMER_REAL, max(1e-6, deadline - time.monotonic()))
        try:
            while not done():
                if self.machine.stop_requested or time.monotonic() >= deadline:
                    return False
                if vcpu.run_once() == -errno.EINTR:
                    continue
                self.exits += 1
                if park_at is not None and self.pending_word_read() == park_at[0]:  # park_at_read's stop
                    self._answer_read(park_at[1])
                    return True
                self._dispatch_exit(run.exit_reason)
                if serial.tx_tokens <= 0:
                    self._throttle(serial, lambda: self.machine.stop_requested, deadline)
            return True
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def park_at_read(self, port: int, answer: int, deadline: float) -> bool:
        """Run this vCPU on the calling thread (its own parked) until the guest reads ``port`` (4 bytes), and
        stop there: the read is left pending, answered ``answer`` for the next KVM_RUN, which anyone may
        overwrite before that (a held function port: FN_NEXT, answered "retry" until an invocation comes). False
        when ``deadline`` passes first, as run_here. Other exits (an odd-sized read of the port too) are
        dispatched as the vCPU thread would."""
        return self.run_here(lambda: False, deadline, park_at=(port, answer))

    def dispatch_pending_exit(self) -> None:
        """Handle the exit KVM_RUN last returned, which someone else ran into (snapd's held lane) and left."""
        self.exits += 1
        self._dispatch_exit(self.vcpu.run.exit_reason)

    def pending_port_read(self) -> int | None:
        """The port of the port-I/O read (IN) this vCPU's last exit left uncompleted, if that is what it was."""
        if self.vcpu.run.exit_reason != lib.KVM_EXIT_IO:
            return None
        io = lib.vmm_run_io(self.vcpu.run)
        return io.port if io.direction == lib.KVM_EXIT_IO_IN else None

    def pending_word_read(self) -> int | None:
        """As pending_port_read, for a single 4-byte read only (the function port's, and what the lane answers)."""
        port = self.pending_port_read()
        io = lib.vmm_run_io(self.vcpu.run)
        return port if port is not None and io.size == 4 and io.count == 1 else None

    def redo_port_read(self) -> None:
        """Answer the pending read again (overwriting the value KVM will hand the guest on the next KVM_RUN)."""
        self._handle_io()

    def _dispatch_exit(self, reason: int) -> None:
        machine, vcpu = self.machine, self.vcpu
        if reason == lib.KVM_EXIT_IO:
            try:
                self._handle_io()
            except VmmError:
                raise
            except Exception as exc:  # a device model that failed on what the guest did: that VM fails, cleanly,
                raise GuestFault(  # on this thread or the one running it here (run_here), never the process
                    f"port I/O on vCPU {vcpu.index} made a device fail: {type(exc).__name__}: {exc}",
                    format_registers(vcpu)) from None
        elif reason == lib.KVM_EXIT_MMIO:
            self._handle_mmio()
        elif reason in (lib.KVM_EXIT_INTR, lib.KVM_EXIT_HLT, lib.KVM_EXIT_IRQ_WINDOW_OPEN):
            pass
        elif reason == lib.KVM_EXIT_DIRTY_RING_FULL:
            machine.dirty_log.harvest()  # hand the ring back to KVM; the pages wait for the next take
        elif reason == lib.KVM_EXIT_SYSTEM_EVENT:
            event = lib.vmm_run_system_event(vcpu.run).type
            kind = {lib.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown", lib.KVM_SYSTEM_EVENT_RESET: "reset"}.get(event)
            if kind is None:
                raise GuestFault(f"guest crashed (system event {event})", format_registers(vcpu))
            machine.on_guest_stop(kind)
        else:
            raise GuestFault(self._describe_exit(reason), format_registers(vcpu))

    def _handle_io(self) -> None:
        io = lib.vmm_run_io(self.vcpu.run)
        size, port, count, offset = io.size, io.port, io.count, io.data_offset
        fmt = {1: "<B", 2: "<H", 4: "<I"}.get(size)
        if fmt is None:
            raise GuestFault(f"port I/O of {size} bytes at port {port:#x}", format_registers(self.vcpu))
        data = self.vcpu.run_bytes
        if offset + count * size > len(data):  # KVM's own bound (one page of data); checked, never assumed
            raise GuestFault(f"port I/O of {count} x {size} bytes at port {port:#x} does not fit kvm_run",
                             format_registers(self.vcpu))
        if io.direction == lib.KVM_EXIT_IO_OUT:
            for i in range(count):
                self.bus.write(port, size, struct.unpack_from(fmt, data, offset + i * size)[0], count)
        else:
            for i in range(count):
                struct.pack_into(fmt, data, offset + i * size, self.bus.read(port, size, count))

    def _answer_read(self, value: int) -> None:
        """Answer the pending port read with ``value`` (cut to its size) without asking the bus."""
        io = lib.vmm_run_io(self.vcpu.run)
        fmt = {1: "<B", 2: "<H", 4: "<I"}.get(io.size)
        if fmt is None:
            raise GuestFault(f"port I/O of {io.size} bytes at port {io.port:#x}", format_registers(self.vcpu))
        for i in range(io.count):
            struct.pack_into(fmt, self.vcpu.run_bytes, io.data_offset + i * io.size, value & ((1 << 8 * io.size) - 1))

    def _handle_mmio(self) -> None:
        mmio = lib.vmm_run_mmio(self.vcpu.run)
        if not mmio.is_write:
            ffi.memmove(mmio.data, b"\xff" * 8, 8)  # no MMIO devices: reads float high

    def _instruction_hint(self) -> str:
        """The bytes at RIP when they can be read (identity-mapped guests), e.g. 0f 0b for an invalid opcode."""
        try:
            rip = self.vcpu.get_regs().rip
            code = self.machine.memory.read(rip, 4)
        except VmmError:
            return ""
        hint = " (invalid opcode ud2)" if code[:2] == b"\x0f\x0b" else ""
        return f" at rip={rip:#x}, instruction bytes {code.hex(' ')}{hint}"

    def _describe_exit(self, reason: int) -> str:
        run, index = self.vcpu.run, self.vcpu.index
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return (f"guest triple-faulted on vCPU {index} (an exception it could not handle)"
                    f"{self._instruction_hint()}")
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            internal = lib.vmm_run_internal(run)
            what = {lib.KVM_INTERNAL_ERROR_EMULATION: "an instruction KVM cannot emulate",
                    lib.KVM_INTERNAL_ERROR_SIMUL_EX: "a fault while delivering a fault",
                    lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "an event it could not deliver"}.get(internal.suberror, "an internal error")
            return f"guest stopped on vCPU {index}: KVM hit {what} (suberror {internal.suberror})"
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            code = lib.vmm_run_fail_entry(run).hardware_entry_failure_reason
            return f"KVM could not enter the guest on vCPU {index} (entry failure {code:#x})"
        return f"guest stopped on vCPU {index} with unhandled exit reason {reason}"
