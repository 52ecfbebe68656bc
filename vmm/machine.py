"""A microVM: KVM VM + guest memory + vCPU threads + devices, with boot, pause, resume, stop and invoke.

Build order matters for latency: every memory slot is set before KVM_CREATE_IRQCHIP (a slot added after the
in-kernel irqchip exists costs 7-11 ms on these hosts, see ../shared/FACTS.md).
"""
import threading
import time
from typing import Callable

from vmm import x86
from vmm.config import MachineConfig
from vmm.devices.bus import PortIoBus
from vmm.dirty_log import BitmapDirtyLog, RingDirtyLog
from vmm.devices.fnport import FN_NEXT, FN_PORT_BASE, FN_PORT_COUNT, NEXT_RETRY, FunctionPort, Invocation
from vmm.devices.i8042 import I8042, I8042_COMMAND, I8042_DATA, SystemControlPortB
from vmm.devices.serial import COM1_BASE, COM1_IRQ, UART_PORTS, Serial, stdout_sink
from vmm.errors import GuestFault, InvocationError, VmmError
from vmm.kvm import Kvm
from vmm.loader import load_elf
from vmm.memory import GuestMemory
from vmm.native import lib
from vmm.vcpu_runner import VcpuRunner, format_registers, install_kick_handler

KVM_TSS_ADDR = 0xFFFBD000  # three pages just below the 4 GiB BIOS area, as QEMU and Firecracker use
NOT_STARTED, RUNNING, PAUSED, STOPPED = "Not started", "Running", "Paused", "Stopped"

_kvm = None


def shared_kvm() -> Kvm:
    """One /dev/kvm handle per process (a warm worker opens it once)."""
    global _kvm
    if _kvm is None:
        _kvm = Kvm()
    return _kvm


