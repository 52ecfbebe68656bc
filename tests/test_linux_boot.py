"""Linux boot protocol: image detection and zero page (fast), and a real kernel's early boot across a snapshot.

The real-kernel test boots Debian's cloud vmlinux, snapshots it after its first lines of log, and restores the
snapshot in a new process, which must continue the log. On PVM hosts the kernel's CPL 0 code is emulated
(../shared/FACTS.md), so it ends at an emulation failure; that ending is accepted once the log advanced.
"""
import re
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, requires_kvm, subprocess_env
from linux_kernel import KernelUnavailable, debian_cloud_kernel, newc_archive, write_initrd
from vmm import linux_boot
from vmm.config import MachineConfig, builtin_guest_image
from vmm.errors import GuestImageError
from vmm.memory import MiB, GuestMemory

# clearcpuid=cx16 and noxsave keep the kernel off `lock cmpxchg16b` (SLUB) and xsave/xrstor (FPU), which PVM's
# emulator lacks: without them the log stops at "Memory: ..." (~55 lines), with them it reaches the FPU set-up
# (~95 lines) and stops at the int3 self-test of the alternatives code.
BOOT_ARGS = "console=ttyS0 earlycon=uart8250,io,0x3f8 clearcpuid=cx16 noxsave"
GUEST_MEM_MIB = 128
LINES_BEFORE_SNAPSHOT = 25
MIN_NEW_LINES_AFTER_RESTORE = 10
FIRST_RUN_TIMEOUT_S = 90  # ~10 s to the first line and ~12 s to the snapshot point on the PVM hosts
RESTORED_RUN_S = 120  # the restored kernel reaches its emulation failure after ~30 s there
PRINTK_TIME = re.compile(rb"^\[\s*(\d+\.\d+)\]")
BAD_SIGNS = (b"Kernel panic", b"Oops", b"BUG:", b"general protection fault")

RESTORE_SCRIPT = """
import sys
from vmm.snapshot import load_snapshot_file_backed
machine = load_snapshot_file_backed(sys.argv[1], sys.argv[2])
stopped = machine.wait(float(sys.argv[3]))
end = "fault" if machine.fault else ("stopped" if stopped else "timeout")
print(f"restore-end: {end}: {machine.stop_reason}", file=sys.stderr)
machine.close()
"""


# -- fast checks: no kernel download, no /dev/kvm
def _fake_bzimage(kernel_code: bytes) -> bytes:
    image = bytearray(2 * 512)
    image[0x1F1] = 1  # setup_sects
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x201] = 0x6A  # header ends at 0x26c
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x020F)
    struct.pack_into("<I", image, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", image, 0x230, 0x200000)  # kernel_alignment
    struct.pack_into("<H", image, 0x236, 0x1)  # xloadflags: XLF_KERNEL_64
    struct.pack_into("<I", image, 0x238, 0x7FF)  # cmdline_size
    struct.pack_into("<Q", image, 0x258, 0x1000000)  # pref_address
    struct.pack_into("<I", image, 0x260, 0x400000)  # init_size
    return bytes(image) + kernel_code


def test_builtin_guest_is_not_linux():
    try:
        path = builtin_guest_image()
    except GuestImageError as exc:
        pytest.skip(str(exc))
    assert not linux_boot.is_linux_kernel(path)


def test_bzimage_load_zero_page_and_initrd(tmp_path):
    image_path = tmp_path / "bzImage"
    image_path.write_bytes(_fake_bzimage(b"KERNEL64"))
    initrd = newc_archive({"init": (0o100755, b"#!/bin/sh\n")})
    assert initrd.startswith(b"070701") and len(initrd) % 4 == 0
    initrd_path = tmp_path / "initrd"
    initrd_path.write_bytes(initrd)
    assert linux_boot.is_linux_kernel(str(image_path))
    memory = GuestMemory.anonymous(64 * MiB)
    try:
        kernel = linux_boot.load_bzimage(str(image_path), memory)
        assert kernel.entry == 0x1000200 and kernel.end == 0x1400000
        assert memory.read(0x1000000, 8) == b"KERNEL64"
        initrd_addr, initrd_size = linux_boot.load_initrd(str(initrd_path), memory, kernel)
        assert initrd_addr % 4096 == 0 and initrd_addr + initrd_size <= 64 * MiB < initrd_addr + 4096 + initrd_size
        assert memory.read(initrd_addr, len(initrd)) == initrd
        e820 = linux_boot.e820_map(memory)
        assert e820 == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 63 * MiB, 1)]
        page = linux_boot.build_zero_page(kernel, 0x20000, (initrd_addr, initrd_size), e820)
    finally:
        memory.close()
    assert page[0x202:0x206] == b"HdrS" and page[0x210] == 0xFF and page[0x211] & 1
    assert struct.unpack_from("<III", page, 0x218)[:2] == (initrd_addr, initrd_size)
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x20000
    assert page[0x1E8] == 3 and struct.unpack_from("<QQI", page, 0x2D0 + 20 * 2) == (0x100000, 63 * MiB, 1)


