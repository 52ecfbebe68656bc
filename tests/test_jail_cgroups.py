"""vmm/jail/cgroups.py against the real kernel: a process joins a group, the limits are in the files, a child
over its memory limit is OOM-killed alone, pids.max stops thread and fork creation, the groups leave nothing
behind, and names that could leave their parent are refused."""
import os
import signal
import subprocess
import sys
import uuid

import pytest

from vmm.errors import JailError
from vmm.jail.cgroups import (MiB, CgroupGroup, CgroupLimits, detect_layout, membership, remove_tree,
                              VMM_OVERHEAD_MIB, VMM_THREADS)

LAYOUT = detect_layout() if os.geteuid() == 0 else None
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroups are created as root"),
    pytest.mark.skipif(LAYOUT is not None and "memory" in LAYOUT.missing,
                       reason="no memory controller mounted (v1 or v2) on this host"),
]


@pytest.fixture
def parent():
    """A parent unique to this test; whatever is left beneath it is killed and removed afterwards."""
    name = f"snapd-test/{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    remove_tree(name, kill=True)
    for h in LAYOUT.hierarchies:  # the shared top directory only if no other test run uses it
        try:
            os.rmdir(os.path.join(h.mount, "snapd-test"))
        except OSError:
            pass


def spawn_joined(group: CgroupGroup, argv: list[str]) -> int:
    """Fork a child that joins the group itself (writing '0' to cgroup.procs) and then execs argv; return once
    it has joined."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            group.join()
            os.write(w, b"j")
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    os.close(w)
    joined = os.read(r, 1)
    os.close(r)
    assert joined == b"j", "the child could not join the group"
    return pid


def wait(pid: int) -> int:
    return os.waitpid(pid, 0)[1]


def limit_file(group: CgroupGroup, ctrl: str) -> str:
    h, path = next((h, p) for h, p in group.dirs if ctrl in h.controllers)
    name = {("memory", 1): "memory.limit_in_bytes", ("memory", 2): "memory.max", ("pids", 1): "pids.max",
            ("pids", 2): "pids.max", ("cpu", 1): "cpu.shares", ("cpu", 2): "cpu.weight"}[ctrl, h.version]
    with open(os.path.join(path, name)) as f:
        return f.read().strip()


def test_limits_from_machine_config_are_written(parent):
    limits = CgroupLimits.for_vm(mem_size_mib=128, vcpu_count=2)
    assert limits == CgroupLimits((128 + VMM_OVERHEAD_MIB) * MiB, 2 + VMM_THREADS, 200)
    group = CgroupGroup.create(parent, "w1", limits)
    assert group.missing == tuple(c for c in LAYOUT.missing)
    assert limit_file(group, "memory") == str(limits.memory_bytes)
    if "pids" not in LAYOUT.missing:
        assert limit_file(group, "pids") == str(limits.pids_max)
    if "cpu" not in LAYOUT.missing:
        v2 = next(h.version for h, _ in group.dirs if "cpu" in h.controllers) == 2
        assert limit_file(group, "cpu") == ("200" if v2 else "2048")
    group.remove()


def test_cpu_weight_maps_to_shares_within_v1_range():
    assert CgroupLimits(cpu_weight=100).cpu_shares() == 1024
    assert CgroupLimits(cpu_weight=1).cpu_shares() == 10
    assert CgroupLimits(cpu_weight=10000).cpu_shares() == 102400
    assert CgroupLimits.for_vm(64, 200).cpu_weight == 10000
    with pytest.raises(ValueError):
        CgroupLimits(cpu_weight=0)


def test_child_that_joins_is_listed_in_procs_and_proc_cgroup(parent):
    group = CgroupGroup.create(parent, "w1", CgroupLimits(memory_bytes=64 * MiB))
    pid = spawn_joined(group, ["/bin/sleep", "30"])
    try:
        assert group.pids() == [pid]
        for h, path in group.dirs:
            with open(os.path.join(path, "cgroup.procs")) as f:
                assert f.read().split() == [str(pid)]
        where = membership(pid)
        for h, _ in group.dirs:
            for ctrl in h.controllers:
                assert where[ctrl if h.version == 1 else ""] == group.relpath
        assert membership()["memory" if LAYOUT.hierarchies[0].version == 1 else ""] != group.relpath
    finally:
        os.kill(pid, signal.SIGKILL)
        wait(pid)
    group.remove()


def test_add_moves_another_process_in(parent):
    group = CgroupGroup.create(parent, "w1", CgroupLimits(pids_max=8))
    child = subprocess.Popen(["/bin/sleep", "30"])
    try:
        group.add(child.pid)
        assert group.pids() == [child.pid]
    finally:
        child.kill()
        child.wait()
    group.remove()


OOM_CHILD = """
import mmap
m = mmap.mmap(-1, 128 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, len(m), 4096):
    m[i] = 1
