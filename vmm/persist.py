"""Save and restore of every piece of vCPU and VM state, Firecracker's `Persist` contract in Python.

Each component has a frozen-dataclass State, a ``save_*`` that reads it from the live object, and a
``restore_*`` that writes it back into a freshly built one. Kernel structs (regs, sregs, XSAVE, LAPIC, ...) are
kept as their kernel-ABI bytes, which is exactly what the ioctls take back; docs/snapshot-format.md lists them.

Order (after Firecracker's, see docs/snapshot-format.md):
  save, per vCPU: mp_state, regs, sregs, xsave, xcrs, debugregs, lapic, tsc_khz, cpuid, msrs, vcpu_events (last:
  reading the other state may change pending events).
  restore, VM first: pit2, clock, irqchips (PIC master, PIC slave, IOAPIC); then per vCPU: cpuid, mp_state, regs,
  sregs, xsave, xcrs, debugregs, lapic, msrs (TSC before TSC_DEADLINE), vcpu_events (last); KVMCLOCK_CTRL after
  the vCPUs run again.
"""
from dataclasses import dataclass

from vmm.devices.fnport import FunctionPortState
from vmm.devices.i8042 import I8042State
from vmm.devices.serial import SerialState
from vmm.errors import KvmError
from vmm.native import blob, ffi, from_blob, lib

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
SNAPSHOT_KIND = "microvm"

_readable_msrs = None


def readable_msrs(kvm, vcpu) -> list[int]:
    """The MSRs of KVM_GET_MSR_INDEX_LIST that this host lets us read back, TSC first, TSC_DEADLINE after it."""
    global _readable_msrs
    if _readable_msrs is None:
        candidates = kvm.msr_index_list()
        readable = []
        while candidates:
            got = vcpu.get_msrs(candidates)
            readable += [index for index, _ in got]
            candidates = candidates[len(got) + 1:]  # KVM_GET_MSRS stops at the first MSR it refuses: skip it
        readable.sort(key=lambda index: (index != MSR_IA32_TSC, index == MSR_IA32_TSC_DEADLINE, index))
        _readable_msrs = readable
    return list(_readable_msrs)


@dataclass(frozen=True)
class VcpuState:
    index: int
    mp_state: int
    regs: bytes  # struct kvm_regs
    sregs: bytes  # struct kvm_sregs
    xsave: bytes  # KVM_GET_XSAVE2 buffer
    xcrs: bytes  # struct kvm_xcrs
    debugregs: bytes  # struct kvm_debugregs
    lapic: bytes  # struct kvm_lapic_state
    tsc_khz: int
    cpuid: tuple[tuple[int, int, int, int, int, int, int], ...]  # (function, index, flags, eax, ebx, ecx, edx)
    msrs: tuple[tuple[int, int], ...]  # (index, value) per MSR
    vcpu_events: bytes  # struct kvm_vcpu_events


@dataclass(frozen=True)
class VmState:
    pic_master: bytes  # struct kvm_irqchip
    pic_slave: bytes
    ioapic: bytes
    pit2: bytes  # struct kvm_pit_state2
    clock_ns: int
    clock_flags: int


@dataclass(frozen=True)
class MemoryRegionState:
    name: str
    guest_phys_addr: int
    size: int
    file_offset: int


@dataclass(frozen=True)
class MemoryFileState:
    """The identity of the memory file written with this state file (docs/snapshot-format.md, "Memory file"):
    the random 128-bit id (hex) also in the memory file's trailer, and the bytes of guest memory before that
    trailer. A load refuses a memory file whose trailer says otherwise."""
    id: str
    data_size: int


@dataclass(frozen=True)
class DeviceStates:
    serial: SerialState
    i8042: I8042State
    fnport: FunctionPortState


@dataclass(frozen=True)
class MachineConfigState:
    vcpu_count: int
    mem_size_mib: int
    kernel_image: str
    boot_args: str


