"""Record a working set on a lazy KVM restore, then restore with prefetch (the set staged ahead of the restore,
or streamed per VM): every guest page equals the snapshot's and the guest's reply is verified; an unusable
loading set falls back to lazy paging."""

import pytest

from snapd.image.builder import build_image
from snapd.loadset import LoadingSet, default_path
from snapd.pageserver import ChunkTable, LoadingSetWarning, PageServer
from tests.conftest import requires_kvm, wait_until
from tests.vm_helpers import QUIET, assert_memory_equals_snapshot
from vmm import workloads
from vmm.config import MachineConfig
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
            machine.pause()  # no fault after the reply races the counts read below (under load one did)
            vm = listener.wait_for_vms(1)[0]
            settled = wait_until(lambda: server.stats(vm).chunks_installed == server.stats(vm).recorded, 5)
            assert settled, f"the page server's counts did not settle: {server.stats(vm)}"
            loading_set = server.stop_recording(vm)
            stats = server.stats(vm)
        finally:
            machine.close()
    loading_set.save(default_path(tmp / "vm.img"))
    return tmp, loading_set, stats


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
            assert_set_installed(wait_stream(server, vm), len(loading_set.chunks))
            assert_memory_equals_snapshot(machine, str(tmp / "vm.mem"))
            machine.resume()
            request = workloads.kv_request(1000, 77)  # another invocation than the recorded one
            workloads.verify_kv(1, KV_MIB, request, machine.invoke(request))
            st = server.stats(vm)
            assert st.errors == 0 and st.prefetch_bytes > 0
        finally:
            machine.close()


def assert_set_installed(st, n: int) -> None:
    """Each chunk of an n-chunk loading set went in once: by the stream, or by a fault that got to it first (the
    VMM writes guest memory as it restores, so a fault may beat the stream to a chunk; under load it did)."""
    assert st.prefetch_chunks <= n <= st.prefetch_chunks + st.prefetch_faults, st


def wait_stream(server, vm):
    """Let the stream finish (then every page can be read); its stats."""
    assert wait_until(lambda: not server.stats(vm).prefetch_pending, 10), "the prefetch stream did not finish"
    return server.stats(vm)


def test_staged_prefetch_is_byte_identical_and_answers(recorded):
    """The set is decompressed into the staging buffer when served, before any VM connects; the VM gets it
    from the buffer in UFFDIO_COPY runs, then every page equals the snapshot's and the guest answers."""
    tmp, loading_set, _ = recorded
    with PageServer() as server:
        image = server.add_image(ChunkTable.from_base_image(str(tmp / "vm.img")))
        listener = server.serve(str(tmp / "st.sock"), image, "prefetch", loading_set=default_path(tmp / "vm.img"))
        staged = listener.stage.wait(10)  # staged ahead of the restore
        assert staged.complete and staged.errors == 0 and staged.over_limit == 0
        assert staged.staged + staged.zero_chunks == len(loading_set.chunks)
        assert 0 < staged.bytes <= staged.capacity
        machine = load_snapshot_uffd_backed(str(tmp / "vm.state"), listener.sock_path, resume=False,
                                            serial_sink=QUIET)
        try:
            vm = listener.wait_for_vms(1)[0]
            st = wait_stream(server, vm)
            assert_set_installed(st, len(loading_set.chunks))
            assert st.stage_chunks <= len(loading_set.chunks) <= st.stage_chunks + st.stage_faults
            assert st.stage_fallbacks == 0
            assert 0 < st.stage_ioctls <= st.stage_chunks  # adjacent chunks share one UFFDIO_COPY
            assert_memory_equals_snapshot(machine, str(tmp / "vm.mem"))
            machine.resume()
            request = workloads.kv_request(1000, 78)  # another invocation than the recorded one
            workloads.verify_kv(1, KV_MIB, request, machine.invoke(request))
            st = server.stats(vm)
            assert st.errors == 0 and st.state == "active"
        finally:
            machine.close()
        listener.close()
        assert listener.stage._ptr is None  # buffer released with the listener


def test_staged_prefetch_concurrent_with_the_guest_answers(recorded):
    """Resumed at once, racing the staged stream: faults on staged chunks are served from the buffer."""
    tmp, loading_set, _ = recorded
    with PageServer() as server:
        image = server.add_image(ChunkTable.from_base_image(str(tmp / "vm.img")))
        listener = server.serve(str(tmp / "stc.sock"), image, "prefetch", loading_set=loading_set)
        listener.stage.wait(10)
        machine = load_snapshot_uffd_backed(str(tmp / "vm.state"), listener.sock_path, serial_sink=QUIET)
        try:
            for seed in (13, 14):
                request = workloads.kv_request(1000, seed)
                workloads.verify_kv(1, KV_MIB, request, machine.invoke(request))
            st = wait_stream(server, listener.wait_for_vms(1)[0])
            assert st.errors == 0 and st.stage_chunks + st.stage_faults > 0
        finally:
            machine.close()


def test_staging_limit_and_unstaged_chunks_fall_back_to_the_normal_path(recorded):
    """A limit smaller than the set: the rest is decompressed per VM as before; memory still identical."""
    tmp, loading_set, _ = recorded
    with PageServer() as server:
        image = server.add_image(ChunkTable.from_base_image(str(tmp / "vm.img")))
        listener = server.serve(str(tmp / "sl.sock"), image, "prefetch", loading_set=loading_set,
                                stage_limit=16 * image.chunk_size)
        staged = listener.stage.wait(10)
        assert staged.over_limit > 0 and staged.bytes <= 16 * image.chunk_size
        machine = load_snapshot_uffd_backed(str(tmp / "vm.state"), listener.sock_path, resume=False,
                                            serial_sink=QUIET)
        try:
            st = wait_stream(server, listener.wait_for_vms(1)[0])
            assert_set_installed(st, len(loading_set.chunks))
            assert st.stage_fallbacks >= staged.over_limit and st.stage_chunks > 0
            assert_memory_equals_snapshot(machine, str(tmp / "vm.mem"))
            machine.resume()
            request = workloads.kv_request(1000, 79)
            workloads.verify_kv(1, KV_MIB, request, machine.invoke(request))
        finally:
            machine.close()


def test_streamed_prefetch_without_staging_is_byte_identical(recorded):
    tmp, loading_set, _ = recorded
    with PageServer() as server:
        image = server.add_image(ChunkTable.from_base_image(str(tmp / "vm.img")))
        listener = server.serve(str(tmp / "ns.sock"), image, "prefetch", loading_set=loading_set, stage=False)
        assert listener.stage is None
        machine = load_snapshot_uffd_backed(str(tmp / "vm.state"), listener.sock_path, resume=False,
                                            serial_sink=QUIET)
        try:
            st = wait_stream(server, listener.wait_for_vms(1)[0])
            assert_set_installed(st, len(loading_set.chunks))
            assert st.stage_chunks == 0
            assert_memory_equals_snapshot(machine, str(tmp / "vm.mem"))
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
        assert listener.stage is None  # nothing staged from a refused set
        machine = load_snapshot_uffd_backed(str(tmp / "vm.state"), listener.sock_path, resume=False,
                                            serial_sink=QUIET)
        try:
            assert_memory_equals_snapshot(machine, str(tmp / "vm.mem"))
            machine.resume()
            request = workloads.kv_request(1000, 5)
            workloads.verify_kv(1, KV_MIB, request, machine.invoke(request))
            st = server.stats(listener.wait_for_vms(1)[0])
            assert st.prefetch_chunks == 0 and st.stage_chunks == 0 and st.stage_faults == 0
        finally:
            machine.close()
