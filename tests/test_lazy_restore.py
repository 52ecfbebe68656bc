"""Restore from a compressed base image through the page server (Uffd backend), lazy and eager, against
real KVM and userfaultfd: guest memory equals the snapshot page for page, and failures stop the VM cleanly."""
import os
import subprocess
import sys
import time

import pytest

from snapd.image.builder import build_image
from snapd.image.reader import BaseImage
from snapd.pageserver import ChunkTable, PageServer
from tests.conftest import requires_kvm, subprocess_env, wait_until
from tests.vm_helpers import QUIET, assert_memory_equals_snapshot, snapshot_guest
from vmm import workloads
from vmm.errors import VmmError
from vmm.machine import STOPPED
from vmm.snapshot import load_snapshot_uffd_backed

pytestmark = requires_kvm
KV_MIB = 8


@pytest.fixture(scope="module")
def kv_image(tmp_path_factory):
    """A snapshot of the kv guest after init, and its base image (64 KiB lz4 chunks)."""
    tmp = tmp_path_factory.mktemp("lazy")
    snapshot_guest(str(tmp), f"workload=kv kv_mib={KV_MIB}")
    build_image(str(tmp / "vm.mem"), str(tmp / "store"), str(tmp / "vm.img"), chunk_size=64 << 10, codec="lz4")
    return tmp


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_every_page_equals_the_snapshot_then_the_guest_answers(kv_image, mode):
    with PageServer() as server:
        image = server.add_image(ChunkTable.from_base_image(str(kv_image / "vm.img")))
        listener = server.serve(str(kv_image / f"{mode}.sock"), image, mode)
        machine = load_snapshot_uffd_backed(str(kv_image / "vm.state"), listener.sock_path, resume=False,
                                            serial_sink=QUIET)
        try:
            assert_memory_equals_snapshot(machine, str(kv_image / "vm.mem"))
            machine.resume()
            request = workloads.kv_request(1000, 42)
            workloads.verify_kv(1, KV_MIB, request, machine.invoke(request))
            stats = server.stats(listener.wait_for_vms(1)[0])
            assert stats.errors == 0
            assert (stats.faults > 0) if mode == "lazy" else (stats.eager_bytes > 0)
        finally:
            machine.close()


def test_corrupt_chunk_stops_the_vm_naming_image_and_chunk(kv_image, tmp_path):
    image = BaseImage.open(str(kv_image / "vm.img"))
    table = ChunkTable.from_base_image(str(kv_image / "vm.img"))
    # Damage a copy of the pack holding the kv table's first non-zero chunk past the image (heap at 2 MiB+).
    victim = next(i for i, c in enumerate(table.chunks) if c.codec != 0 and i * image.chunk_size >= (4 << 20))
    ref = table.chunks[victim]
    bad_pack = tmp_path / "bad.pack"
    with open(ref.pack_path, "rb") as src:
        data = bytearray(src.read())
    data[ref.offset + ref.stored_len // 2] ^= 0xFF
    bad_pack.write_bytes(data)
    table.chunks = [c._replace(pack_path=str(bad_pack)) if c.pack_path == ref.pack_path else c for c in table.chunks]
    with PageServer() as server:
        listener = server.serve(str(tmp_path / "ps.sock"), server.add_image(table), "lazy")
        machine = load_snapshot_uffd_backed(str(kv_image / "vm.state"), listener.sock_path, serial_sink=QUIET)
        try:
            with pytest.raises(VmmError):
                machine.invoke(workloads.kv_request(200_000, 7), timeout=10)  # touches the whole table
            assert machine.wait(10) and machine.state == STOPPED
            assert f"chunk {victim}" in str(machine.fault) and "vm.img" in str(machine.fault)
        finally:
            machine.close()


def test_dead_page_server_stops_the_vm_within_a_bounded_time(kv_image, tmp_path):
    sock = str(tmp_path / "ps.sock")
    server = subprocess.Popen([sys.executable, "-m", "snapd.pageserver", "--socket", sock,
                               "--image", str(kv_image / "vm.img")], env=subprocess_env())
    try:
        assert wait_until(lambda: os.path.exists(sock) or server.poll() is not None, 10) and server.poll() is None, \
            "page server did not start"
        machine = load_snapshot_uffd_backed(str(kv_image / "vm.state"), sock, serial_sink=QUIET)
        try:
            server.kill()
            server.wait()
            t0 = time.monotonic()
            with pytest.raises(VmmError):
                machine.invoke(workloads.kv_request(200_000, 9), timeout=10)
            assert machine.wait(10)
            assert time.monotonic() - t0 < 5
            assert "page server" in str(machine.fault)
        finally:
            machine.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_api_uffd_backend_with_a_page_server_process(kv_image, tmp_path):
    """Firecracker's flow: a page server process per snapshot, and a VMM told `backend_type: Uffd`."""
    from vmm.api.client import VmmProcess
    sock = str(tmp_path / "ps.sock")
    server = subprocess.Popen([sys.executable, "-m", "snapd.pageserver", "--socket", sock,
                               "--image", str(kv_image / "vm.img")], env=subprocess_env(), stdout=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: os.path.exists(sock) or server.poll() is not None, 10) and server.poll() is None, \
            "page server did not start"
        with VmmProcess(str(tmp_path / "vmm.sock"), stdout=subprocess.DEVNULL) as vmm:
            vmm.client.call("PUT", "/snapshot/load", {"snapshot_path": str(kv_image / "vm.state"),
                                                      "mem_backend": {"backend_type": "Uffd", "backend_path": sock},
                                                      "resume_vm": True})
            request = workloads.kv_request(1000, 5)
            reply, _ = vmm.client.invoke(request)
            workloads.verify_kv(1, KV_MIB, request, reply)
    finally:
        server.kill()
        server.wait()


def test_lazy_restore_into_a_prebuilt_vm(kv_image):
    """The shell's placeholder memory itself is served by the page server: same memory, verified reply."""
    from vmm.prebuilt import PrebuiltVm, VmShape
    from vmm.snapshot import read_snapshot
    with PageServer() as server:
        image = server.add_image(ChunkTable.from_base_image(str(kv_image / "vm.img")))
        listener = server.serve(str(kv_image / "prebuilt.sock"), image, "lazy")
        shell = PrebuiltVm(VmShape(1, 64), serial_sink=QUIET)
        try:
            machine = shell.restore_from_page_server(read_snapshot(str(kv_image / "vm.state")), listener.sock_path,
                                                     resume=False)
            assert_memory_equals_snapshot(machine, str(kv_image / "vm.mem"))
            machine.resume()
            request = workloads.kv_request(1000, 3)
            workloads.verify_kv(1, KV_MIB, request, machine.invoke(request))
        finally:
            shell.close()
