"""The VMM core against the real /dev/kvm: boot, devices, pause/resume, faults, bad configuration."""
import pytest

from tests.conftest import requires_kvm
from vmm import workloads
from vmm.config import MachineConfig
from vmm.errors import ConfigError, GuestImageError, KvmError
from vmm.kvm import Kvm
from vmm.machine import PAUSED, RUNNING, STOPPED, Microvm

pytestmark = requires_kvm


class Collect:
    """A serial sink that keeps what the guest printed."""

    def __init__(self):
        self.data = bytearray()

    def __call__(self, chunk: bytes) -> None:
        self.data += chunk


def boot(config: MachineConfig, sink=None) -> Microvm:
    machine = Microvm(config, serial_sink=sink or Collect())
    machine.boot()
    return machine


def test_kvm_handle_reports_capabilities():
    kvm = Kvm()
    assert kvm.vcpu_mmap_size >= 4096
    assert any(entry[0] == 0 for entry in kvm.supported_cpuid())  # leaf 0 is always there
    assert 0x10 in kvm.msr_index_list()  # IA32_TSC


def test_failing_ioctl_raises_named_error():
    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        with pytest.raises(KvmError, match="KVM_SET_USER_MEMORY_REGION"):
            vm.set_memory_region(0, 0, 4096, 0x1234)  # unaligned host address: EINVAL
    finally:
        vm.close()


def test_tiny_guest_prints_and_resets(tiny_guests):
    sink = Collect()
    machine = boot(MachineConfig(kernel_image=tiny_guests["reset"], mem_size_mib=16), sink)
    try:
        assert machine.wait(10)
        assert machine.state == STOPPED
        assert machine.stop_reason == "guest requested reset"
        assert machine.fault is None
        assert bytes(sink.data) == b"tiny guest\n"
    finally:
        machine.close()


@pytest.mark.parametrize("guest", ["ud2", "noncanonical"])
def test_guest_fault_stops_vm_with_registers(tiny_guests, guest):
    machine = boot(MachineConfig(kernel_image=tiny_guests[guest], mem_size_mib=16))
    try:
        assert machine.wait(10)
        assert machine.fault is not None
        assert "vCPU 0" in str(machine.fault)
        if guest == "ud2":
            assert "invalid opcode" in str(machine.fault)
        assert "rip=" in machine.fault.registers
    finally:
        machine.close()


def test_builtin_guest_ready_invoke_pause_resume():
    sink = Collect()
    machine = boot(MachineConfig(mem_size_mib=64, boot_args="workload=hello"), sink)
    try:
        machine.wait_ready(10)
        first = machine.invoke(b"ping")
        assert first[:4] == b"HELO"
        machine.pause()
        assert machine.state == PAUSED
        machine.resume()
        assert machine.state == RUNNING
        second = machine.invoke(b"ping")
        assert int.from_bytes(second[4:8], "little") == int.from_bytes(first[4:8], "little") + 1
        assert b"vmguest: hello ready" in bytes(sink.data)
    finally:
        machine.close()


def test_two_vcpus_boot_and_pause():
    machine = boot(MachineConfig(mem_size_mib=64, vcpu_count=2))
    try:
        machine.wait_ready(10)
        machine.pause()
        assert all(runner.parked.is_set() for runner in machine.runners)
        machine.resume()
        assert machine.invoke(b"x")[:4] == b"HELO"
    finally:
        machine.close()


@pytest.mark.parametrize("mem", [0, 1, -5])
def test_memory_size_too_small_is_refused(mem):
    with pytest.raises(ConfigError, match="mem_size_mib"):
        Microvm(MachineConfig(mem_size_mib=mem))


def test_memory_larger_than_host_is_refused():
    with pytest.raises(ConfigError, match="more than this host has|above this VMM's limit"):
        Microvm(MachineConfig(mem_size_mib=59 * 1024))


def test_vcpu_count_zero_is_refused():
    with pytest.raises(ConfigError, match="vcpu_count"):
        Microvm(MachineConfig(vcpu_count=0))


def test_missing_and_non_elf_images_are_refused(tmp_path):
    with pytest.raises(GuestImageError, match="does not exist"):
        Microvm(MachineConfig(kernel_image=str(tmp_path / "nope.elf")))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not an ELF file" * 10)
    machine = Microvm(MachineConfig(kernel_image=str(junk), mem_size_mib=16))
    try:
        with pytest.raises(GuestImageError, match="not an ELF"):
            machine.boot()
    finally:
        machine.close()


def test_a_vm_paused_with_its_port_read_pending_is_not_saved(tmp_path):
    """pause(complete_io=False) leaves the guest mid-instruction: a snapshot of it would not resume, so it is
    refused until the VM is resumed."""
    from vmm.config import MachineConfig
    from vmm.machine import Microvm
    from vmm.snapshot import SnapshotError, create_snapshot
    machine = Microvm(MachineConfig(mem_size_mib=32, boot_args="workload=hello"), serial_sink=lambda d: None)
    try:
        machine.boot()
        machine.wait_ready(30)
        machine.pause(complete_io=False)
        with pytest.raises(SnapshotError, match="port-I/O exit pending"):
            create_snapshot(machine, str(tmp_path / "s"), str(tmp_path / "m"))
        machine.resume()
        request = workloads.hello_request("after")
        workloads.verify_hello(request, machine.invoke(request, 10), 1)
        machine.pause()
        create_snapshot(machine, str(tmp_path / "s"), str(tmp_path / "m"))
    finally:
        machine.close()


def test_a_pause_right_after_a_resume_parks_the_vcpus_again():
    """resume() then pause() at once: the parked vCPU thread may not have seen the resume yet; it must still
    leave its wait and park again (it used to wait for pause_requested to drop and never saw it)."""
    machine = Microvm(MachineConfig(mem_size_mib=32, boot_args="workload=hello"), serial_sink=lambda d: None)
    try:
        machine.boot()
        machine.wait_ready(30)
        for i in range(20):
            machine.pause(timeout=5.0, complete_io=bool(i % 2))
            if not i % 2:  # held with the FN_NEXT read pending: answer it on this thread
                request = workloads.hello_request(f"held {i}")
                invocation = machine.invoke_paused(request, 5.0)
                workloads.verify_hello(request, invocation.wait(0), i // 2 + 1)
            machine.resume()
        machine.pause(timeout=5.0)
        assert machine.state == PAUSED
    finally:
        machine.close()
