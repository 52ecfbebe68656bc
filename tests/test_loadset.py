"""Loading sets without KVM: the file format and its errors, merge, the CLI, and recording / prefetch in
the page server against real userfaultfd (faults raised by a C thread of this process)."""
import os
import warnings

import pytest

from bench.fault_service import GuestMemory, synthetic_memory, write_image
from snapd.cli import main as cli_main
from snapd.loadset import (LoadingSet, LoadingSetCorrupt, LoadingSetOutOfRange, LoadingSetStale, default_path,
                           merge)
from snapd.pageserver import LoadingSetWarning, PageServer
from tests.conftest import wait_until

CHUNK = 64 << 10
MEM = 4 << 20
IDENT = bytes(range(32))


def make_set(chunks, identity=IDENT, chunk_size=CHUNK, mem_size=MEM):
    return LoadingSet(identity, chunk_size, mem_size, tuple(chunks))


# ---------------------------------------------------------------- format

def test_round_trip_keeps_identity_geometry_and_order(tmp_path):
    ls = make_set([5, 1, 63, 0])
    path = tmp_path / "img.loadset"
    ls.save(path)
    back = LoadingSet.load(path)
    assert (back.identity, back.chunk_size, back.mem_size, back.chunks) == (IDENT, CHUNK, MEM, (5, 1, 63, 0))
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # written atomically, no leftovers


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:40], "truncated"),
    (lambda b: b[:-5], "truncated"),
    (lambda b: b + b"x", "trailing data"),
    (lambda b: b"NOTALSET" + b[8:], "not a loading set"),
    (lambda b: b[:70] + bytes([b[70] ^ 1]) + b[71:], "checksum mismatch"),
    (lambda b: b[:8] + (9).to_bytes(2, "little") + b[10:], "format 9.0 is not supported"),
    (lambda b: b"", "empty"),
])
def test_damaged_file_is_refused_naming_it(tmp_path, damage, message):
    path = tmp_path / "bad.loadset"
    path.write_bytes(damage(make_set([1, 2, 3]).to_bytes()))
    with pytest.raises(LoadingSetCorrupt) as err:
        LoadingSet.load(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_stale_and_out_of_range_sets_are_refused():
    with pytest.raises(LoadingSetStale, match="re-record"):
        make_set([1]).check_for(bytes(32 * [7]), CHUNK, MEM, "other.img")
    with pytest.raises(LoadingSetStale, match="chunks"):
        make_set([1]).check_for(IDENT, CHUNK * 2, MEM, "other.img")
    with pytest.raises(LoadingSetOutOfRange, match="chunk 64: absent from x.img, which has 64 chunks"):
        make_set([3, 64]).check_for(IDENT, CHUNK, MEM, "x.img")


def test_merge_is_a_union_ordered_by_earliest_position():
    a = make_set([10, 11, 12, 13])
    b = make_set([20, 12, 10, 30])
    m = merge([a, b])
    assert m.chunks == (10, 20, 11, 12, 13, 30)
    with pytest.raises(LoadingSetStale):
        merge([a, make_set([1], identity=bytes(32 * [9]))])


def test_cli_inspect_and_merge(tmp_path, capsys):
    make_set([4, 2]).save(tmp_path / "a.loadset")
    make_set([2, 9]).save(tmp_path / "b.loadset")
    assert cli_main(["loadset", "merge", str(tmp_path / "a.loadset"), str(tmp_path / "b.loadset"),
                     "--out", str(tmp_path / "m.loadset")]) == 0
    assert LoadingSet.load(tmp_path / "m.loadset").chunks == (4, 2, 9)
    assert cli_main(["loadset", "inspect", str(tmp_path / "m.loadset"), "--json"]) == 0
    assert '"chunks": 3' in capsys.readouterr().out
    (tmp_path / "bad.loadset").write_bytes(b"UVMLSET\0" + bytes(10))
    assert cli_main(["loadset", "inspect", str(tmp_path / "bad.loadset")]) == 1
    assert "truncated" in capsys.readouterr().err


# ---------------------------------------------------------------- recording and prefetch in the server

@pytest.fixture
def image_data(tmp_path):
    data = synthetic_memory(MEM, CHUNK, seed=5)
    table = write_image(str(tmp_path), data, CHUNK)
    table.identity = IDENT
    return data, table


def test_recording_lists_faulted_chunks_in_first_touch_order(tmp_path, image_data):
    data, table = image_data
    order = [7, 3, 60, 3, 0, 41, 7, 12]  # repeats must not appear twice
    with PageServer() as server:
        image = server.add_image(table)
        listener = server.serve(str(tmp_path / "ps.sock"), image, record=True)
        mem = GuestMemory(MEM)
        try:
            mem.connect(listener.sock_path).wait_ready(5)
            vm = listener.wait_for_vms(1)[0]
            for c in order:
                mem.touch(c * CHUNK + 100, 1)
            ls = server.stop_recording(vm)
            mem.touch(50 * CHUNK, 1)  # after stop: not recorded
            assert ls.chunks == (7, 3, 60, 0, 41, 12)
            assert ls.identity == IDENT and ls.chunk_size == CHUNK and ls.mem_size == MEM
            assert server.recorded_chunks(vm) == [7, 3, 60, 0, 41, 12]
            server.start_recording(vm)  # restart clears the log
            mem.touch(51 * CHUNK, 1)
            assert server.recorded_chunks(vm) == [51]
        finally:
            mem.close()


@pytest.mark.parametrize("shared", [False, True])
def test_prefetch_installs_the_set_and_memory_is_exact(tmp_path, image_data, shared):
    data, table = image_data
    ls = make_set([9, 2, 30, 31, 32, 63])
    with PageServer() as server:
        image = server.add_image(table, shared=shared)
        listener = server.serve(str(tmp_path / "ps.sock"), image, "prefetch", loading_set=ls)
        mem = GuestMemory(MEM, image.memfd if shared else -1)
        try:
            mem.connect(listener.sock_path).wait_ready(5)
            vm = listener.wait_for_vms(1)[0]
            assert wait_until(lambda: not server.stats(vm).prefetch_pending, 5.0), "the prefetch did not finish"
            st = server.stats(vm)
            assert st.prefetch_chunks == len(ls.chunks) and st.faults == 0 and st.errors == 0
            if shared:
                assert st.shared_fills == len(ls.chunks)
            assert mem.read() == data  # every page: prefetched ones and the rest served on demand
            assert server.stats(vm).faults > 0
        finally:
            mem.close()


def test_faults_during_prefetch_are_served_and_memory_is_exact(tmp_path, image_data):
    data, table = image_data
    ls = make_set(range(63, -1, -1))  # the whole image, backwards, while the reader goes forwards
    with PageServer() as server:
        listener = server.serve(str(tmp_path / "ps.sock"), server.add_image(table), "prefetch", loading_set=ls)
        mem = GuestMemory(MEM)
        try:
            mem.connect(listener.sock_path).wait_ready(5)
            assert mem.read() == data
            vm = listener.wait_for_vms(1)[0]
            assert wait_until(lambda: not server.stats(vm).prefetch_pending, 5.0), "the prefetch did not finish"
            st = server.stats(vm)
            assert st.errors == 0 and st.chunks_installed == 64
        finally:
            mem.close()


@pytest.mark.parametrize("bad", ["stale", "truncated", "out_of_range", "missing"])
def test_unusable_loading_set_warns_and_falls_back_to_lazy(tmp_path, image_data, bad):
    data, table = image_data
    path = tmp_path / "img.loadset"
    if bad == "stale":
        make_set([1, 2], identity=bytes(32 * [3])).save(path)
    elif bad == "truncated":
        path.write_bytes(make_set([1, 2]).to_bytes()[:-10])
    elif bad == "out_of_range":
        make_set([1, 200]).save(path)
    with PageServer() as server:
        with pytest.warns(LoadingSetWarning) as caught:
            listener = server.serve(str(tmp_path / "ps.sock"), server.add_image(table), "prefetch", loading_set=path)
        assert str(path) in str(caught[0].message) and "plain lazy paging" in str(caught[0].message)
        assert listener.loading_set_error is not None
        mem = GuestMemory(MEM)
        try:
            mem.connect(listener.sock_path).wait_ready(5)
            vm = listener.wait_for_vms(1)[0]
            assert server.stats(vm).prefetch_chunks == 0
            assert mem.read() == data
        finally:
            mem.close()


def test_attach_refuses_a_loading_set_for_another_image(tmp_path, image_data):
    _, table = image_data
    with PageServer() as server:
        image = server.add_image(table)
        mem = GuestMemory(MEM)
        try:
            fd = mem.register()
            with pytest.raises(LoadingSetStale):
                server.attach(image, os.dup(fd), None, [(mem.addr, MEM, 0)], "prefetch",
                              loading_set=make_set([1], identity=bytes(32 * [4])))
        finally:
            mem.close()


def test_default_path_is_beside_the_image():
    assert default_path("/a/b/vm.img") == "/a/b/vm.img.loadset"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_set([]).bytes_covered() == 0


def test_a_path_that_cannot_be_read_is_refused_naming_it(tmp_path):
    with pytest.raises(LoadingSetCorrupt) as err:
        LoadingSet.load(tmp_path)  # a directory
    assert str(tmp_path) in str(err.value) and "cannot read it" in str(err.value)
