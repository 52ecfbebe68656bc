"""cffi API-mode builder for vmm.jail._native: namespaces, mounts, credentials, openat2 and libseccomp.

Declarations live in jail_cdef.h, apart from the Python wrappers (vmm/jail/*.py); every constant is taken from
the system headers with ``#define NAME ...``. libseccomp builds the seccomp filters (no hand-written BPF).
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
with open(os.path.join(HERE, "jail_cdef.h")) as cdef_file:
    ffibuilder.cdef(cdef_file.read())
with open(os.path.join(HERE, "jail_helpers.c")) as helpers_file:
    ffibuilder.set_source("vmm.jail._native", helpers_file.read(), libraries=["seccomp"],
                          extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(HERE)), verbose=False)
