"""Every clone worker jailed (issue #11): the layers seen from outside, and tried from inside.

"From inside" means the worker itself makes the call (tests/inject.py turns its blocked main thread onto a system
call of the test's choosing), so the kernel judges a real call of the jailed process, as it would a compromised
VMM's; and a clone's memory is dirtied as its guest would dirty it.
"""
import logging
import os

import pytest

from tests.conftest import wait_until
from tests.daemon_helpers import RunningDaemon, clone_memory, hello_snapshot, write_process_memory
from tests.inject import inject_syscall
from vmm import workloads
from vmm.jail.cgroups import membership
from vmm.jail.native import lib

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="jailing workers with uids of their own needs root")]
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "cgroup")
MEMORY_MIB = 32  # a clone's limit here; a worker holds 3-5 MiB of its own after a restore


@pytest.fixture(scope="module")
def jailed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jailed")
    state, mem = hello_snapshot(tmp)
    daemon = RunningDaemon(str(tmp / "state"), pool_size=1, clone_memory_mib=MEMORY_MIB)
    try:
        yield daemon, daemon.client.register_image(state, mem)["id"]
    finally:
        daemon.close()


def status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def syscall_number(name: str) -> int:
    return lib.seccomp_syscall_resolve_name(name.encode())


def two_clones(daemon, image):
    a, b = daemon.client.create_clones(image, count=2)
    return a, b


def clone_error(daemon, clone_id: str) -> str:
    clone = daemon.client.request("GET", f"/v1/clones/{clone_id}").json()
    return clone["error"] if clone["state"] == "failed" else ""


def test_every_worker_is_jailed_before_any_request(jailed):
    daemon, image = jailed
    pool = daemon.daemon.pool
    assert wait_until(lambda: pool.settled() and len(pool.warm_workers()) >= 2)
    workers = [w.pid for w in pool.warm_workers()]
    uids = set()
    first, last = daemon.daemon.config.uid_range
    for pid in workers:
        st = status(pid)
        uid = int(st["Uid"].split()[0])
        assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4
        assert first <= uid <= last
        uids.add(uid)
        assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == int(st["CapBnd"], 16) == 0
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        assert st["NSpid"].split()[1:] == ["1"]  # pid 1 of a pid namespace of its own
        for ns in NAMESPACES:
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        assert os.listdir(f"/proc/{pid}/root") == []  # no host file reachable by name
        groups = membership(pid)
        for controller in ("memory", "pids", "cpu"):
            assert groups[controller].endswith(f"/w{uid}"), groups
        with open(f"/sys/fs/cgroup/cpu{groups['cpu']}/cpu.shares") as f:
            assert int(f.read()) == 1024  # weight 100 for its one vCPU
        with open(f"/sys/fs/cgroup/memory{groups['memory']}/memory.limit_in_bytes") as f:
            assert int(f.read()) == MEMORY_MIB << 20
        with open(f"/proc/{pid}/environ", "rb") as f:  # as the zygote was started: its code's path only
            assert [v.split(b"=")[0] for v in f.read().split(b"\0") if v] == [b"PYTHONPATH"]
    assert len(uids) == len(workers)  # one uid per live worker
    # Mount, pid and cgroup namespaces are each worker's own; net, ipc and uts are made once, by the zygote, for
    # all of them (their filter lets them use none of the three), apart from the daemon's.
    for ns in ("mnt", "pid", "cgroup"):
        assert len({os.readlink(f"/proc/{pid}/ns/{ns}") for pid in workers}) == len(workers), ns
    zygote = daemon.daemon.zygote.pid
    for ns in ("net", "ipc", "uts"):
        assert {os.readlink(f"/proc/{pid}/ns/{ns}") for pid in workers} == {os.readlink(f"/proc/{zygote}/ns/{ns}")}
    with open(f"/proc/{workers[0]}/net/dev") as f:  # the shared net namespace: a loopback, down, and nothing else
        assert [line.split(":")[0].strip() for line in f.readlines()[2:]] == ["lo"]


def test_a_forbidden_system_call_kills_the_worker_and_fails_only_its_clone(jailed):
    daemon, image = jailed
    a, b = two_clones(daemon, image)
    inject_syscall(a["pid"], syscall_number("socket"), 2, 1, 0)  # socket(AF_INET, SOCK_STREAM, 0)
    assert wait_until(lambda: "SIGSYS" in clone_error(daemon, a["id"]), timeout=20), clone_error(daemon, a["id"])
    assert "seccomp" in clone_error(daemon, a["id"])
    workloads.verify_hello(b"still here", daemon.client.invoke(b["id"], b"still here"), 1)
    for clone in (a, b):
        daemon.client.delete_clone(clone["id"])


