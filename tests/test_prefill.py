"""Pre-fill of a shared image's memfd from a loading set, before any restore (REAP/FaaSnap ahead of time).

Clones restored after a pre-fill see exactly the snapshot and take no userfaultfd fault for the set's chunks;
faults racing the pre-fill get correct data; unusable loading sets are refused with a clear error and the image
is served by plain lazy paging. No timing asserts.
"""
import os
import threading

import pytest

from bench.fault_service import GuestMemory, write_image
from snapd.image.builder import build_image
from snapd.loadset import LoadingSet, LoadingSetCorrupt, LoadingSetStale, default_path
from snapd.pageserver import CODEC_ZSTD, ChunkTable, LoadingSetWarning, PageServer
from tests.conftest import requires_kvm
from tests.vm_helpers import QUIET, assert_memory_equals_snapshot, snapshot_guest, snapshot_memory
from vmm import workloads
from vmm.prebuilt import PrebuiltVm, VmShape
from vmm.snapshot import read_snapshot
from vmm.uffd_backend import UffdBackend

KV_MIB = 8
MEM_MIB = 64
PAGE = 4096


# ---------------------------------------------------------------- without KVM: synthetic images

def synthetic(tmp_path, size=32 << 20, chunk=512 << 10, codecs=(1, 2, 3)):
    rnd = os.urandom(size // 2)
    data = rnd + bytes(size // 4) + rnd[: size // 4]  # data, then zero chunks, then data again
    return data, write_image(str(tmp_path), data, chunk, codecs=codecs)


def test_prefill_writes_the_set_in_order_and_a_clone_reads_it_without_faults(tmp_path):
    data, table = synthetic(tmp_path)
    n = len(table.chunks)
    order = tuple(range(n - 1, -1, -2))  # every other chunk, backwards
    with PageServer() as server:
        image = server.add_image(table, shared=True)
        st = image.prefill(LoadingSet(b"", table.chunk_size, table.mem_size, order), wait=True, timeout=30).stats()
        assert (st.total, st.done, st.filled, st.errors, st.running) == (len(order), len(order), len(order), 0, False)
        assert image.fill_order() == list(order) and image.present_chunks() == len(order)
        for c in order:
            off = c * table.chunk_size
            assert os.pread(image.memfd, table.chunk_size, off) == data[off:off + table.chunk_size]
        listener = server.serve(str(tmp_path / "s.sock"), image, "lazy", record=True)
        mem = GuestMemory(len(data), image.memfd)
        try:
            mem.connect(listener.sock_path).wait_ready(5)
            assert mem.read() == data  # every page, pre-filled or faulted
            vm = listener.wait_for_vms(1)[0]
            faulted = set(server.recorded_chunks(vm))
            assert faulted == set(range(n)) - set(order)  # no fault for a pre-filled chunk
            assert server.stats(vm).errors == 0
        finally:
            mem.close()
        # A second pre-fill of the same set finds everything present.
        again = image.prefill(LoadingSet(b"", table.chunk_size, table.mem_size, order), wait=True).stats()
        assert again.skipped == len(order) and again.filled == 0


@pytest.mark.parametrize("round_", range(3))
def test_faults_racing_the_prefill_get_correct_data(tmp_path, round_):
    """The guest side touches chunks in the pre-fill's own order just behind it, so its faults land on chunks
    the pre-fill is writing (they wait for it), on chunks it wrote (page-cache hits) and on chunks it has not
    reached (the fault path writes them and the pre-fill skips them). Every byte must be right."""
    data, table = synthetic(tmp_path, size=48 << 20, chunk=2 << 20, codecs=(CODEC_ZSTD,))
    n = len(table.chunks)
    order = tuple(range(n))
    with PageServer() as server:
        image = server.add_image(table, shared=True)
        listener = server.serve(str(tmp_path / "r.sock"), image, "lazy")
        mem = GuestMemory(len(data), image.memfd)
        try:
            mem.connect(listener.sock_path).wait_ready(5)
            toucher = threading.Thread(target=mem.touch, args=(0, len(data), PAGE))
            prefill = image.prefill(LoadingSet(b"", table.chunk_size, table.mem_size, order))
            toucher.start()  # touch() runs in C with the GIL released
            toucher.join(30)
            st = prefill.wait(30)
            assert not toucher.is_alive()
            assert mem.read() == data
            assert st.done == n and st.errors == 0
            assert st.filled + st.skipped + st.busy == n
            vm_stats = server.stats(listener.wait_for_vms(1)[0])
            assert vm_stats.errors == 0
            assert image.present_chunks() == n
            assert sorted(image.fill_order()) == list(range(n))  # each chunk written exactly once
            # The fault path wrote exactly the chunks the pre-fill did not.
            assert vm_stats.shared_fills == n - st.filled
        finally:
            mem.close()


def test_stale_or_corrupt_loading_set_is_refused_and_the_image_stays_lazy(tmp_path):
    data, table = synthetic(tmp_path, size=8 << 20)
    table.identity = bytes(range(32))
    stale = LoadingSet(bytes(32 * [7]), table.chunk_size, table.mem_size, (0, 1, 2))
    stale.save(tmp_path / "stale.loadset")
    (tmp_path / "corrupt.loadset").write_bytes(b"UVMLSET\0garbage")
    with PageServer() as server:
        image = server.add_image(table, shared=True)
        with pytest.raises(LoadingSetStale, match="stale.loadset.*re-record"):
            image.prefill(str(tmp_path / "stale.loadset"))
        with pytest.raises(LoadingSetCorrupt, match="corrupt.loadset"):
            image.prefill(str(tmp_path / "corrupt.loadset"))
        with pytest.raises(LoadingSetStale, match="chunk"):  # another geometry
            image.prefill(LoadingSet(table.identity, table.chunk_size * 2, table.mem_size, (0,)))
        assert image.present_chunks() == 0
        # Given through the table (as IMAGE.loadset beside a base image): a warning, then plain lazy paging.
        table.loading_set = str(tmp_path / "stale.loadset")
        with pytest.warns(LoadingSetWarning, match="stale.loadset.*plain lazy paging"):
            lazy = server.add_image(table, shared=True)
        assert isinstance(lazy.prefill_error, LoadingSetStale) and lazy.present_chunks() == 0
        listener = server.serve(str(tmp_path / "l.sock"), lazy, "lazy")
        mem = GuestMemory(len(data), lazy.memfd)
        try:
            mem.connect(listener.sock_path).wait_ready(5)
            assert mem.read() == data
        finally:
            mem.close()


def test_cancel_stops_a_prefill_and_leaves_every_written_chunk_whole(tmp_path):
    data, table = synthetic(tmp_path, size=48 << 20, chunk=2 << 20, codecs=(CODEC_ZSTD,))
    with PageServer() as server:
        image = server.add_image(table, shared=True)
        prefill = image.prefill(LoadingSet(b"", table.chunk_size, table.mem_size, tuple(range(len(table.chunks)))))
        prefill.cancel()
        st = prefill.stats()
        assert not st.running and st.cancelled and st.done < st.total
        for c in image.fill_order():
            off = c * table.chunk_size
            assert os.pread(image.memfd, table.chunk_size, off) == data[off:off + table.chunk_size]


# ---------------------------------------------------------------- KVM: a real guest, as the daemon's clones run

@pytest.fixture(scope="module")
def kv_image(tmp_path_factory):
    """A kv snapshot, its image (64 KiB lz4 chunks), and a loading set recorded on the shared memfd of one lazy
    clone up to its first reply."""
    tmp = tmp_path_factory.mktemp("prefill")
    snapshot_guest(str(tmp), f"workload=kv kv_mib={KV_MIB}", mem_mib=MEM_MIB)
    build_image(str(tmp / "vm.mem"), str(tmp / "store"), str(tmp / "vm.img"), chunk_size=64 << 10, codec="lz4")
    state = read_snapshot(str(tmp / "vm.state"))
    with PageServer() as server:
        image = server.add_image(ChunkTable.from_base_image(str(tmp / "vm.img")), shared=True)
        listener = server.serve(str(tmp / "rec.sock"), image, "lazy")
        with Clone(state, image, listener.sock_path) as clone:
            clone.machine.resume()
            request = workloads.kv_request(1000, 1)
            workloads.verify_kv(1, KV_MIB, request, clone.machine.invoke(request))
        loading_set = image.recorded_loading_set()
    loading_set.save(default_path(tmp / "vm.img"))
    return tmp, state, loading_set


class Clone:
    """A clone as snapd/pool/worker.py restores one: a prebuilt VM whose memory is the image's memfd mapped
    MAP_PRIVATE over its placeholder, registered MISSING with the page server; not resumed."""

    def __init__(self, state, image, sock_path: str):
        self.prebuilt = PrebuiltVm(VmShape(1, MEM_MIB), serial_sink=QUIET)
        self.backends = []
        self.machine = self.prebuilt.restore(state, image.memfd, shared=False, resume=False,
                                             before_state=lambda m: self.backends.append(UffdBackend(m.memory, sock_path)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.prebuilt.close()
        for b in self.backends:
            b.close()


@requires_kvm
def test_clone_after_prefill_equals_the_snapshot_and_faults_on_no_chunk_of_the_set(kv_image):
    tmp, state, loading_set = kv_image
    assert len(loading_set.chunks) > KV_MIB * 16 // 2  # the kv table's chunks, mostly
    with PageServer() as server:
        # The table carries IMAGE.loadset: add_image pre-fills from it (as the daemon's shards do).
        table = ChunkTable.from_base_image(str(tmp / "vm.img"))
        assert table.loading_set == default_path(tmp / "vm.img")
        image = server.add_image(table, shared=True)
        st = image._prefill.wait(30)
        assert st.filled == len(loading_set.chunks) and st.errors == 0
        listener = server.serve(str(tmp / "pf.sock"), image, "lazy", record=True)
        with Clone(state, image, listener.sock_path) as clone:
            vm = listener.wait_for_vms(1)[0]
            assert_memory_equals_snapshot(clone.machine, str(tmp / "vm.mem"))
            assert not set(server.recorded_chunks(vm)) & set(loading_set.chunks)  # every set chunk: page cache
            clone.machine.resume()
            server.start_recording(vm)
            for seed in (7, 8):  # other requests than the recorded one
                request = workloads.kv_request(1000, seed)
                workloads.verify_kv(1, KV_MIB, request, clone.machine.invoke(request))
            assert not set(server.recorded_chunks(vm)) & set(loading_set.chunks)
            assert server.stats(vm).errors == 0


@requires_kvm
def test_clone_restored_while_the_prefill_runs_equals_the_snapshot(kv_image):
    tmp, state, loading_set = kv_image
    with PageServer() as server:
        table = ChunkTable.from_base_image(str(tmp / "vm.img"))
        image = server.add_image(table, shared=True, prefill=False)
        listener = server.serve(str(tmp / "race.sock"), image, "lazy")
        prefill = image.prefill(loading_set)  # and at once a clone faults through the same chunks
        with Clone(state, image, listener.sock_path) as clone:
            # What the clone sees, read through its faults while the pre-fill writes the same chunks.
            assert_memory_equals_snapshot(clone.machine, str(tmp / "vm.mem"))
            clone.machine.resume()
            request = workloads.kv_request(1000, 9)
            workloads.verify_kv(1, KV_MIB, request, clone.machine.invoke(request))
            st = prefill.wait(30)
            assert st.errors == 0 and st.done == len(loading_set.chunks)
            assert_shared_copy_equals_snapshot(image, str(tmp / "vm.mem"))


def assert_shared_copy_equals_snapshot(image, mem_path: str) -> None:
    """After the guest ran, its own writes differ from the snapshot; the shared memfd must not: every chunk
    in it equals the snapshot's bytes."""
    expected = snapshot_memory(mem_path, image.mem_size)
    for c in image.fill_order():
        off = c * image.chunk_size
        assert os.pread(image.memfd, image.chunk_size, off) == expected[off:off + image.chunk_size], c


# ---------------------------------------------------------------- the daemon: POST /v1/images with a loading set

@requires_kvm
def test_daemon_prefills_an_image_registered_with_a_loading_set(tmp_path):
    from tests.daemon_helpers import RunningDaemon, hello_snapshot
    from tests.daemon_helpers import MEM_MIB, clone_memory
    from tests.vm_helpers import assert_equals_snapshot, snapshot_memory
    state, mem = hello_snapshot(tmp_path)
    daemon = RunningDaemon(str(tmp_path / "state"), pool_size=1)
    try:
        api = daemon.client
        first = api.register_image(state, mem, chunk_size=64 << 10)["id"]
        (c1,) = api.create_clones(first, payload=b"one")
        recorded = api.request("POST", f"/v1/images/{first}/loading-set", {}).json()
        assert recorded["chunks"] > 0
        reply = api.request("POST", "/v1/images", {"state_path": state, "mem_path": mem, "chunk_size": 64 << 10,
                                                   "loading_set": recorded["path"]})
        assert reply.status == 201, reply.body
        second = reply.json()
        assert second["loading_set"]["error"] == "" and second["loading_set"]["chunks"] == recorded["chunks"]
        shard = daemon.daemon.images[second["id"]].shards[0]
        st = shard.image._prefill.wait(30)
        # (a warm worker prepared ahead of requests may have faulted some of them in first: skipped or busy)
        assert st.filled + st.skipped + st.busy == recorded["chunks"] and st.errors == 0
        assert shard.image.present_chunks() >= recorded["chunks"]
        before = shard.faults()["faults"]
        (c2,) = api.create_clones(second["id"])
        assert shard.faults()["faults"] - before <= 2  # the restore found its working set in the page cache
        mailbox = read_snapshot(state).devices.fnport.mailbox_pfn << 12
        assert_equals_snapshot(clone_memory(daemon, c2["id"]), snapshot_memory(mem, MEM_MIB << 20), mailbox)
        before = shard.faults()["faults"]  # (reading every page above faulted the chunks outside the set)
        workloads.verify_hello(b"two", api.invoke(c2["id"], b"two"), 1)
        assert shard.faults()["faults"] - before == 0  # nothing left to fault for the invocation
        status = api.request("GET", f"/v1/images/{second['id']}/loading-set").json()
        assert status["prefill"][0]["present_chunks"] >= recorded["chunks"]
        bad = api.request("POST", "/v1/images", {"state_path": state, "mem_path": mem,
                                                 "loading_set": str(tmp_path / "missing.loadset")})
        assert bad.status == 404 and "missing.loadset" in bad.json()["fault_message"]  # nothing there
        for c in (c1, c2):
            api.delete_clone(c["id"])
    finally:
        daemon.close()
