"""Linux boot protocol (placeholder until the loader lands): detection only."""
from vmm.errors import GuestImageError


def is_linux_kernel(path: str) -> bool:
    return False


def boot_linux(machine) -> None:
    raise GuestImageError("Linux kernels are not supported yet")
