"""Pythonic wrappers over the KVM ioctls: Kvm (the /dev/kvm handle), Vm and Vcpu.

Each method is one ioctl; failures raise KvmError naming it. Kernel structs that are saved whole
(LAPIC, XSAVE, events, ...) are returned as bytes in kernel ABI layout.
"""
import errno
import os

from vmm.errors import KvmError, KvmUnavailable
from vmm.native import blob, check, ffi, from_blob, ioctl_ptr, ioctl_val, lib

KVM_PATH = "/dev/kvm"
EXPECTED_API_VERSION = 12
MAX_CPUID_ENTRIES = 256
MAX_MSR_INDICES = 1024


def _close(fd: int) -> None:
    if fd >= 0:
        lib.vmm_close(fd)


class Kvm:
    """The /dev/kvm system handle."""

    def __init__(self, path: str = KVM_PATH):
        if not os.path.exists(path):
            raise KvmUnavailable(f"{path} does not exist: this host offers no KVM")
        fd = lib.vmm_open(path.encode(), os.O_RDWR)
        if fd < 0:
            raise KvmUnavailable(f"cannot open {path}: {os.strerror(-fd)}")
        self.fd = fd
        version = ioctl_val(fd, lib.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != EXPECTED_API_VERSION:
            raise KvmUnavailable(f"{path} speaks KVM API {version}, this VMM needs {EXPECTED_API_VERSION}")
        self.vcpu_mmap_size = ioctl_val(fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        self._supported_cpuid = None
        self._msr_indices = None

    def check_extension(self, cap: int) -> int:
        return ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def max_vcpus(self) -> int:
        return self.check_extension(lib.KVM_CAP_MAX_VCPUS) or self.check_extension(lib.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self) -> list[tuple]:
        """KVM_GET_SUPPORTED_CPUID as (function, index, flags, eax, ebx, ecx, edx) tuples (cached)."""
        if self._supported_cpuid is None:
            buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + MAX_CPUID_ENTRIES * ffi.sizeof("struct kvm_cpuid_entry2"))
            cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
            cpuid.nent = MAX_CPUID_ENTRIES
            ioctl_ptr(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID")
            self._supported_cpuid = [
                (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (cpuid.entries[i] for i in range(cpuid.nent))
            ]
        return list(self._supported_cpuid)

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores (cached)."""
        if self._msr_indices is None:
            buf = ffi.new("char[]", ffi.sizeof("struct kvm_msr_list") + MAX_MSR_INDICES * 4)
            msr_list = ffi.cast("struct kvm_msr_list *", buf)
            msr_list.nmsrs = MAX_MSR_INDICES
            ioctl_ptr(self.fd, lib.KVM_GET_MSR_INDEX_LIST, msr_list, "KVM_GET_MSR_INDEX_LIST")
            self._msr_indices = [msr_list.indices[i] for i in range(msr_list.nmsrs)]
        return list(self._msr_indices)

    def create_vm(self) -> "Vm":
        return Vm(self, ioctl_val(self.fd, lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM"))

    def close(self) -> None:
        _close(self.fd)
        self.fd = -1


class Vm:
    """A KVM virtual machine: memory slots, in-kernel irqchip/PIT, clock, and its vCPUs."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd

    def set_memory_region(self, slot: int, guest_phys_addr: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot, region.flags = slot, flags
        region.guest_phys_addr, region.memory_size, region.userspace_addr = guest_phys_addr, size, host_addr
        ioctl_ptr(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def set_tss_addr(self, addr: int) -> None:
        ioctl_val(self.fd, lib.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def create_irqchip(self) -> None:
        ioctl_val(self.fd, lib.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        config = ffi.new("struct kvm_pit_config *")
        config.flags = lib.KVM_PIT_SPEAKER_DUMMY
        ioctl_ptr(self.fd, lib.KVM_CREATE_PIT2, config, "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        line = ffi.new("struct kvm_irq_level *")
        line.irq, line.level = irq, level
        ioctl_ptr(self.fd, lib.KVM_IRQ_LINE, line, "KVM_IRQ_LINE")

    def get_irqchip(self, chip_id: int) -> bytes:
        chip = ffi.new("struct kvm_irqchip *")
        chip.chip_id = chip_id
        ioctl_ptr(self.fd, lib.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        return blob(chip)

    def set_irqchip(self, data: bytes) -> None:
        ioctl_ptr(self.fd, lib.KVM_SET_IRQCHIP, from_blob("struct kvm_irqchip", data, "KVM_SET_IRQCHIP"), "KVM_SET_IRQCHIP")

    def get_pit2(self) -> bytes:
        pit = ffi.new("struct kvm_pit_state2 *")
        ioctl_ptr(self.fd, lib.KVM_GET_PIT2, pit, "KVM_GET_PIT2")
        return blob(pit)

    def set_pit2(self, data: bytes) -> None:
        ioctl_ptr(self.fd, lib.KVM_SET_PIT2, from_blob("struct kvm_pit_state2", data, "KVM_SET_PIT2"), "KVM_SET_PIT2")

    def get_clock(self) -> tuple[int, int]:
        clock = ffi.new("struct kvm_clock_data *")
        ioctl_ptr(self.fd, lib.KVM_GET_CLOCK, clock, "KVM_GET_CLOCK")
        return clock.clock, clock.flags

    def set_clock(self, clock_ns: int) -> None:
        clock = ffi.new("struct kvm_clock_data *")
        clock.clock = clock_ns
        ioctl_ptr(self.fd, lib.KVM_SET_CLOCK, clock, "KVM_SET_CLOCK")

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        bitmap = ffi.new("uint64_t[]", (npages + 63) // 64)
        log = ffi.new("struct kvm_dirty_log *")
        log.slot, log.dirty_bitmap = slot, bitmap
        ioctl_ptr(self.fd, lib.KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG")
        return bytes(ffi.buffer(bitmap))

    def create_vcpu(self, index: int) -> "Vcpu":
        fd = ioctl_val(self.fd, lib.KVM_CREATE_VCPU, index, f"KVM_CREATE_VCPU({index})")
        return Vcpu(self, index, fd)

    def close(self) -> None:
        _close(self.fd)
        self.fd = -1


class Vcpu:
    """One vCPU: its fd, its mmap'ed kvm_run page, and get/set of each piece of its state."""

    def __init__(self, vm: Vm, index: int, fd: int):
        self.vm = vm
        self.index = index
        self.fd = fd
        err = ffi.new("long *")
        run = lib.vmm_mmap(ffi.NULL, vm.kvm.vcpu_mmap_size, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED, fd, 0, err)
        check(err[0], "mmap(kvm_run)")
        self.run_map = run
        self.run = ffi.cast("struct kvm_run *", run)
        self.run_bytes = ffi.buffer(run, vm.kvm.vcpu_mmap_size)

    # -- running
    def run_once(self) -> int:
        """KVM_RUN once. Returns 0, or -EINTR when kicked; other errors raise."""
        ret = lib.vmm_ioctl_val(self.fd, lib.KVM_RUN, 0)
        if ret == -errno.EINTR or ret == -errno.EAGAIN:
            return -errno.EINTR
        return check(ret, f"KVM_RUN(vcpu {self.index})")

    # -- registers
    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        ioctl_ptr(self.fd, lib.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs) -> None:
        ioctl_ptr(self.fd, lib.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        ioctl_ptr(self.fd, lib.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs) -> None:
        ioctl_ptr(self.fd, lib.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def set_cpuid(self, entries: list[tuple]) -> None:
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + len(entries) * ffi.sizeof("struct kvm_cpuid_entry2"))
        cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
        cpuid.nent = len(entries)
        for i, (function, index, flags, eax, ebx, ecx, edx) in enumerate(entries):
            e = cpuid.entries[i]
            e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx = function, index, flags, eax, ebx, ecx, edx
        ioctl_ptr(self.fd, lib.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + len(indices) * ffi.sizeof("struct kvm_msr_entry"))
        msrs = ffi.cast("struct kvm_msrs *", buf)
        msrs.nmsrs = len(indices)
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        got = ioctl_ptr(self.fd, lib.KVM_GET_MSRS, msrs, "KVM_GET_MSRS")
        return [(msrs.entries[i].index, msrs.entries[i].data) for i in range(got)]

    def set_msrs(self, entries: list[tuple[int, int]]) -> None:
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + len(entries) * ffi.sizeof("struct kvm_msr_entry"))
        msrs = ffi.cast("struct kvm_msrs *", buf)
        msrs.nmsrs = len(entries)
        for i, (index, data) in enumerate(entries):
            msrs.entries[i].index, msrs.entries[i].data = index, data
        done = ioctl_ptr(self.fd, lib.KVM_SET_MSRS, msrs, "KVM_SET_MSRS")
        if done != len(entries):
            bad = entries[done][0]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {bad:#x} (entry {done} of {len(entries)}) was refused")

    def _get_blob(self, ctype: str, request: int, call: str, alloc_size: int = 0) -> bytes:
        if alloc_size:
            buf = ffi.new("char[]", alloc_size)
            ioctl_ptr(self.fd, request, buf, call)
            return bytes(ffi.buffer(buf))
        ptr = ffi.new(ctype + " *")
        ioctl_ptr(self.fd, request, ptr, call)
        return blob(ptr)

    def _set_blob(self, ctype: str, request: int, call: str, data: bytes, variable: bool = False) -> None:
        if variable:
            buf = ffi.new("char[]", data)
            ioctl_ptr(self.fd, request, buf, call)
        else:
            ioctl_ptr(self.fd, request, from_blob(ctype, data, call), call)

    def get_fpu(self) -> bytes:
        return self._get_blob("struct kvm_fpu", lib.KVM_GET_FPU, "KVM_GET_FPU")

    def set_fpu(self, data: bytes) -> None:
        self._set_blob("struct kvm_fpu", lib.KVM_SET_FPU, "KVM_SET_FPU", data)

    def get_lapic(self) -> bytes:
        return self._get_blob("struct kvm_lapic_state", lib.KVM_GET_LAPIC, "KVM_GET_LAPIC")

    def set_lapic(self, data: bytes) -> None:
        self._set_blob("struct kvm_lapic_state", lib.KVM_SET_LAPIC, "KVM_SET_LAPIC", data)

    def get_xsave(self, size: int) -> bytes:
        """KVM_GET_XSAVE2 with the size KVM_CAP_XSAVE2 reported (>= sizeof(struct kvm_xsave))."""
        return self._get_blob("struct kvm_xsave", lib.KVM_GET_XSAVE2, "KVM_GET_XSAVE2", alloc_size=size)

    def set_xsave(self, data: bytes) -> None:
        self._set_blob("struct kvm_xsave", lib.KVM_SET_XSAVE, "KVM_SET_XSAVE", data, variable=True)

    def get_xcrs(self) -> bytes:
        return self._get_blob("struct kvm_xcrs", lib.KVM_GET_XCRS, "KVM_GET_XCRS")

    def set_xcrs(self, data: bytes) -> None:
        self._set_blob("struct kvm_xcrs", lib.KVM_SET_XCRS, "KVM_SET_XCRS", data)

    def get_debugregs(self) -> bytes:
        return self._get_blob("struct kvm_debugregs", lib.KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS")

    def set_debugregs(self, data: bytes) -> None:
        self._set_blob("struct kvm_debugregs", lib.KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS", data)

    def get_vcpu_events(self) -> bytes:
        return self._get_blob("struct kvm_vcpu_events", lib.KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, data: bytes) -> None:
        self._set_blob("struct kvm_vcpu_events", lib.KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", data)

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        ioctl_ptr(self.fd, lib.KVM_GET_MP_STATE, state, "KVM_GET_MP_STATE")
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        state = ffi.new("struct kvm_mp_state *")
        state.mp_state = mp_state
        ioctl_ptr(self.fd, lib.KVM_SET_MP_STATE, state, "KVM_SET_MP_STATE")

    def get_tsc_khz(self) -> int:
        return ioctl_val(self.fd, lib.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        ioctl_val(self.fd, lib.KVM_SET_TSC_KHZ, khz, "KVM_SET_TSC_KHZ")

    def kvmclock_ctrl(self) -> None:
        """Tell the guest's kvmclock it was paused (avoids soft-lockup warnings after restore)."""
        ret = lib.vmm_ioctl_val(self.fd, lib.KVM_KVMCLOCK_CTRL, 0)
        if ret < 0 and ret != -errno.EINVAL:  # EINVAL: the guest has not enabled kvmclock
            check(ret, "KVM_KVMCLOCK_CTRL")

    def close(self) -> None:
        if self.run_map is not None:
            lib.vmm_munmap(self.run_map, self.vm.kvm.vcpu_mmap_size)
            self.run_map = None
        _close(self.fd)
        self.fd = -1
