"""userfaultfd primitives: the one import point for the compiled snapd._uffd_native module.

Every C call that can fail returns -errno; `check()` turns that into a `UffdError` subclass naming
the call and the errno text. The VMM side uses `create_registered_uffd()`; the page server and tests
use the single ioctls.
"""
from __future__ import annotations

import errno
import os

from snapd._uffd_native import ffi, lib

__all__ = [
    "ffi", "lib", "check", "UffdError", "UffdExistsError", "UffdAgainError", "UffdGoneError",
    "UffdInvalidError", "UffdNotFoundError", "UffdNoMemoryError", "UffdPermissionError",
    "create", "api", "register", "unregister", "copy", "zeropage", "wake", "continue_",
    "create_registered_uffd", "VMM_FEATURES", "PAGE_SIZE",
]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Events the page server handles; the VMM asks for them when it creates the uffd.
VMM_FEATURES = (lib.UFFD_FEATURE_EVENT_FORK | lib.UFFD_FEATURE_EVENT_REMAP
                | lib.UFFD_FEATURE_EVENT_REMOVE | lib.UFFD_FEATURE_EVENT_UNMAP)


class UffdError(OSError):
    """A userfaultfd syscall or ioctl failed; .call names it, .errno/.strerror say why."""

    def __init__(self, call: str, err: int):
        super().__init__(err, f"{call}: {os.strerror(err)}")
        self.call = call


class UffdExistsError(UffdError):
    """EEXIST: a page in the range is already mapped (raced with another install)."""


class UffdAgainError(UffdError):
    """EAGAIN: the address space is changing; read pending events, then retry."""


class UffdGoneError(UffdError):
    """ESRCH: the process owning the registered memory has exited."""


class UffdInvalidError(UffdError):
    """EINVAL: bad range, alignment, mode or feature."""


class UffdNotFoundError(UffdError):
    """ENOENT: no registered mapping at the destination."""


class UffdNoMemoryError(UffdError):
    """ENOMEM."""


class UffdPermissionError(UffdError):
    """EPERM/EACCES: e.g. unprivileged userfaultfd disabled for kernel-mode faults."""


_BY_ERRNO = {
    errno.EEXIST: UffdExistsError, errno.EAGAIN: UffdAgainError, errno.ESRCH: UffdGoneError,
    errno.EINVAL: UffdInvalidError, errno.ENOENT: UffdNotFoundError, errno.ENOMEM: UffdNoMemoryError,
    errno.EPERM: UffdPermissionError, errno.EACCES: UffdPermissionError,
}


def check(rc: int, call: str) -> int:
    """Return rc if it is >= 0; otherwise raise the UffdError subclass for errno -rc."""
    if rc >= 0:
        return rc
    raise _BY_ERRNO.get(-rc, UffdError)(call, -rc)


_device_fd = -1  # /dev/userfaultfd, opened while we could (use_device)


def use_device() -> bool:
    """Open /dev/userfaultfd for every later ``create``, if we may: a uffd made from it catches kernel-mode faults
    with no capability (the syscall wants CAP_SYS_PTRACE for that), so a worker keeps the means after it drops
    its privileges in its jail. False: not there or not ours to open (the syscall is used)."""
    global _device_fd
    if _device_fd < 0:
        try:
            _device_fd = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return False
    return True


def device_fd() -> int:
    return _device_fd


def create(flags: int = lib.O_CLOEXEC | lib.O_NONBLOCK) -> int:
    """A new userfaultfd. No UFFD_USER_MODE_ONLY: faults raised by KVM in kernel mode must be caught."""
    if _device_fd >= 0:
        return check(lib.snapd_ioctl(_device_fd, lib.USERFAULTFD_IOC_NEW, ffi.cast("void *", flags)),
                     "ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW)")
    return check(lib.snapd_uffd_create(flags), "userfaultfd")


def api(fd: int, features: int = 0) -> tuple[int, int]:
    """UFFDIO_API handshake; returns (features granted, ioctls available)."""
    a = ffi.new("struct uffdio_api *", {"api": lib.UFFD_API, "features": features})
    check(lib.snapd_ioctl(fd, lib.UFFDIO_API, a), "UFFDIO_API")
    return a.features, a.ioctls


