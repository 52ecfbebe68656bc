"""The hostile test guest (tests/guests/hostile.c): its build, its snapshot, and what its requests expect.

Used by tests/test_hostile_guests.py and bench/hostile.py. The guest is built by `make -C tests/guests` (into
tests/guests/build/, from its own source and the built-in guest's shared objects); a snapshot of it is taken as
of the built-in guest (vmm.snapshot.snapshot_builtin_guest): booted, run to its first FN_NEXT, paused, saved.
"""
import os
import subprocess

from vmm.snapshot import snapshot_builtin_guest

HERE = os.path.dirname(os.path.abspath(__file__))
ELF = os.path.join(HERE, "build", "hostile.elf")
FN_PORT_BASE, FN_NEXT, FN_MAILBOX, FN_DONE = 0x0F40, 0x0F48, 0x0F44, 0x0F4C
STRING_ACCESSES = 10  # the sweep's rep ins/outs exits after the port loop (hostile.c ports())


def build() -> str:
    """Build the hostile guest (make decides whether anything changed); its ELF path."""
    subprocess.run(["make", "-s", "-C", HERE], check=True)
    return ELF


def snapshot(directory: str, name: str, boot_args: str = "", mem_mib: int = 64) -> tuple[str, str]:
    """Boot the hostile guest with ``boot_args``, wait for its first FN_NEXT, snapshot it as NAME.state and
    NAME.mem in ``directory``; returns their paths."""
    return snapshot_builtin_guest(directory, mem_mib, boot_args, name, kernel_image=build())


def sweep_accesses(first: int, count: int) -> int:
    """The access count a `ports FIRST COUNT` reply carries (hostile.c ports())."""
    total = 0
    for port in range(first, min(first + count, 0x10000)):
        for width in (1, 2, 4):
            if port + width > 0x10000:
                continue
            total += not (width == 4 and port == FN_NEXT)  # the in
            total += not (width == 4 and port in (FN_MAILBOX, FN_DONE))  # the out
    return total + STRING_ACCESSES
