"""userfaultfd primitives against the real kernel: constants from headers, ioctls, the error checker."""
import errno
import mmap
import os

import pytest

from snapd import uffd
from snapd.uffd import ffi, lib

PAGE = uffd.PAGE_SIZE


def addr_of(buf) -> int:
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))


@pytest.fixture
def region():
    """4 pages of anonymous memory registered MISSING; unregistered before unmap (see GuestMemory.close)."""
    from bench.fault_service import GuestMemory
    g = GuestMemory(4 * PAGE)
    g.register()
    yield g
    g.close()


def test_constants_come_from_the_kernel_header():
    assert lib.UFFD_EVENT_PAGEFAULT == 0x12 and lib.UFFD_API == 0xAA  # spot-check the header's values
    ioctls = {lib.UFFDIO_API, lib.UFFDIO_REGISTER, lib.UFFDIO_COPY, lib.UFFDIO_ZEROPAGE, lib.UFFDIO_WAKE,
              lib.UFFDIO_CONTINUE, lib.UFFDIO_UNREGISTER}
    assert len(ioctls) == 7
    assert ffi.sizeof("struct uffdio_copy") == 40 and ffi.sizeof("struct uffd_msg") == 32


def test_api_grants_the_vmm_features():
    fd = uffd.create()
    try:
        features, ioctls = uffd.api(fd, uffd.VMM_FEATURES)
        assert features & uffd.VMM_FEATURES == uffd.VMM_FEATURES
        assert ioctls & (1 << 0x3F)  # _UFFDIO_API bit
    finally:
        os.close(fd)


def test_copy_installs_and_second_copy_raises_exists(region):
    src = bytearray(b"A" * PAGE)
    assert uffd.copy(region.uffd, region.addr, addr_of(src), PAGE) == PAGE
    assert region.read(0, PAGE) == bytes(src)
    with pytest.raises(uffd.UffdExistsError) as e:
        uffd.copy(region.uffd, region.addr, addr_of(src), PAGE)
    assert e.value.errno == errno.EEXIST and "UFFDIO_COPY" in str(e.value) and "File exists" in str(e.value)


def test_zeropage_and_wake(region):
    assert uffd.zeropage(region.uffd, region.addr + PAGE, PAGE) == PAGE
    assert region.read(PAGE, PAGE) == bytes(PAGE)
    uffd.wake(region.uffd, region.addr, 4 * PAGE)  # nobody waiting: still succeeds


def test_checker_names_call_and_errno():
    assert uffd.check(5, "x") == 5
    with pytest.raises(uffd.UffdInvalidError, match="UFFDIO_REGISTER: Invalid argument"):
        uffd.check(-errno.EINVAL, "UFFDIO_REGISTER")
    with pytest.raises(uffd.UffdError, match="UFFDIO_WAKE: Bad file descriptor"):
        uffd.check(-errno.EBADF, "UFFDIO_WAKE")


def test_register_unaligned_range_raises_invalid(region):
    fd = uffd.create()
    try:
        uffd.api(fd)
        with pytest.raises(uffd.UffdInvalidError, match="UFFDIO_REGISTER"):
            uffd.register(fd, region.addr + 1, PAGE)
    finally:
        os.close(fd)


def test_minor_mode_continue_maps_page_cache_page():
    memfd = os.memfd_create("minor-test")
    os.ftruncate(memfd, PAGE)
    os.pwrite(memfd, b"minor!" * 10, 0)
    m = mmap.mmap(memfd, PAGE, mmap.MAP_SHARED)
    addr = addr_of(m)
    fd = uffd.create_registered_uffd([(addr, PAGE)], mode="minor")
    try:
        assert uffd.continue_(fd, addr, PAGE) == PAGE  # maps the page already in the memfd
        assert m[:6] == b"minor!"
        uffd.unregister(fd, addr, PAGE)
    finally:
        os.close(fd)
        m.close()
        os.close(memfd)