@dataclass(frozen=True)
class MicrovmState:
    """The root of a snapshot: everything but guest memory, which lives in the memory file.

    A Full snapshot's memory file holds all of guest memory. A Diff snapshot's memory file has the same size but
    holds only ``diff_page_runs`` (runs of 4 KiB pages, as (first page, count) in memory-file offsets), written
    since the snapshot ``parent_snapshot_id``; it is only meaningful stacked on that parent."""
    kind: str
    snapshot_id: str
    parent_snapshot_id: str  # empty for a Full snapshot
    diff_page_runs: tuple[tuple[int, int], ...]
    config: MachineConfigState
    memory: tuple[MemoryRegionState, ...]  # in memory-file order
    memory_file: MemoryFileState  # the memory file this state file goes with
    vm: VmState
    vcpus: tuple[VcpuState, ...]  # by vCPU index
    devices: DeviceStates


def _xsave_size(kvm) -> int:
    return max(kvm.check_extension(lib.KVM_CAP_XSAVE2), ffi.sizeof("struct kvm_xsave"))


def _cpuid2_entries(vcpu) -> tuple:
    buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + 256 * ffi.sizeof("struct kvm_cpuid_entry2"))
    cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
    cpuid.nent = 256
    ret = lib.vmm_ioctl_ptr(vcpu.fd, lib.KVM_GET_CPUID2, cpuid)
    if ret < 0:
        raise KvmError("KVM_GET_CPUID2", -ret)
    return tuple((e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                 for e in (cpuid.entries[i] for i in range(cpuid.nent)))


def save_vcpu(kvm, vcpu) -> VcpuState:
    mp_state = vcpu.get_mp_state()
    regs = blob(vcpu.get_regs())
    sregs = blob(vcpu.get_sregs())
    xsave = vcpu.get_xsave(_xsave_size(kvm))
    xcrs = vcpu.get_xcrs()
    debugregs = vcpu.get_debugregs()
    lapic = vcpu.get_lapic()
    tsc_khz = vcpu.get_tsc_khz()
    cpuid = _cpuid2_entries(vcpu)
    msrs = tuple(vcpu.get_msrs(readable_msrs(kvm, vcpu)))
    events = vcpu.get_vcpu_events()
    return VcpuState(vcpu.index, mp_state, regs, sregs, xsave, xcrs, debugregs, lapic, tsc_khz, cpuid, msrs, events)


def restore_vcpu(vcpu, state: VcpuState) -> None:
    vcpu.set_cpuid(list(state.cpuid))
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_regs(from_blob("struct kvm_regs", state.regs, "KVM_SET_REGS"))
    vcpu.set_sregs(from_blob("struct kvm_sregs", state.sregs, "KVM_SET_SREGS"))
    vcpu.set_xsave(state.xsave)
    vcpu.set_xcrs(state.xcrs)
    vcpu.set_debugregs(state.debugregs)
    vcpu.set_lapic(state.lapic)
    current_khz = vcpu.get_tsc_khz()
    if state.tsc_khz and state.tsc_khz != current_khz:
        # Without KVM_CAP_TSC_CONTROL the guest would see its TSC tick at another rate: refuse, do not guess.
        try:
            vcpu.set_tsc_khz(state.tsc_khz)
        except KvmError as exc:
            raise KvmError("KVM_SET_TSC_KHZ", exc.errno,
                           f"snapshot TSC runs at {state.tsc_khz} kHz, this host at {current_khz} kHz") from None
    vcpu.set_msrs(list(state.msrs))
    vcpu.set_vcpu_events(state.vcpu_events)


def save_vm(vm) -> VmState:
    clock_ns, clock_flags = vm.get_clock()
    return VmState(
        pic_master=vm.get_irqchip(lib.KVM_IRQCHIP_PIC_MASTER),
        pic_slave=vm.get_irqchip(lib.KVM_IRQCHIP_PIC_SLAVE),
        ioapic=vm.get_irqchip(lib.KVM_IRQCHIP_IOAPIC),
        pit2=vm.get_pit2(),
        clock_ns=clock_ns,
        clock_flags=clock_flags & ~lib.KVM_CLOCK_TSC_STABLE,
    )


def restore_vm(vm, state: VmState) -> None:
    vm.set_pit2(state.pit2)
    vm.set_clock(state.clock_ns)
    vm.set_irqchip(state.pic_master)
    vm.set_irqchip(state.pic_slave)
    vm.set_irqchip(state.ioapic)




__all__ = ["VcpuState", "VmState", "MicrovmState", "DeviceStates", "MemoryRegionState", "MemoryFileState",
           "MachineConfigState",
           "save_vcpu", "restore_vcpu", "save_vm", "restore_vm", "readable_msrs"]
