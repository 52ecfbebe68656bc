"""cffi API-mode builder for the KVM bindings (module ``vmm._kvm_native``).

Every constant is taken from the kernel headers with ``#define NAME ...`` and every struct is declared
partially (``...;``), so gcc checks layouts against <linux/kvm.h> at install time; no number is copied by hand.
The C declarations live in ``kvm_cdef.h`` next to this file, apart from the Python wrappers in ``vmm/kvm.py``.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
with open(os.path.join(HERE, "kvm_cdef.h")) as cdef_file:
    ffibuilder.cdef(cdef_file.read())

with open(os.path.join(HERE, "kvm_helpers.c")) as helpers_file:
    HELPERS = helpers_file.read()

ffibuilder.set_source(
    "vmm._kvm_native",
    HELPERS,
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.dirname(HERE), verbose=False)
