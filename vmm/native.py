"""The one import point of the compiled KVM bindings, and the one return-code checker."""
from vmm._kvm_native import ffi, lib  # noqa: F401  (re-exported)
from vmm.errors import KvmError


def check(ret: int, call: str, detail: str = "") -> int:
    """Return ``ret`` if it is a success; raise KvmError naming ``call`` for a -errno result."""
    if ret < 0:
        raise KvmError(call, -ret, detail)
    return ret


def ioctl_ptr(fd: int, request: int, arg, call: str) -> int:
    return check(lib.vmm_ioctl_ptr(fd, request, arg), call)


def ioctl_val(fd: int, request: int, value: int, call: str) -> int:
    return check(lib.vmm_ioctl_val(fd, request, value), call)


def blob(ptr) -> bytes:
    """The bytes of a kernel struct (for state that is saved as kernel ABI)."""
    return bytes(ffi.buffer(ptr))


def from_blob(ctype: str, data: bytes, call: str):
    """A new ``ctype`` struct filled from ``data``; the length must match the kernel's struct."""
    ptr = ffi.new(ctype + " *")
    size = ffi.sizeof(ptr[0])
    if len(data) != size:
        raise KvmError(call, 22, f"state blob for {ctype} is {len(data)} bytes, kernel expects {size}")
    ffi.memmove(ptr, data, size)
    return ptr
