"""Snapshot fidelity in one process: every state item round-trips, clones continue independently, Diff
snapshots hold exactly the written pages. (Cross-process fidelity: tests/test_snapshot_processes.py.)"""
import os

import pytest

from tests.conftest import requires_kvm
from tests.vm_helpers import QUIET, snapshot_guest, snapshot_memory
from vmm import workloads
from vmm.config import MachineConfig
from vmm.machine import Microvm
from vmm.snapshot import (SnapshotError, capture_state, create_snapshot, load_snapshot_file_backed,
                          read_snapshot, rebase_snapshot)

pytestmark = requires_kvm


def booted(mem_mib=64, vcpus=1, boot_args="workload=hello", track=False, dirty_log="bitmap") -> Microvm:
    machine = Microvm(MachineConfig(mem_size_mib=mem_mib, vcpu_count=vcpus, boot_args=boot_args,
                                    track_dirty_pages=track, dirty_log=dirty_log), serial_sink=QUIET)
    machine.boot()
    machine.wait_ready(10)
    return machine


def _pit_without_load_times(pit2: bytes) -> bytes:
    channel = 24
    return b"".join(pit2[i * channel:i * channel + 16] for i in range(3)) + pit2[3 * channel:]


@pytest.fixture
def hello_snapshot(tmp_path):
    paths = snapshot_guest(str(tmp_path), "workload=hello", vcpus=2, invokes=3)
    return paths, read_snapshot(paths[0])


def test_every_state_item_round_trips(hello_snapshot):
    """Save, restore into a fresh VM, save again: equal, item by item (the generation id is new by design)."""
    (state_path, mem_path), original = hello_snapshot
    restored = load_snapshot_file_backed(state_path, mem_path, resume=False, serial_sink=QUIET)
    try:
        again = capture_state(restored)
    finally:
        restored.close()
    # The PIT's count_load_time (bytes 16-23 of each 24-byte channel) and kvmclock are host-time stamps that
    # keep moving; everything else in the VM state must be identical.
    assert _pit_without_load_times(again.vm.pit2) == _pit_without_load_times(original.vm.pit2)
    assert 0 <= again.vm.clock_ns - original.vm.clock_ns < 5 * 10**9
    for chip in ("pic_master", "pic_slave", "ioapic"):
        assert getattr(again.vm, chip) == getattr(original.vm, chip), chip
    assert again.memory == original.memory and again.config == original.config
    assert again.devices.serial == original.devices.serial
    assert again.devices.i8042 == original.devices.i8042
    for before, after in zip(original.vcpus, again.vcpus):
        for field in ("mp_state", "regs", "sregs", "xsave", "xcrs", "debugregs", "lapic", "tsc_khz", "cpuid",
                      "vcpu_events"):
            assert getattr(after, field) == getattr(before, field), field
        # The TSC keeps counting while the snapshot is restored; every other MSR must be identical.
        tsc_index = 0x10
        assert [m for m in after.msrs if m[0] != tsc_index] == [m for m in before.msrs if m[0] != tsc_index]
    port_before, port_after = original.devices.fnport, again.devices.fnport
    assert port_after.generation != port_before.generation  # a restore is a new generation (VMGenID)
    assert (port_after.seq, port_after.mailbox_pfn) == (port_before.seq, port_before.mailbox_pfn)


def test_many_restores_continue_independently(hello_snapshot):
    (state_path, mem_path), _ = hello_snapshot
    clones = [load_snapshot_file_backed(state_path, mem_path, serial_sink=QUIET) for _ in range(4)]
    try:
        randoms = set()
        for round_number in range(3):
            for clone in clones:
                request = f"clone round {round_number}".encode()
                reply = workloads.verify_hello(request, clone.invoke(request), count=4 + round_number)
                randoms.add(reply.random)
        assert len(randoms) == 12  # every clone got fresh entropy: no two replies share a random value
    finally:
        for clone in clones:
            clone.close()


def test_snapshot_of_running_vm_is_refused(tmp_path):
    machine = booted()
    try:
        with pytest.raises(SnapshotError, match="must be paused"):
            create_snapshot(machine, str(tmp_path / "s"), str(tmp_path / "m"))
        assert not os.path.exists(tmp_path / "s") and not os.path.exists(tmp_path / "m")
    finally:
        machine.close()


def test_memory_file_shorter_than_layout_is_refused(hello_snapshot, tmp_path):
    (state_path, mem_path), _ = hello_snapshot
    short = tmp_path / "short.mem"
    with open(mem_path, "rb") as src:
        short.write_bytes(src.read(1 << 20))
    with pytest.raises(SnapshotError, match="short.mem: does not end with a memory identity trailer"):
        load_snapshot_file_backed(state_path, str(short), serial_sink=QUIET)


