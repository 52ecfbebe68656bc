"""Non-cooperative userfaultfd events (REMOVE, REMAP, UNMAP, FORK) and the shared memfd mode."""
import ctypes
import os
import time

import pytest

from bench.fault_service import GuestMemory, _libc, synthetic_memory, write_image
from snapd.pageserver import PageServer
from snapd.uffd import lib

PAGE = 4096
CS = 64 << 10
MEM = 1 << 20


def settled_stats(server, vm, until, timeout=2.0):
    """Stats once `until(stats)` holds: the loop counts a fault just after waking the faulter
    (and an event just after the kernel let the VMM go on), so counters may lag a moment."""
    deadline = time.monotonic() + timeout
    while True:
        st = server.stats(vm)
        if until(st) or time.monotonic() > deadline:
            return st


@pytest.fixture
def server():
    with PageServer() as s:
        yield s


@pytest.fixture
def served(server, tmp_path):
    """(guest, vm_id, data): a lazily served 1 MiB guest with 64 KiB chunks."""
    data = synthetic_memory(MEM, CS)
    sock = str(tmp_path / "s.sock")
    listener = server.serve(sock, server.add_image(write_image(str(tmp_path), data, CS)))
    g = GuestMemory(MEM)
    g.connect(sock).wait_ready(5)
    yield g, listener.wait_for_vms(1)[0], data
    g.close()


def test_remove_event_makes_range_refill(server, served):
    g, vm, data = served
    assert g.read() == data
    before = server.stats(vm)
    g.madvise_dontneed(2 * CS + 5 * PAGE, PAGE)  # one page inside a chunk
    g.madvise_dontneed(3 * CS, 2 * CS)           # two whole chunks
    assert g.read() == data
    after = settled_stats(server, vm, lambda st: st.faults >= before.faults + 3)
    assert after.removes == before.removes + 2
    assert after.faults >= before.faults + 3
    assert after.eexist > before.eexist  # the partly present chunk was refilled around its pages


def test_remap_event_moves_region(server, served):
    g, vm, data = served
    assert g.read(0, MEM // 2) == data[:MEM // 2]
    old = g.addr
    new = g.mremap_to_new_address()
    assert new != old
    assert g.read() == data  # second half faults at the new address
    st = settled_stats(server, vm, lambda st: st.remaps == 1)
    assert st.remaps == 1 and st.errors == 0


def test_unmap_event_drops_range(server, served):
    g, vm, data = served
    half = MEM // 2
    assert _libc.munmap(g.addr + half, half) == 0
    st = settled_stats(server, vm, lambda st: st.unmaps == 1)
    assert st.unmaps == 1 and st.nregions == 1
    assert g.read(0, half) == data[:half]
    g.size = half  # what is left to unregister and unmap


def test_fork_child_is_served(server, served):
    g, vm, data = served
    half = MEM // 2
    assert g.read(0, half) == data[:half]  # installed in the parent, inherited by the child
    pid = os.fork()
    if pid == 0:  # child: only touch memory, then leave without running Python cleanup
        ok = ctypes.string_at(g.addr, MEM) == data
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert settled_stats(server, vm, lambda st: st.forks == 1).forks == 1
    children = [i for i in range(lib.SNAPD_MAX_VMS) if server.stats(i).parent == vm]
    assert len(children) == 1
    child = server.stats(children[0])
    assert child.faults > 0 and child.errors == 0
    assert g.read() == data  # the parent is still served


def test_shared_memfd_filled_once_for_all_vms(server, tmp_path):
    data = synthetic_memory(MEM, CS)
    table = write_image(str(tmp_path), data, CS)
    image = server.add_image(table, shared=True)
    sock = str(tmp_path / "s.sock")
    listener = server.serve(sock, image)
    a, b = GuestMemory(MEM, memfd=image.memfd), GuestMemory(MEM, memfd=image.memfd)
    try:
        a.connect(sock).wait_ready(5)
        b.connect(sock).wait_ready(5)
        vm_a, vm_b = listener.wait_for_vms(2)
        assert a.read() == data
        assert os.pread(image.memfd, MEM, 0) == data  # the memfd holds the image
        assert b.read() == data
        st_a, st_b = server.stats(vm_a), server.stats(vm_b)
        assert st_a.shared_fills == len(table.chunks)
        assert st_b.faults == 0 and st_b.shared_fills == 0  # page cache hit: no fault at all
        ctypes.memset(a.addr, 0xEE, PAGE)  # copy-on-write: private to a
        assert b.read(0, PAGE) == data[:PAGE] and os.pread(image.memfd, PAGE, 0) == data[:PAGE]
    finally:
        a.close()
        b.close()


def test_shared_memfd_minor_mode_maps_whole_chunks(server, tmp_path):
    data = synthetic_memory(MEM, CS)
    table = write_image(str(tmp_path), data, CS)
    image = server.add_image(table, shared=True)
    sock = str(tmp_path / "s.sock")
    listener = server.serve(sock, image, minor=True)
    a, b = GuestMemory(MEM, memfd=image.memfd), GuestMemory(MEM, memfd=image.memfd)
    try:
        for g in (a, b):
            g.register("missing+minor")
            g.connect(sock).wait_ready(5)
        vm_a, vm_b = listener.wait_for_vms(2)
        assert a.read() == data
        assert b.read() == data
        st_a = settled_stats(server, vm_a, lambda st: st.faults == len(table.chunks))
        st_b = settled_stats(server, vm_b, lambda st: st.faults == len(table.chunks))
        assert st_a.shared_fills == len(table.chunks) and st_a.faults == len(table.chunks)
        assert st_b.shared_fills == 0 and st_b.faults == len(table.chunks)  # one MINOR fault per chunk
        ctypes.memset(b.addr, 0xEE, PAGE)  # still copy-on-write
        assert a.read(0, PAGE) == data[:PAGE] and os.pread(image.memfd, PAGE, 0) == data[:PAGE]
    finally:
        a.close()
        b.close()
