"""Snapshot fidelity across VMM processes: the progress guest, snapshotted at several points and each snapshot
restored in a new `vmm --api-sock` process, prints exactly what an uninterrupted run prints, byte for byte."""
import subprocess

from tests.conftest import requires_kvm, wait_until
from vmm import workloads
from vmm.api.client import VmmProcess
from vmm.config import builtin_guest_image as guest_image

pytestmark = requires_kvm
SHIFT = 17
BOOT_ARGS = f"workload=progress seed=5 progress_shift={SHIFT}"
LINES_PER_LEG = 15


def wait_for_lines(path, count: int, timeout: float = 30.0) -> None:
    assert wait_until(lambda: path.read_bytes().count(b"\n") >= count, timeout), \
        f"{path} has fewer than {count} lines after {timeout} s"


def start_vmm(tmp_path, name: str) -> tuple[VmmProcess, object]:
    out = tmp_path / f"{name}.out"
    vmm = VmmProcess(str(tmp_path / f"{name}.sock"), stdout=open(out, "wb"), stderr=subprocess.DEVNULL)
    return vmm, out


def test_chained_snapshots_in_new_processes_equal_an_uninterrupted_run(tmp_path):
    legs = []
    # Leg 0: boot, run, snapshot. Legs 1 and 2: restore the previous snapshot in a new process, run, snapshot.
    for leg in range(3):
        vmm, out = start_vmm(tmp_path, f"leg{leg}")
        try:
            client = vmm.client
            if leg == 0:
                client.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
                client.call("PUT", "/boot-source", {"kernel_image_path": guest_image(), "boot_args": BOOT_ARGS})
                client.start()
            else:
                client.load_snapshot(str(tmp_path / f"s{leg - 1}.state"), str(tmp_path / f"s{leg - 1}.mem"))
            wait_for_lines(out, LINES_PER_LEG)
            client.pause()
            client.create_snapshot(str(tmp_path / f"s{leg}.state"), str(tmp_path / f"s{leg}.mem"))
        finally:
            assert vmm.stop() == 0
        legs.append(out.read_bytes())
    combined = b"".join(legs)

    reference, out = start_vmm(tmp_path, "reference")
    try:
        reference.client.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
        reference.client.call("PUT", "/boot-source", {"kernel_image_path": guest_image(), "boot_args": BOOT_ARGS})
        reference.client.start()
        wait_for_lines(out, combined.count(b"\n") + 2)
    finally:
        reference.stop()
    uninterrupted = out.read_bytes()

    assert all(leg for leg in legs), "every leg printed something"
    assert combined == uninterrupted[:len(combined)]
    # And the run itself is the computation it claims to be: its first lines match the Python reference.
    lines = combined.decode().splitlines()
    assert lines[0] == "vmguest: progress ready"
    workloads.verify_progress(5, SHIFT, lines[1:4])
