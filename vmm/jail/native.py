"""The one import point of the compiled jail bindings (vmm/jail/_build.py), and the one return-code checker."""
from vmm.errors import JailError
from vmm.jail._native import ffi, lib  # noqa: F401  (re-exported)


def check(ret: int, call: str, detail: str = "") -> int:
    """Return ``ret`` if it is a success; raise JailError naming ``call`` for a -errno result."""
    if ret < 0:
        raise JailError(call, -ret, detail)
    return ret
