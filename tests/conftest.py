"""Shared fixtures: skip KVM tests only where /dev/kvm is absent; tiny fault guests built with gcc."""
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_KVM = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)
requires_kvm = pytest.mark.skipif(not HAVE_KVM, reason="/dev/kvm is absent or not accessible on this host")


def wait_until(condition, timeout: float = 30.0, poll: float = 0.01) -> bool:
    """Whether ``condition()`` came true within ``timeout`` seconds (the caller asserts, naming what it waited
    for)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return bool(condition())


def vmm_command(*args: str) -> list[str]:
    """The `vmm` CLI run with this interpreter (works before and after the console script is installed)."""
    return [sys.executable, "-m", "vmm.cli", *args]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="session")
def tiny_guests(tmp_path_factory):
    """ELF guests that reset cleanly (0), execute ud2 (1), or jump to a non-canonical address (2)."""
    out = tmp_path_factory.mktemp("tiny_guests")
    source = os.path.join(ROOT, "tests", "guests", "fault.S")
    guests = {}
    for name, fault in (("reset", 0), ("ud2", 1), ("noncanonical", 2)):
        path = str(out / f"{name}.elf")
        subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", f"-DFAULT={fault}", "-Wl,-Ttext=0x100000",
                        "-Wl,--build-id=none", "-o", path, source], check=True)
        guests[name] = path
    return guests
