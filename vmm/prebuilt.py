"""A VM built before the snapshot it will run is known, for restores with no set-up on the critical path.

FACTS.md: VM + slots + irqchip + PIT + vCPUs cost ~0.6-0.9 ms to build, but none of it depends on the snapshot
beyond its shape (vCPU count, memory size). A shell is built ahead over placeholder anonymous memory, its vCPU
threads parked; at restore the snapshot's memory is mapped MAP_FIXED over the placeholder (the KVM slot keeps
its host address), the state is written, and the parked vCPUs are released.
"""
import dataclasses

from vmm.config import MachineConfig
from vmm.devices.serial import stdout_sink
from vmm.machine import Microvm
from vmm.native import ffi, lib
from vmm.snapshot import SnapshotError, machine_config_of, refuse_diff, restore_into, resume_restored


@dataclasses.dataclass(frozen=True)
class VmShape:
    vcpu_count: int
    mem_size_mib: int


class PrebuiltVm:
    def __init__(self, shape: VmShape, serial_sink=stdout_sink):
        self.shape = shape
        self.serial_sink = serial_sink
        self.machine = Microvm(MachineConfig(vcpu_count=shape.vcpu_count, mem_size_mib=shape.mem_size_mib,
                                             boot_args=""), serial_sink=serial_sink)
        self.machine.start_parked()
        self.used = False
        self.memory_untouched = True  # nothing has written the placeholder memory yet

    def _take_for(self, state):
        """This shell for ``state``'s restore, once: a Full snapshot of its shape. Returns the state's config."""
        if self.used:
            raise SnapshotError("this prebuilt VM was already used for a restore")
        refuse_diff(state, "snapshot")
        config = machine_config_of(state)
        shape = VmShape(config.vcpu_count, config.mem_size_mib)
        if shape != self.shape:
            raise SnapshotError(f"snapshot needs {shape.vcpu_count} vCPUs / {shape.mem_size_mib} MiB, "
                                f"this prebuilt VM has {self.shape.vcpu_count} / {self.shape.mem_size_mib} MiB")
        self.used = True
        return config

    def restore(self, state, mem_fd: int, shared: bool = False, before_state=None, resume: bool = True) -> Microvm:
        """Slide ``mem_fd`` under guest memory (MAP_PRIVATE unless ``shared``), write ``state`` and resume.

        ``before_state(machine)`` runs after the remap and before any state is written (e.g. to register the
        memory with userfaultfd)."""
        config = self._take_for(state)
        self.memory_untouched = False
        machine = self.machine
        machine.memory.remap_file(mem_fd, shared=shared)
        if before_state is not None:
            before_state(machine)
        restore_into(machine, state, self.serial_sink)
        machine.config = config
        if resume:
            resume_restored(machine)
        return machine

    def restore_from_page_server(self, state, backend_path: str, resume: bool = True,
                                 ready_timeout: float = 30.0) -> Microvm:
        """Lazy restore into this shell: its own placeholder memory (emptied first) is registered with a
        userfaultfd and handed to the page server at ``backend_path`` (vmm.uffd_backend); no remap, no slot."""
        from vmm.uffd_backend import UffdBackend, UffdBackendError
        config = self._take_for(state)
        machine = self.machine
        if not self.memory_untouched:  # every page must be missing so that it faults to the server
            # (not done needlessly: DONTNEED of 2 GiB costs ~0.6 ms here, through KVM's MMU notifier)
            for region in machine.memory.regions:
                lib.vmm_madvise(ffi.cast("void *", region.host_addr), region.size, lib.MADV_DONTNEED)
        self.memory_untouched = False
        backend = UffdBackend(machine.memory, backend_path)
        backend.write_while_attaching(lambda: restore_into(machine, state, self.serial_sink), ready_timeout)
        machine.config = config
        backend.set_failure_handler(lambda message: machine.fail(UffdBackendError(message)))
        if resume:
            resume_restored(machine)
        return machine

    def close(self) -> None:
        self.machine.close()