print("touched 128 MiB")
"""


def test_child_over_memory_limit_is_oom_killed_alone(parent):
    group = CgroupGroup.create(parent, "w1", CgroupLimits(memory_bytes=32 * MiB))
    me = membership()
    assert group.oom_killed() == 0
    pid = spawn_joined(group, [sys.executable, "-c", OOM_CHILD])
    status = wait(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child exit status {status:#x}"
    assert group.oom_killed() >= 1
    assert membership() == me  # the test process stayed where it was, and is still running
    group.remove()


PIDS_CHILD = """
import os, threading, time
n = 0
try:
    while n < 64:
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        n += 1
except RuntimeError:
    pass
try:
    if os.fork() == 0:
        os._exit(0)
    fork = "ok"
except BlockingIOError:
    fork = "EAGAIN"
print(n, fork, flush=True)
os._exit(0)
"""


@pytest.mark.skipif(LAYOUT is not None and "pids" in LAYOUT.missing, reason="no pids controller mounted")
def test_pids_max_stops_threads_and_fork(parent):
    group = CgroupGroup.create(parent, "w1", CgroupLimits(pids_max=4))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            group.join()
            os.dup2(w, 1)
            os.execv(sys.executable, [sys.executable, "-c", PIDS_CHILD])
        finally:
            os._exit(127)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read().split()
    assert wait(pid) == 0
    assert out == ["3", "EAGAIN"], "main thread + 3 threads fill pids.max=4; a 4th thread and a fork fail"
    group.remove()


def test_remove_leaves_no_directory(parent):
    group = CgroupGroup.create(parent, "w1", CgroupLimits(memory_bytes=64 * MiB, pids_max=8, cpu_weight=100))
    dirs = [p for _, p in group.dirs]
    assert dirs and all(os.path.isdir(p) for p in dirs)
    pid = spawn_joined(group, ["/bin/true"])
    wait(pid)
    group.remove()
    assert not any(os.path.exists(p) for p in dirs)


def test_remove_of_a_group_with_a_live_task_fails_within_its_deadline(parent):
    group = CgroupGroup.create(parent, "w1", CgroupLimits(memory_bytes=64 * MiB))
    pid = spawn_joined(group, ["/bin/sleep", "30"])
    try:
        with pytest.raises(JailError, match=str(pid)):
            group.remove(timeout=0.05)
    finally:
        os.kill(pid, signal.SIGKILL)
        wait(pid)
    group.remove()
    assert not group.dirs


def test_remove_tree_kills_and_removes_a_previous_runs_groups(parent):
    a = CgroupGroup.create(parent, "a", CgroupLimits(memory_bytes=64 * MiB))
    CgroupGroup.create(parent, "b", CgroupLimits(memory_bytes=64 * MiB))
    child = subprocess.Popen(["/bin/sleep", "30"])
    a.add(child.pid)
    with pytest.raises(JailError, match="already exists"):
        CgroupGroup.create(parent, "a", CgroupLimits())
    remove_tree(parent, kill=True)
    assert child.wait(timeout=5) == -signal.SIGKILL
    assert not any(os.path.exists(os.path.join(h.mount, parent)) for h in LAYOUT.hierarchies)


@pytest.mark.parametrize("parent_name,name", [
    ("snapd-test", "../evil"), ("snapd-test", "a/b"), ("snapd-test", ".."), ("snapd-test", ""),
    ("snapd-test/../..", "w"), ("/snapd-test", "w"), ("snapd-test", "w\0"),
])
def test_names_that_could_leave_the_parent_are_refused(parent_name, name):
    with pytest.raises(JailError, match="cgroup name"):
        CgroupGroup.create(parent_name, name, CgroupLimits())
    for h in LAYOUT.hierarchies:
        assert not os.path.exists(os.path.join(h.mount, "evil"))


def test_layout_is_read_from_the_mount_table(tmp_path):
    """v1 per controller (cpu co-mounted with cpuacct counts), a cgroup2 mount by its cgroup.controllers, and a
    controller mounted nowhere reported as missing."""
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("cpuset io pids\n")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup /x/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0\n"
                      f"cgroup /x/systemd cgroup rw,relatime,name=systemd 0 0\n"
                      f"cgroup2 {unified} cgroup2 rw,relatime 0 0\n")
    layout = detect_layout(str(mounts))
    assert {(h.version, h.mount, h.controllers) for h in layout.hierarchies} == {
        (1, "/x/cpu,cpuacct", ("cpu",)), (2, str(unified), ("pids",))}
    assert layout.missing == ("memory",)
    assert LAYOUT.hierarchies, "this host's own mount table shows at least the memory hierarchy"
