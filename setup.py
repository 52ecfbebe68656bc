"""setuptools shim: cffi API-mode extensions and the built-in guest, both compiled with gcc at install."""
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithGuest(build_py):
    """Build the freestanding guest ELF before the package files are collected."""

    def run(self):
        subprocess.check_call(["make", "-C", "vmm/guest"])
        super().run()


setup(
    cffi_modules=[
        "vmm/_kvm_build.py:ffibuilder",
        "snapd/_uffd_build.py:ffibuilder",
        "snapd/_lane_build.py:ffibuilder",
        "vmm/jail/_build.py:ffibuilder",
    ],
    cmdclass={"build_py": BuildPyWithGuest},
)
