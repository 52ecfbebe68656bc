"""Helpers shared by the KVM tests: snapshot a booted built-in guest; compare restored memory with a snapshot."""
import os

from snapd.snapfile import read_memory_trailer
from vmm.config import MachineConfig
from vmm.devices.fnport import OFF_GENERATION
from vmm.machine import Microvm
from vmm.snapshot import create_snapshot

QUIET = lambda data: None  # noqa: E731  (a serial sink that drops the guest's console)
GENERATION_AND_ENTROPY = 40  # bytes at mailbox + OFF_GENERATION that every restore rewrites (VMGenID)
PAGE = 4096


def snapshot_guest(directory, boot_args: str, mem_mib: int = 64, vcpus: int = 1, invokes: int = 0,
                   track_dirty_pages: bool = False) -> tuple[str, str]:
    """Boot the built-in guest, let it finish its init phase, invoke it ``invokes`` times, pause and snapshot it.
    Returns (state path, memory file path)."""
    machine = Microvm(MachineConfig(mem_size_mib=mem_mib, vcpu_count=vcpus, boot_args=boot_args,
                                    track_dirty_pages=track_dirty_pages), serial_sink=QUIET)
    try:
        machine.boot()
        machine.wait_ready(10)
        for _ in range(invokes):
            machine.invoke(b"before")
        machine.pause()
        paths = (os.path.join(directory, "vm.state"), os.path.join(directory, "vm.mem"))
        create_snapshot(machine, *paths)
    finally:
        machine.close()
    return paths


def guest_memory_bytes(machine) -> bytes:
    return b"".join(machine.memory.read(r.guest_phys_addr, r.size) for r in machine.memory.regions)


def snapshot_memory(mem_path: str, size: int) -> bytes:
    """A snapshot's memory file as guest memory of ``size`` bytes: what precedes its identity trailer (the trailer
    is not guest memory; docs/snapshot-format.md), which must say exactly ``size`` bytes."""
    with open(mem_path, "rb") as f:
        trailer = read_memory_trailer(f.fileno(), mem_path)
        assert trailer.data_size == size, (trailer.data_size, size)
        return os.pread(f.fileno(), size, 0)


def assert_equals_snapshot(memory: bytes, expected: bytes, mailbox_gpa: int) -> None:
    """Guest memory equals the snapshot's byte for byte, except the mailbox's generation id and entropy, which
    a restore rewrites by design (as VMGenID does); names the first page that differs."""
    field = mailbox_gpa + OFF_GENERATION
    expected = bytearray(expected)
    expected[field:field + GENERATION_AND_ENTROPY] = memory[field:field + GENERATION_AND_ENTROPY]
    assert len(memory) == len(expected)
    if memory != bytes(expected):
        first = next(i for i in range(0, len(memory), PAGE) if memory[i:i + PAGE] != expected[i:i + PAGE])
        raise AssertionError(f"guest memory differs from the snapshot, first at page {first // PAGE}")


def assert_memory_equals_snapshot(machine, mem_path: str) -> None:
    """The machine's guest memory, as assert_equals_snapshot."""
    assert_equals_snapshot(guest_memory_bytes(machine), snapshot_memory(mem_path, machine.memory.size),
                           machine.fnport.mailbox_gpa)