class Microvm:
    def __init__(self, config: MachineConfig, serial_sink=stdout_sink, memory: GuestMemory | None = None):
        self.kvm = shared_kvm()
        self.config = config.validate(self.kvm.max_vcpus())
        self.state = NOT_STARTED
        self.stop_reason = None
        self.fault = None
        self.pause_requested = False
        self.stop_requested = False
        self.io_left_pending = False  # paused with a port-I/O exit not completed (pause(complete_io=False))
        self.resumes = 0  # resume() calls: a parked vCPU thread waits for this to move
        self._control = threading.Condition()
        self.stopped = threading.Event()
        self.snapshot_id = ""  # the snapshot this machine was restored from or last saved to (Diff parent)
        self.timestamps = {"created": time.perf_counter()}
        install_kick_handler()
        self.vm = self.kvm.create_vm()
        self.memory = None
        self.vcpus = []
        try:
            self.memory = memory or GuestMemory.anonymous(self.config.mem_size)
            # Dirty logging is chosen here, with the slots: changing a slot after the irqchip exists is slow.
            slot_flags = lib.KVM_MEM_LOG_DIRTY_PAGES if self.config.track_dirty_pages else 0
            for slot, region in enumerate(self.memory.regions):
                self.vm.set_memory_region(slot, region.guest_phys_addr, region.size, region.host_addr, slot_flags)
            if self.config.track_dirty_pages:
                self.memory.host_dirty_pages = set()
            self.vm.set_tss_addr(KVM_TSS_ADDR)
            self.vm.create_irqchip()
            self.vm.create_pit2()
            ring = self.config.track_dirty_pages and self.config.dirty_log == "ring"
            if ring:
                RingDirtyLog.enable(self.vm)  # before the first vCPU exists
            supported = self.kvm.supported_cpuid()
            for index in range(self.config.vcpu_count):
                vcpu = self.vm.create_vcpu(index)
                self.vcpus.append(vcpu)
                vcpu.set_cpuid(x86.vcpu_cpuid(supported, index, self.config.vcpu_count))
            self.dirty_log = None
            if self.config.track_dirty_pages:
                self.dirty_log = (RingDirtyLog(self.vm, self.vcpus, self.memory) if ring
                                  else BitmapDirtyLog(self.vm, self.memory))
            self.bus = PortIoBus()
            self.attach_devices(Serial(self._serial_irq, serial_sink), I8042(self._on_reset_request),
                                FunctionPort(self.memory, self._vcpus_must_yield))
        except BaseException:
            self.close()
            raise
        self.runners = [VcpuRunner(v, self.bus, self) for v in self.vcpus]

    def attach_devices(self, serial: Serial, i8042: I8042, fnport: FunctionPort) -> None:
        self.bus = PortIoBus()
        self.serial, self.i8042, self.fnport = serial, i8042, fnport
        self.bus.register(serial, COM1_BASE, UART_PORTS)
        self.bus.register(i8042, I8042_DATA, 1)
        self.bus.register(i8042, I8042_COMMAND, 1, offset_base=I8042_DATA)
        self.bus.register(SystemControlPortB(), 0x61, 1)
        self.bus.register(fnport, FN_PORT_BASE, FN_PORT_COUNT)
        for runner in getattr(self, "runners", []):
            runner.bus = self.bus

    # -- boot
    def boot(self) -> None:
        """Boot the configured image: a Linux kernel through the Linux boot protocol, else direct ELF entry."""
        from vmm import linux_boot
        if linux_boot.is_linux_kernel(self.config.image_path()):
            linux_boot.boot_linux(self)
        else:
            self.boot_builtin()

    def boot_builtin(self) -> None:
        """Load an ELF guest and set vCPU 0 up for direct 64-bit entry at CPL 3 (docs/function-port.md)."""
        image = load_elf(self.config.image_path(), self.memory)
        x86.write_gdt(self.memory)
        x86.write_tss(self.memory)
        x86.write_page_tables(self.memory, self.config.mem_size)
        x86.write_cmdline(self.memory, self.config.boot_args)
        bsp = self.vcpus[0]
        sregs = bsp.get_sregs()
        x86.setup_long_mode_user(sregs)
        bsp.set_sregs(sregs)
        regs = bsp.get_regs()
        for name in ("rax", "rbx", "rcx", "rdx", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"):
            setattr(regs, name, 0)
        regs.rip, regs.rflags = image.entry, x86.RFLAGS_RESERVED | x86.RFLAGS_IOPL3
        regs.rdi, regs.rsi = x86.CMDLINE_ADDR, self.config.mem_size
        bsp.set_regs(regs)
        self.start()

    def start(self) -> None:
        self.state = RUNNING
        self.timestamps["started"] = time.perf_counter()
        for runner in self.runners:
            runner.start()

    def start_parked(self) -> None:
        """Start the vCPU threads already paused, so a later restore + resume() spawns no thread."""
        self.pause_requested = True
        for runner in self.runners:
            runner.start()
        for runner in self.runners:
            runner.parked.wait(5.0)
        self.state = PAUSED

    # -- control (called from API/CLI threads)
    def _vcpus_must_yield(self) -> bool:
        return self.pause_requested or self.stop_requested

    def wait_for_resume(self, resumes_seen: int) -> None:
        """Until resume() is called after the caller read ``resumes`` (``resumes_seen``), or a stop. Waiting for
        pause_requested to drop instead loses a resume followed at once by another pause: the parked thread
        never sees the flag down, and the second pause waits for it in vain."""
        with self._control:
            while self.resumes == resumes_seen and not self.stop_requested:
                self._control.wait()

    def pause(self, timeout: float = 5.0, complete_io: bool = True) -> None:
        """Park every vCPU. ``complete_io=False`` leaves a pending port-I/O exit uncompleted (no KVM_RUN with
        immediate_exit): a held function port's FN_NEXT read can then be answered later by invoke_paused without
        a round trip through the guest. Such a machine must be resumed before it is saved."""
        if self.state != RUNNING:
            raise VmmError(f"cannot pause a VM that is {self.state.lower()}")
        with self._control:
            self.pause_requested = True
            self.io_left_pending = not complete_io
        self.fnport.wake()
        for runner in self.runners:
            runner.kick()
        deadline = time.monotonic() + timeout
        for runner in self.runners:
            if not runner.parked.wait(max(0.0, deadline - time.monotonic())):
                raise VmmError(f"vCPU {runner.vcpu.index} did not pause within {timeout} s")
        self.serial.flush()
        if self.stopped.is_set():
            return
        self.state = PAUSED

    def resume(self) -> None:
        if self.state != PAUSED:
            raise VmmError(f"cannot resume a VM that is {self.state.lower()}")
        if self.runners and self.runners[0].thread is None:  # restored but never started
            self.start()
            return
        for runner in self.runners:
            runner.parked.clear()
        with self._control:
            self.pause_requested = False
            self.io_left_pending = False
            self.resumes += 1
            self._control.notify_all()
        self.state = RUNNING

    def stop(self, reason: str = "stopped by the VMM") -> None:
        with self._control:
            if self.stop_reason is None:
                self.stop_reason = reason
            self.stop_requested = True
            self._control.notify_all()
        self.fnport.wake()
        current = threading.current_thread()
        for runner in self.runners:
            if runner.thread is not current:
                runner.kick()
        for runner in self.runners:
            if runner.thread is not None and runner.thread is not current:
                runner.thread.join(timeout=5.0)
        self._finish()

    def _finish(self) -> None:
        self.serial.flush()
        self.fnport.fail_all(f"the VM stopped ({self.stop_reason})")
        self.state = STOPPED
        self.stopped.set()

    # -- called from vCPU threads
    def on_guest_stop(self, kind: str) -> None:
        threading.Thread(target=self.stop, args=(f"guest requested {kind}",), daemon=True).start()
        with self._control:
            self.stop_requested = True

    def _on_reset_request(self) -> None:
        self.on_guest_stop("reset")

    def on_vcpu_fault(self, runner, fault: GuestFault) -> None:
        self.fail(fault)

    def fail(self, error: VmmError) -> None:
        """Stop the VM because of ``error`` (a guest fault, a dead page server); callable from any thread."""
        if self.vm is None:  # already closed
            return
        if self.fault is None:
            self.fault = error
        threading.Thread(target=self.stop, args=(str(error),), daemon=True).start()

    def _serial_irq(self, level: int) -> None:
        self.vm.irq_line(COM1_IRQ, level)

    # -- dirty pages (Diff snapshots)
    def take_dirty_pages(self) -> list[int]:
        """Guest-page numbers written since the last call (by the guest or by the VMM), sorted; clears them."""
        if not self.config.track_dirty_pages:
            raise VmmError("dirty page tracking is off: enable track_dirty_pages at boot or load")
        pages = set(self.memory.host_dirty_pages)
        self.memory.host_dirty_pages.clear()
        pages |= self.dirty_log.take()
        return sorted(pages)

    # -- function invocations
    def wait_ready(self, timeout: float) -> None:
        """Wait until the guest finished its init phase (its first FN_NEXT) or stopped."""
        deadline = time.monotonic() + timeout
        while not self.fnport.ready.wait(0.01):
            if self.stopped.is_set():
                raise self.fault or VmmError(f"guest stopped before it was ready ({self.stop_reason})")
            if time.monotonic() > deadline:
                raise InvocationError(f"guest not ready after {timeout} s")
        self.timestamps.setdefault("ready", time.perf_counter())

    def invoke(self, payload: bytes, timeout: float = 10.0) -> bytes:
        if self.state == STOPPED:
            raise InvocationError(f"the VM is stopped ({self.stop_reason})")
        return self.fnport.submit(payload).wait(timeout)

    def invoke_paused(self, payload: bytes, timeout: float) -> Invocation:
        """One invocation of a paused one-vCPU machine, its vCPU run on the calling thread until the guest
        answers (VcpuRunner.run_here) and left paused: the caller sends the reply first, then resumes. Returns
        the invocation, still pending if ``timeout`` passed or the guest stopped (resume, then wait on it)."""
        if self.state != PAUSED or len(self.runners) != 1:
            raise VmmError(f"invoke_paused needs a paused one-vCPU VM, not a {self.state.lower()} "
                           f"{len(self.runners)}-vCPU one")
        if threading.current_thread() is not threading.main_thread():
            raise VmmError("invoke_paused runs only on the main thread (its deadline is a SIGALRM interval timer)")
        invocation = self.fnport.submit(payload)
        runner = self.runners[0]
        first = None
        if self.io_left_pending and runner.pending_port_read() == FN_PORT_BASE + FN_NEXT:
            # The guest's FN_NEXT read was answered "retry" when it parked but never completed: answer it
            # again, now with the invocation, so the guest's next instruction is already the request's.
            first = runner.redo_port_read
        return self.continue_paused(invocation, time.monotonic() + timeout, first)

    def continue_paused(self, invocation: Invocation, deadline: float,
                        first: Callable[[], None] | None = None) -> Invocation:
        """Run the paused one-vCPU machine's vCPU on this thread until ``invocation`` is answered or ``deadline``
        (time.monotonic()) passes, after ``first()`` (invoke_paused: answer the parked read; snapd's held lane,
        which hands an invocation over this way when its guest does more than answer: the exit it left)."""
        runner = self.runners[0]
        try:
            if first is not None:
                first()
            runner.run_here(invocation.done.is_set, deadline)
        except GuestFault as fault:
            self.on_vcpu_fault(runner, fault)
        except VmmError as exc:
            self.on_vcpu_fault(runner, GuestFault(f"vCPU 0: {exc}", format_registers(runner.vcpu)))
        return invocation

    def hold_at_next(self, deadline: float, first: Callable[[], None] | None = None) -> bool:
        """Run the paused one-vCPU machine's vCPU on this thread (after an invocation answered here) until the
        guest asks FN_NEXT for its next invocation, and park it there: the read left pending, answered "retry"
        (a resume makes the guest ask again, through the vCPU thread), so the next invocation is handed over
        by answering it (invoke_paused, snapd's held lane) with no thread to wake. False if the guest did not
        get there by ``deadline`` or stopped: the caller resumes it. ``first``: as continue_paused's (snapd's
        held lane, which ran the guest on after its reply and met an exit it leaves to Python)."""
        runner = self.runners[0]
        try:
            if first is not None:
                first()
            parked = runner.park_at_read(FN_PORT_BASE + FN_NEXT, NEXT_RETRY, deadline)
        except GuestFault as fault:
            self.on_vcpu_fault(runner, fault)
            return False
        except VmmError as exc:
            self.on_vcpu_fault(runner, GuestFault(f"vCPU 0: {exc}", format_registers(runner.vcpu)))
            return False
        if parked:
            self.io_left_pending = True
        return parked

    def wait(self, timeout: float | None = None) -> bool:
        return self.stopped.wait(timeout)

    def close(self) -> None:
        if self.state in (RUNNING, PAUSED):
            self.stop()
        stuck = [r.vcpu.index for r in getattr(self, "runners", []) if r.thread is not None and r.thread.is_alive()]
        if stuck:
            # Unmapping kvm_run or guest memory under a running vCPU thread would crash the process; keep them.
            raise VmmError(f"vCPU thread(s) {stuck} did not stop; leaving their memory mapped")
        if getattr(self, "dirty_log", None) is not None:
            self.dirty_log.close()
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
