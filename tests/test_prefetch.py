"""Record a working set on a lazy KVM restore, then restore with prefetch: every guest page equals the
snapshot's and the guest's reply is verified; an unusable loading set falls back to lazy paging."""
import time

import pytest

from snapd.image.builder import build_image
from snapd.loadset import LoadingSet, default_path
from snapd.pageserver import ChunkTable, LoadingSetWarning, PageServer
from tests.conftest import requires_kvm
from tests.vm_helpers import QUIET, guest_memory_bytes
from vmm import workloads
from vmm.config import MachineConfig
from vmm.devices.fnport import OFF_GENERATION
from vmm.machine import Microvm
from vmm.snapshot import create_snapshot, load_snapshot_uffd_backed

pytestmark = requires_kvm
KV_MIB = 8
MEM_MIB = 64


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A kv snapshot, its image (64 KiB chunks), and a loading set recorded on one lazy restore up to the first reply."""
    tmp = tmp_path_factory.mktemp("prefetch")
    machine = Microvm(MachineConfig(mem_size_mib=MEM_MIB, boot_args=f"workload=kv kv_mib={KV_MIB}"), serial_sink=QUIET)
    try:
        machine.boot()
        machine.wait_ready(10)
        machine.pause()
        create_snapshot(machine, str(tmp / "vm.state"), str(tmp / "vm.mem"))
    finally:
        machine.close()
    build_image(str(tmp / "vm.mem"), str(tmp / "store"), str(tmp / "vm.img"), chunk_size=64 << 10, codec="lz4")
    with PageServer() as server:
        image = server.add_image(ChunkTable.from_base_image(str(tmp / "vm.img")))
        listener = server.serve(str(tmp / "rec.sock"), image, "lazy", record=True)
        machine = load_snapshot_uffd_backed(str(tmp / "vm.state"), listener.sock_path, serial_sink=QUIET)
        try:
            request = workloads.kv_request(1000, 1)
            workloads.verify_kv(1, KV_MIB, request, machine.invoke(request))
            vm = listener.wait_for_vms(1)[0]
            loading_set = server.stop_recording(vm)
            stats = server.stats(vm)
        finally:
            machine.close()
    loading_set.save(default_path(tmp / "vm.img"))
    return tmp, loading_set, stats


def expected_memory(tmp, machine) -> bytes:
    with open(tmp / "vm.mem", "rb") as f:
        expected = bytearray(f.read().ljust(MEM_MIB << 20, b"\0"))
    field = machine.fnport.mailbox_gpa + OFF_GENERATION  # the restore's new generation id and entropy
    expected[field:field + 40] = machine.memory.read(field, 40)
    return bytes(expected)


def test_recording_is_the_faulted_chunks_in_first_touch_order(recorded):
    tmp, loading_set, stats = recorded
    nchunks = (MEM_MIB << 20) // (64 << 10)
    assert loading_set.chunks and len(set(loading_set.chunks)) == len(loading_set.chunks)
    assert all(0 <= c < nchunks for c in loading_set.chunks)
    assert len(loading_set.chunks) == stats.chunks_installed == stats.recorded  # each faulted chunk, once
    # The kv table lives at 2 MiB+: 1000 random lookups over 8 MiB touch nearly every one of its 128 chunks.
    table_chunks = set(range(32, 32 + KV_MIB * 16))
    assert len(table_chunks & set(loading_set.chunks)) > 100
    # First touches precede the table: the guest runs its code (low memory) before its first lookup.
    assert loading_set.chunks[0] not in table_chunks
    assert LoadingSet.load(default_path(tmp / "vm.img")).chunks == loading_set.chunks


def test_prefetch_concurrent_with_the_guest_answers(recorded):
    """The guest runs while the stream installs: its faults are served ahead of the stream."""
    tmp, loading_set, _ = recorded
    with PageServer() as server:
        image = server.add_image(ChunkTable.from_base_image(str(tmp / "vm.img")))
        listener = server.serve(str(tmp / "pfc.sock"), image, "prefetch", loading_set=loading_set)
        machine = load_snapshot_uffd_backed(str(tmp / "vm.state"), listener.sock_path, serial_sink=QUIET)
        try:
            for seed in (3, 4):
                request = workloads.kv_request(1000, seed)
                workloads.verify_kv(1, KV_MIB, request, machine.invoke(request))
            st = server.stats(listener.wait_for_vms(1)[0])
            assert st.errors == 0 and st.prefetch_bytes > 0
        finally:
            machine.close()


def test_prefetch_restore_is_byte_identical_and_answers(recorded):
    tmp, loading_set, _ = recorded
    with PageServer() as server:
        image = server.add_image(ChunkTable.from_base_image(str(tmp / "vm.img")))
        listener = server.serve(str(tmp / "pf.sock"), image, "prefetch", loading_set=default_path(tmp / "vm.img"))
        machine = load_snapshot_uffd_backed(str(tmp / "vm.state"), listener.sock_path, resume=False,
                                            serial_sink=QUIET)
        try:
            vm = listener.wait_for_vms(1)[0]
            deadline = time.monotonic() + 10
            while server.stats(vm).prefetch_pending:  # let the stream finish, then read every page
                assert time.monotonic() < deadline
                time.sleep(0.005)
            assert server.stats(vm).prefetch_chunks == len(loading_set.chunks)
            assert guest_memory_bytes(machine) == expected_memory(tmp, machine)
            machine.resume()
            request = workloads.kv_request(1000, 77)  # another invocation than the recorded one
            workloads.verify_kv(1, KV_MIB, request, machine.invoke(request))
            st = server.stats(vm)
            assert st.errors == 0 and st.prefetch_bytes > 0
        finally:
            machine.close()


def test_stale_loading_set_falls_back_to_lazy_with_a_warning(recorded, tmp_path):
    tmp, loading_set, _ = recorded
    stale = LoadingSet(bytes(32 * [1]), loading_set.chunk_size, loading_set.mem_size, loading_set.chunks)
    stale.save(tmp_path / "stale.loadset")
    with PageServer() as server:
        image = server.add_image(ChunkTable.from_base_image(str(tmp / "vm.img")))
        with pytest.warns(LoadingSetWarning, match="stale.loadset.*re-record"):
            listener = server.serve(str(tmp_path / "ps.sock"), image, "prefetch",
                                    loading_set=str(tmp_path / "stale.loadset"))
        machine = load_snapshot_uffd_backed(str(tmp / "vm.state"), listener.sock_path, resume=False,
                                            serial_sink=QUIET)
        try:
            assert guest_memory_bytes(machine) == expected_memory(tmp, machine)
            machine.resume()
            request = workloads.kv_request(1000, 5)
            workloads.verify_kv(1, KV_MIB, request, machine.invoke(request))
            assert server.stats(listener.wait_for_vms(1)[0]).prefetch_chunks == 0
        finally:
            machine.close()
