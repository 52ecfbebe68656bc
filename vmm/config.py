"""The machine configuration: a plain value the CLI and the API build, and the VMM validates."""
import functools
import os
from dataclasses import dataclass

from vmm.errors import ConfigError, GuestImageError

MiB = 1 << 20
DEFAULT_MEM_MIB = 128
MAX_MEM_MIB = 60 * 1024  # the identity map covers 64 GiB; keep room for the MMIO hole
# Firecracker's limit (MAX_SUPPORTED_VCPUS; its API document says 1..32). One bound for the API, the CLI and a
# snapshot's state, so a state file claiming more vCPUs than the API would configure is refused when it loads.
MAX_VCPUS = 32


def builtin_guest_image() -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest", "guest.elf")
    if not os.path.exists(path):
        raise GuestImageError(f"the built-in guest is not built ({path} is missing): run `make -C vmm/guest`")
    return path


@functools.cache  # read once: a jailed worker validates configs with no /proc to read
def host_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return (int(fields["MemTotal"].split()[0]) + int(fields.get("SwapTotal", "0 kB").split()[0])) * 1024


@dataclass(frozen=True)
class MachineConfig:
    vcpu_count: int = 1
    mem_size_mib: int = DEFAULT_MEM_MIB
    kernel_image: str = ""  # empty: the built-in guest
    boot_args: str = "workload=hello"
    initrd_path: str = ""  # Linux kernels only
    track_dirty_pages: bool = False  # KVM dirty logging, for Diff snapshots
    dirty_log: str = "bitmap"  # "bitmap" (KVM_GET_DIRTY_LOG) or "ring" (KVM_CAP_DIRTY_LOG_RING); bench/dirty_log.py

    def validate(self, max_vcpus: int = MAX_VCPUS) -> "MachineConfig":
        """``max_vcpus``: the host's KVM limit; the bound is the smaller of it and MAX_VCPUS."""
        limit = min(max_vcpus, MAX_VCPUS)
        if not isinstance(self.vcpu_count, int) or not 1 <= self.vcpu_count <= limit:
            why = "Firecracker's limit" if limit == MAX_VCPUS else "this host's KVM limit"
            raise ConfigError(f"vcpu_count must be between 1 and {limit} ({why}), not {self.vcpu_count!r}")
        if not isinstance(self.mem_size_mib, int) or self.mem_size_mib < 2:
            raise ConfigError(f"mem_size_mib must be at least 2 MiB, not {self.mem_size_mib!r}")
        if self.mem_size_mib > MAX_MEM_MIB:
            raise ConfigError(f"mem_size_mib {self.mem_size_mib} is above this VMM's limit of {MAX_MEM_MIB} MiB")
        host = host_memory_bytes()
        if self.mem_size_mib * MiB > host:
            raise ConfigError(f"mem_size_mib {self.mem_size_mib} is more than this host has "
                              f"({host // MiB} MiB of RAM and swap)")
        if self.kernel_image and not os.path.isfile(self.kernel_image):
            raise GuestImageError(f"guest image {self.kernel_image} does not exist")
        if self.dirty_log not in ("bitmap", "ring"):
            raise ConfigError(f"dirty_log must be 'bitmap' or 'ring', not {self.dirty_log!r}")
        if self.initrd_path and not os.path.isfile(self.initrd_path):
            raise GuestImageError(f"initrd {self.initrd_path} does not exist")
        return self

    def image_path(self) -> str:
        return self.kernel_image or builtin_guest_image()

    @property
    def mem_size(self) -> int:
        return self.mem_size_mib * MiB