def test_a_worker_cannot_signal_another_clones_process(jailed):
    daemon, image = jailed
    a, b = two_clones(daemon, image)
    inject_syscall(a["pid"], syscall_number("kill"), b["pid"], 9)  # SIGKILL to the other clone's host pid
    assert wait_until(lambda: clone_error(daemon, a["id"]), timeout=20)
    assert status(b["pid"])["State"][0] in "RS"
    workloads.verify_hello(b"untouched", daemon.client.invoke(b["id"], b"untouched"), 1)
    assert clone_error(daemon, b["id"]) == ""
    for clone in (a, b):
        daemon.client.delete_clone(clone["id"])


def test_a_clone_over_its_memory_limit_is_killed_alone(jailed):
    daemon, image = jailed
    a, b = two_clones(daemon, image)
    worker = daemon.daemon._clone(a["id"]).worker
    clone_memory(daemon, a["id"])  # every page present (a write from outside cannot raise a uffd fault)
    for _gpa, size, host_addr in daemon.daemon._clone(a["id"]).regions:  # every page of its guest, dirtied
        try:
            for offset in range(0, size, 1 << 20):
                write_process_memory(worker.pid, host_addr + offset, b"\xa5" * (1 << 20))
        except OSError:
            break  # killed under the writes
    assert wait_until(lambda: "memory limit" in clone_error(daemon, a["id"]), timeout=20), clone_error(daemon, a["id"])
    assert f"{MEMORY_MIB} MiB" in clone_error(daemon, a["id"])
    workloads.verify_hello(b"alive", daemon.client.invoke(b["id"], b"alive"), 1)
    for clone in (a, b):
        daemon.client.delete_clone(clone["id"])


def test_uids_and_cgroups_are_given_back_when_workers_go(jailed):
    daemon, image = jailed
    jail = daemon.daemon.jail
    clones = daemon.client.create_clones(image, count=3)
    pids = [c["pid"] for c in clones]
    for clone in clones:
        daemon.client.delete_clone(clone["id"])
    pool = daemon.daemon.pool

    def settled():
        live = {w.lease.uid for w in pool.warm_workers() if w.lease is not None}
        return pool.settled() and jail.used_uids == live
    # Deleted clones' workers are reused or retired; either way the uids in use are exactly the live workers'.
    assert wait_until(settled), (jail.used_uids, [w.lease for w in pool.warm_workers()])
    parent = f"/sys/fs/cgroup/memory/{jail.cgroup_parent}"
    live_groups = {name for name in os.listdir(parent) if name.startswith("w")}
    assert live_groups == {f"w{uid}" for uid in jail.used_uids}
    assert pids  # (the deleted clones' pids may live on as reused workers)


def test_jail_off_is_a_logged_development_switch(tmp_path, caplog):
    state, mem = hello_snapshot(tmp_path)
    with caplog.at_level(logging.WARNING, logger="snapd"):
        daemon = RunningDaemon(str(tmp_path / "state"), pool_size=1, jail="off")
    try:
        assert any("--jail off" in r.getMessage() for r in caplog.records)
        image = daemon.client.register_image(state, mem)["id"]
        (clone,) = daemon.client.create_clones(image, payload=b"unjailed")
        workloads.verify_hello(b"unjailed", clone["result"], 1)
        st = status(clone["pid"])
        assert st["Uid"].split()[0] == "0" and st["Seccomp"] == "0"
    finally:
        daemon.close()


def test_one_cpu_group_for_all_workers_when_asked(tmp_path):
    state, mem = hello_snapshot(tmp_path)
    daemon = RunningDaemon(str(tmp_path / "state"), pool_size=1, clone_cpu_cgroups=False)
    try:
        image = daemon.client.register_image(state, mem)["id"]
        clones = daemon.client.create_clones(image, count=2, payload=b"shared")
        cpu = {membership(c["pid"])["cpu"] for c in clones}
        assert len(cpu) == 1 and cpu.pop().endswith("/workers")
        for clone in clones:  # memory and pids stay each worker's own
            uid = int(status(clone["pid"])["Uid"].split()[0])
            assert membership(clone["pid"])["memory"].endswith(f"/w{uid}")
    finally:
        daemon.close()
