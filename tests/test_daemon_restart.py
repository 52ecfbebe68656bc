"""`snapd serve` as a process: killed and restarted, it keeps its images and leaves no VMM unaccounted for."""
import os
import signal
import time

import pytest

from snapd.daemon_process import DaemonProcess
from snapd.pool.pool import process_start_time
from snapd.pool.worker_handle import proc_stat
from tests.conftest import requires_kvm
from tests.daemon_helpers import hello_snapshot
from vmm import workloads

pytestmark = requires_kvm


def alive(pid: int, start_time) -> bool:
    fields = proc_stat(pid)
    return fields is not None and int(fields[19]) == start_time and fields[0] != b"Z"


def wait_gone(processes, timeout=30.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in processes if alive(*p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in processes if alive(*p)]


def recorded(state_dir) -> set[int]:
    return {int(n.split(".")[0]) for n in os.listdir(os.path.join(state_dir, "run", "procs")) if n.endswith(".json")}


def test_a_restarted_daemon_keeps_images_and_stops_what_the_old_one_started(tmp_path):
    state, mem = hello_snapshot(tmp_path)
    state_dir = str(tmp_path / "state")
    first = DaemonProcess(state_dir, "--pool-size", "1", import_roots=[tmp_path])
    try:
        image = first.client.register_image(state, mem)["id"]
        clones = first.client.create_clones(image, count=2, payload=b"before")
        old = [(c["pid"], process_start_time(c["pid"])) for c in clones]
        old += [(pid, process_start_time(pid)) for pid in recorded(state_dir) if pid not in dict(old)]
        assert all(alive(*p) for p in old[:2])
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
    finally:
        first.stop()
    second = DaemonProcess(state_dir, "--pool-size", "1")
    try:
        assert wait_gone(old) == [], "VMM processes of the killed daemon are still running"
        assert [i["id"] for i in second.client.images()] == [image]
        assert second.client.clones() == []
        assert not recorded(state_dir) & {pid for pid, _ in old}
        (clone,) = second.client.create_clones(image, payload=b"after")
        workloads.verify_hello(b"after", clone["result"], 1)
        now = [(pid, process_start_time(pid)) for pid in recorded(state_dir)]
    finally:
        second.stop()
    assert second.process.returncode == 0
    assert wait_gone(now) == [], "a cleanly stopped daemon left processes running"
    assert recorded(state_dir) == set()


def test_snapd_serve_keeps_images_on_huge_pages_in_a_mount_the_host_never_sees(tmp_path):
    """As root, `snapd serve` (--huge-pages auto) mounts its huge-page tmpfs in a mount namespace of its own:
    images go on 2 MiB pages, clones answer, and the host's mount table never shows the mount."""
    if os.geteuid() != 0:
        pytest.skip("huge pages for shared images need root (mount namespace + tmpfs mount)")
    state, mem = hello_snapshot(tmp_path)
    state_dir = str(tmp_path / "state")
    with DaemonProcess(state_dir, "--pool-size", "1", import_roots=[tmp_path]) as daemon:
        image = daemon.client.register_image(state, mem)
        assert image["huge_pages"] and image["chunk_size"] == 2 << 20, image
        request = workloads.hello_request("huge")
        (clone,) = daemon.client.create_clones(image["id"], payload=request)
        workloads.verify_hello(request, clone["result"], 1)
        huge_dir = os.path.join(os.path.abspath(state_dir), "huge")
        with open("/proc/self/mountinfo") as f:
            assert huge_dir not in f.read(), "the daemon's tmpfs leaked into the host's mount namespace"
        with open(f"/proc/{daemon.process.pid}/mountinfo") as f:
            assert any(line.split()[4] == huge_dir and "huge=always" in line for line in f), "no huge tmpfs"
        daemon.client.delete_clone(clone["id"])


def test_a_daemon_starts_past_a_damaged_image_record_and_serves_the_others(tmp_path):
    from tests.daemon_helpers import RunningDaemon
    state, mem = hello_snapshot(tmp_path)
    state_dir = str(tmp_path / "state")
    first = RunningDaemon(state_dir, pool_size=1)
    try:
        kept = first.client.register_image(state, mem)["id"]
        lost = first.client.register_image(state, mem, chunk_size=64 << 10)["id"]
    finally:
        first.close()
    images = os.path.join(state_dir, "images")
    os.unlink(os.path.join(images, f"{lost}.img"))  # its base image is gone
    with open(os.path.join(images, "garbage.json"), "w") as f:
        f.write('{"not": "a record"}')
    leftovers = ["img-0123456789ab.state", "img-0123456789ab.img", ".img-0123456789ab.json.tmp-1-0a1b2c3d"]
    for name in leftovers:  # a registration killed before its record was written
        with open(os.path.join(images, name), "wb") as f:
            f.write(b"partial")
    second = RunningDaemon(state_dir, pool_size=1)
    try:
        assert [i["id"] for i in second.client.images()] == [kept]
        assert not set(leftovers) & set(os.listdir(images))
        assert {f"{kept}.json", f"{kept}.img", f"{kept}.state", "garbage.json"} <= set(os.listdir(images))
        (clone,) = second.client.create_clones(kept, payload=b"still here")
        workloads.verify_hello(b"still here", clone["result"], 1)
    finally:
        second.close()