# -- the real kernel
class SerialLog:
    """Collects the guest's UART output (from the vCPU thread) and notes when the first byte came."""

    def __init__(self):
        self.data = bytearray()
        self.first_output_at = None
        self._lock = threading.Lock()

    def sink(self, chunk: bytes) -> None:
        with self._lock:
            if self.first_output_at is None:
                self.first_output_at = time.perf_counter()
            self.data += chunk

    def lines(self) -> list[bytes]:
        with self._lock:
            return bytes(self.data).split(b"\n")[:-1]


def _printk_times(lines: list[bytes]) -> list[float]:
    return [float(m.group(1)) for m in map(PRINTK_TIME.match, lines) if m]


@pytest.fixture(scope="module")
def kernel():
    try:
        return debian_cloud_kernel()
    except KernelUnavailable as exc:
        pytest.skip(f"Debian's cloud kernel is unavailable: {exc}")


@requires_kvm
@pytest.mark.slow
def test_linux_early_boot_continues_after_restore_in_new_process(kernel, tmp_path):
    from vmm.machine import Microvm
    from vmm.snapshot import create_snapshot

    assert linux_boot.is_linux_kernel(kernel.vmlinux)
    config = MachineConfig(mem_size_mib=GUEST_MEM_MIB, kernel_image=kernel.vmlinux, boot_args=BOOT_ARGS,
                           initrd_path=write_initrd(str(tmp_path / "initrd.cpio")))
    log = SerialLog()
    machine = Microvm(config, serial_sink=log.sink)
    try:
        booted_at = time.perf_counter()
        machine.boot()
        deadline = time.monotonic() + FIRST_RUN_TIMEOUT_S
        while len(log.lines()) < LINES_BEFORE_SNAPSHOT and not machine.stopped.is_set():
            assert time.monotonic() < deadline, f"only {len(log.lines())} lines after {FIRST_RUN_TIMEOUT_S} s"
            time.sleep(0.05)
        assert not machine.stopped.is_set(), f"the kernel stopped early: {machine.stop_reason}\n{bytes(log.data)}"
        machine.pause()
        create_snapshot(machine, str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem"))
        machine.stop()
    finally:
        machine.close()
    first = bytes(log.data)
    print(f"first line {log.first_output_at - booted_at:.1f} s after boot; "
          f"{len(log.lines())} lines before the snapshot")
    assert b"Linux version" in first and b"Command line: " + BOOT_ARGS.encode() in first
    assert b"earlycon: uart8250 at I/O port 0x3f8" in first

    started = time.perf_counter()
    restore_command = [sys.executable, "-c", RESTORE_SCRIPT, str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem"),
                       str(RESTORED_RUN_S)]
    restored = subprocess.run(restore_command, cwd=ROOT, env=subprocess_env(), capture_output=True,
                              timeout=RESTORED_RUN_S + 60)
    print(f"restored process ran {time.perf_counter() - started:.1f} s; {restored.stderr.decode().strip()}")
    more = restored.stdout
    assert restored.returncode == 0, restored.stderr.decode()
    end = re.search(r"restore-end: (\w+): (.*)", restored.stderr.decode())
    assert end and end.group(1) in ("fault", "timeout"), restored.stderr.decode()

    first_lines, all_lines = first.split(b"\n")[:-1], (first + more).split(b"\n")[:-1]
    new_lines = all_lines[len(first_lines):]
    assert len(new_lines) >= MIN_NEW_LINES_AFTER_RESTORE, more.decode(errors="replace")
    assert b"Linux version" not in more, "the restored guest rebooted instead of continuing"
    assert b"printk: console [ttyS0] enabled" in more, "the 8250 console did not take over from earlycon"
    times = _printk_times(all_lines)
    assert times == sorted(times), "the log went back in time: lines were repeated after the restore"
    assert _printk_times(new_lines)[0] >= _printk_times(first_lines)[-1]
    for sign in BAD_SIGNS:
        assert sign not in first + more, f"{sign.decode()} in the log:\n{(first + more).decode(errors='replace')}"
    if end.group(1) == "fault":
        assert "cannot emulate" in end.group(2) or "triple-faulted" in end.group(2), end.group(2)