def register(fd: int, start: int, length: int, mode: int = lib.UFFDIO_REGISTER_MODE_MISSING) -> int:
    """UFFDIO_REGISTER; returns the bitmask of range ioctls allowed on it."""
    r = ffi.new("struct uffdio_register *", {"range": {"start": start, "len": length}, "mode": mode})
    check(lib.snapd_ioctl(fd, lib.UFFDIO_REGISTER, r), "UFFDIO_REGISTER")
    return r.ioctls


def unregister(fd: int, start: int, length: int) -> None:
    """UFFDIO_UNREGISTER; the kernel wakes faults still waiting in the range."""
    r = ffi.new("struct uffdio_range *", {"start": start, "len": length})
    check(lib.snapd_ioctl(fd, lib.UFFDIO_UNREGISTER, r), "UFFDIO_UNREGISTER")


def copy(fd: int, dst: int, src: int, length: int, mode: int = 0) -> int:
    """UFFDIO_COPY from address src; returns bytes copied."""
    c = ffi.new("struct uffdio_copy *", {"dst": dst, "src": src, "len": length, "mode": mode})
    check(lib.snapd_ioctl(fd, lib.UFFDIO_COPY, c), "UFFDIO_COPY")
    return c.copy


def zeropage(fd: int, start: int, length: int, mode: int = 0) -> int:
    z = ffi.new("struct uffdio_zeropage *", {"range": {"start": start, "len": length}, "mode": mode})
    check(lib.snapd_ioctl(fd, lib.UFFDIO_ZEROPAGE, z), "UFFDIO_ZEROPAGE")
    return z.zeropage


def wake(fd: int, start: int, length: int) -> None:
    r = ffi.new("struct uffdio_range *", {"start": start, "len": length})
    check(lib.snapd_ioctl(fd, lib.UFFDIO_WAKE, r), "UFFDIO_WAKE")


def continue_(fd: int, start: int, length: int, mode: int = 0) -> int:
    """UFFDIO_CONTINUE (MINOR mode): map the page-cache pages already there; returns bytes mapped."""
    c = ffi.new("struct uffdio_continue *", {"range": {"start": start, "len": length}, "mode": mode})
    check(lib.snapd_ioctl(fd, lib.UFFDIO_CONTINUE, c), "UFFDIO_CONTINUE")
    return c.mapped


_MODES = {
    "missing": lib.UFFDIO_REGISTER_MODE_MISSING,
    "minor": lib.UFFDIO_REGISTER_MODE_MINOR,
    "missing+minor": lib.UFFDIO_REGISTER_MODE_MISSING | lib.UFFDIO_REGISTER_MODE_MINOR,
}


def create_registered_uffd(regions: list[tuple[int, int]], mode: str = "missing",
                           extra_features: int = 0) -> int:
    """VMM side: a uffd with the fork/remap/remove/unmap events, every (addr, size) registered in `mode`.

    Returns the fd (close-on-exec, non-blocking) to hand to the page server with `send_uffd`.
    """
    features = VMM_FEATURES | extra_features
    if "minor" in mode:
        features |= lib.UFFD_FEATURE_MINOR_SHMEM
    fd = create()
    try:
        try:
            granted, _ = api(fd, features)
        except UffdError as exc:
            # Fork events need CAP_SYS_PTRACE; a jailed worker has none, and never forks (its seccomp filter
            # allows threads only), so it has no fork event to report: ask without.
            if exc.errno != errno.EPERM or not features & lib.UFFD_FEATURE_EVENT_FORK:
                raise
            features &= ~lib.UFFD_FEATURE_EVENT_FORK
            granted, _ = api(fd, features)
        if granted & features != features:
            raise UffdInvalidError("UFFDIO_API (features missing)", errno.EINVAL)
        for addr, size in regions:
            register(fd, addr, size, _MODES[mode])
    except BaseException:
        os.close(fd)
        raise
    return fd