@pytest.mark.parametrize("dirty_log", ["bitmap", "ring"])
def test_diff_snapshot_holds_exactly_the_written_pages(tmp_path, dirty_log):
    machine = booted(track=True, boot_args="workload=kv kv_mib=8", dirty_log=dirty_log)
    try:
        machine.pause()
        base_state, base_mem = str(tmp_path / "base.state"), str(tmp_path / "base.mem")
        create_snapshot(machine, base_state, base_mem)
        machine.resume()
        for i in range(3):
            machine.invoke(workloads.kv_request(100, i))
        machine.pause()
        diff_state, diff_mem = str(tmp_path / "diff.state"), str(tmp_path / "diff.mem")
        create_snapshot(machine, diff_state, diff_mem, snapshot_type="Diff")
        full_state, full_mem = str(tmp_path / "full.state"), str(tmp_path / "full.mem")
        create_snapshot(machine, full_state, full_mem)
    finally:
        machine.close()
    diff = read_snapshot(diff_state)
    assert diff.parent_snapshot_id == read_snapshot(base_state).snapshot_id
    dirty_pages = sum(count for _, count in diff.diff_page_runs)
    assert 0 < dirty_pages < 64  # a few stack, data and mailbox pages, not the 8 MiB table
    with pytest.raises(SnapshotError, match="Diff snapshot"):
        load_snapshot_file_backed(diff_state, diff_mem, serial_sink=QUIET)
    rebased_state, rebased_mem = str(tmp_path / "rebased.state"), str(tmp_path / "rebased.mem")
    rebase_snapshot(base_mem, diff_state, diff_mem, rebased_state, rebased_mem)
    size = read_snapshot(full_state).memory_file.data_size  # guest memory equal; each file has its own identity
    assert snapshot_memory(rebased_mem, size) == snapshot_memory(full_mem, size)
    assert read_snapshot(rebased_state).memory_file.id != read_snapshot(full_state).memory_file.id
    restored = load_snapshot_file_backed(rebased_state, rebased_mem, serial_sink=QUIET)
    try:
        request = workloads.kv_request(500, 99)
        workloads.verify_kv(1, 8, request, restored.invoke(request))
    finally:
        restored.close()


def test_diff_without_tracking_is_refused(tmp_path):
    machine = booted()
    try:
        machine.pause()
        with pytest.raises(SnapshotError, match="dirty page tracking"):
            create_snapshot(machine, str(tmp_path / "d"), str(tmp_path / "dm"), snapshot_type="Diff")
    finally:
        machine.close()


@pytest.mark.parametrize("damage, words", [
    (lambda data: data[: len(data) // 2], "truncated"),
    (lambda data: data[:100] + bytes([data[100] ^ 0x01]) + data[101:], "checksum"),
    (lambda data: b"NOTASNAP" + data[8:], "bad magic"),
    (lambda data: data[:8] + (99).to_bytes(2, "little") + data[10:], "newer"),
    (lambda data: b"", "empty"),
])
def test_damaged_state_file_is_refused_and_no_vm_is_left(hello_snapshot, tmp_path, damage, words):
    (state_path, mem_path), _ = hello_snapshot
    with open(state_path, "rb") as f:
        bad = tmp_path / "bad.state"
        bad.write_bytes(damage(f.read()))
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(SnapshotError, match=words):
        load_snapshot_file_backed(str(bad), mem_path, serial_sink=QUIET)
    assert len(os.listdir("/proc/self/fd")) == before  # no VM, vCPU or memory file left open


def test_oversized_state_file_is_refused_before_reading(tmp_path, hello_snapshot):
    (_, mem_path), _ = hello_snapshot
    huge = tmp_path / "huge.state"
    with open(huge, "wb") as f:
        f.truncate(1 << 30)  # sparse: costs no disk
    with pytest.raises(SnapshotError, match="exceeds the limit"):
        load_snapshot_file_backed(str(huge), mem_path, serial_sink=QUIET)


def test_prebuilt_vm_of_another_shape_is_refused(hello_snapshot):
    from vmm.prebuilt import PrebuiltVm, VmShape
    (state_path, mem_path), _ = hello_snapshot
    shell = PrebuiltVm(VmShape(1, 64), serial_sink=QUIET)  # the snapshot has 2 vCPUs
    try:
        fd = os.open(mem_path, os.O_RDONLY)
        try:
            with pytest.raises(SnapshotError, match="2 vCPUs"):
                shell.restore(read_snapshot(state_path), fd)
        finally:
            os.close(fd)
    finally:
        shell.close()
