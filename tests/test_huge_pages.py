"""Shared images on 2 MiB pages (snapd.hugetmpfs): clones read exactly the snapshot, mapped 2 MiB at a time; an
image that is not made of whole 2 MiB pages never goes on them (shmem would show zeros past a partial write)."""
import os

import pytest

from vmm.snapshot import snapshot_builtin_guest
from bench.prefetch import prepare, request_for, verify
from snapd.image.builder import build_image
from snapd.hugetmpfs import HugeTmpfsError, is_huge_tmpfs, mount_huge_tmpfs, unmount
from snapd.loadset import LoadingSet
from snapd.pageserver import ChunkTable, PageServer
from snapd.pageserver_image import HUGE_PAGE, Image, huge_unfit
from tests.conftest import requires_kvm
from tests.vm_helpers import assert_equals_snapshot, snapshot_memory
from vmm.prebuilt import PrebuiltVm, VmShape
from vmm.snapshot import read_snapshot, resume_restored
from vmm.uffd_backend import UffdBackend

MIB = 1 << 20


@pytest.fixture(scope="module")
def huge_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("huge") / "mnt")
    try:
        mount_huge_tmpfs(path, size="512m")
    except HugeTmpfsError as exc:
        pytest.skip(f"no huge-page tmpfs here: {exc}")
    try:
        assert is_huge_tmpfs(path)
        yield path
    finally:
        unmount(path)


@pytest.fixture(scope="module")
def scan_image(tmp_path_factory):
    """A scan guest (16 MiB array in 128 MiB) and its base image of 2 MiB chunks."""
    return prepare(str(tmp_path_factory.mktemp("scan")), "scan", 16, 128, 2 * MIB)


def pmd_mapped_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("ShmemPmdMapped:"):
                return int(line.split()[1]) * 1024
    return 0


@requires_kvm  # the snapshot it builds the image from is a booted guest's
def test_only_images_of_whole_huge_pages_may_use_them(tmp_path, huge_dir):
    assert huge_unfit(2 * MIB, 128 * MIB) == ""
    assert "chunk size 512 KiB is not a multiple of 2 MiB" in huge_unfit(512 << 10, 128 * MIB)
    assert "memory size" in huge_unfit(2 * MIB, 129 * MIB)
    state, mem = snapshot_builtin_guest(str(tmp_path), 32, "workload=hello", "hello")
    build_image(mem, str(tmp_path / "store"), str(tmp_path / "hello.img"), chunk_size=512 << 10)
    image = Image(ChunkTable.from_base_image(str(tmp_path / "hello.img")), shared=True, huge_dir=huge_dir)
    assert not image.huge and "512 KiB" in image.huge_refused
    assert os.readlink(f"/proc/self/fd/{image.memfd}").startswith("/memfd:")  # a plain memfd, not the tmpfs


@requires_kvm
@pytest.mark.parametrize("fill", ["lazy", "prefilled"])
def test_a_clone_of_a_huge_image_reads_the_snapshot_page_for_page(scan_image, huge_dir, fill):
    state = read_snapshot(f"{scan_image}/vm.state")
    table = ChunkTable.from_base_image(f"{scan_image}/vm.img")
    table.loading_set = ""
    expected = snapshot_memory(f"{scan_image}/vm.mem", table.mem_size)
    with PageServer() as server:
        image = server.add_image(table, shared=True, huge_dir=huge_dir)
        assert image.huge and image.chunk_size % HUGE_PAGE == 0
        if fill == "prefilled":
            image.prefill(LoadingSet(table.identity, table.chunk_size, table.mem_size,
                                     tuple(range(len(table.chunks)))), wait=True)
        listener = server.serve(f"{scan_image}/{fill}.sock", image, "lazy")
        prebuilt = PrebuiltVm(VmShape(state.config.vcpu_count, state.config.mem_size_mib), serial_sink=lambda d: None)
        backend = []
        try:
            machine = prebuilt.restore(state, image.memfd, shared=False, resume=False,
                                       before_state=lambda m: backend.append(UffdBackend(m.memory, listener.sock_path)))
            # The clone's view, before its guest runs: faulted (lazy) through the page server 2 MiB at a time.
            memory = b"".join(machine.memory.read(gpa, 4 * MIB) for gpa in range(0, table.mem_size, 4 * MIB))
            assert_equals_snapshot(memory, expected, state.devices.fnport.mailbox_pfn << 12)
            resume_restored(machine)
            request = request_for("scan", 16, 7)
            verify("scan", 16, request, machine.invoke(request, timeout=60))  # the guest summed its whole array
            assert pmd_mapped_bytes() >= 8 * MIB, "the clone's memory was not mapped 2 MiB at a time"
        finally:
            prebuilt.close()
            for b in backend:
                b.close()


def test_a_partial_write_makes_a_whole_huge_page_present(huge_dir):
    """Why the guard exists: on a huge-page tmpfs, 512 KiB written at 0 make all of the first 2 MiB present
    (zero-filled), so a MISSING fault would never come for the other 1.5 MiB; on a memfd only 512 KiB are."""
    def present_after_partial_write(fd: int) -> int:
        os.ftruncate(fd, 8 * MIB)
        os.pwrite(fd, b"\xab" * (512 << 10), 0)
        return os.lseek(fd, 0, os.SEEK_HOLE)
    fd = os.open(huge_dir, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        assert present_after_partial_write(fd) == HUGE_PAGE
    finally:
        os.close(fd)
    fd = os.memfd_create("plain")
    try:
        assert present_after_partial_write(fd) == 512 << 10
    finally:
        os.close(fd)


def test_a_private_mount_once_threads_run_is_refused_with_a_clear_error(tmp_path):
    """A mount namespace is per thread: one made after threads started would leave them resolving the mount
    point on the host (huge pages silently lost), so it is refused, naming why, and nothing is mounted."""
    import subprocess
    import sys
    script = ("import threading, time\n"
              "from snapd.hugetmpfs import HugeTmpfsError, mount_private_huge_tmpfs\n"
              "threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
              "try:\n"
              f"    mount_private_huge_tmpfs({str(tmp_path / 'never')!r})\n"
              "except HugeTmpfsError as exc:\n"
              "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "before any thread starts" in out.stdout and "runs 2 threads" in out.stdout, out
    assert not (tmp_path / "never").exists()
