"""`vmm jail` (issue #11): the single-VM path's jailer, run as an orchestrator runs it, against the real kernel.

Each VMM is started as `python -m vmm.cli jail --id ID --uid U --gid G --chroot-base BASE [--cgroup ...] --
--api-sock /api.sock`, driven through its socket at BASE/vmm/ID/root/api.sock with the API client, and looked at
from outside (/proc/PID of the jailed VMM, which is the `vmm jail` process's only child). Every path the tests
give the API is one the jailed VMM could reach if it were not jailed (a host directory it owns, a host snapshot
it may read), so each check fails without the layer it is about.
"""
import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import requires_kvm, subprocess_env, vmm_command, wait_until
from tests.inject import inject_syscall
from vmm.api.client import wait_for_socket
from vmm.config import builtin_guest_image
from vmm.jail import JailSpec, enter
from vmm.jail.cgroups import detect_layout, membership, remove_tree
from vmm.jail.native import lib
from vmm.workloads import verify_hello

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="vmm jail switches uid and makes cgroups: root only"),
              requires_kvm]
UID = 299960  # each jail below takes UID + n: ids no other test or user holds
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "cgroup")
PIDS_MAX = 77


def memory_setting() -> tuple[str, str]:
    """A memory limit as this host's memory controller names it (v1 or v2)."""
    for h in detect_layout().hierarchies:
        if "memory" in h.controllers:
            return ("memory.max" if h.version == 2 else "memory.limit_in_bytes"), str(768 << 20)
    pytest.skip("no memory controller mounted")


class Jailed:
    """One `vmm jail` process, its jail directory and a client on its socket."""

    def __init__(self, base, ident: str, uid: int, cgroups=(), files=(), pass_fds=()):
        self.base, self.id, self.uid = base, ident, uid
        self.root = base / "vmm" / ident / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        for path in files:  # what the orchestrator puts in before starting it
            shutil.copy(path, self.root)
            os.chmod(self.root / os.path.basename(path), 0o644)
        self.stderr = open(base / f"{ident}.stderr", "w+b")
        args = ["jail", "--id", ident, "--uid", str(uid), "--gid", str(uid), "--chroot-base", str(base)]
        for file, value in cgroups:
            args += ["--cgroup", f"{file}={value}"]
        self.process = subprocess.Popen(vmm_command(*args, "--", "--api-sock", "/api.sock"), env=subprocess_env(),
                                        stdout=subprocess.DEVNULL, stderr=self.stderr, pass_fds=pass_fds)
        try:
            self.client = wait_for_socket(str(self.root / "api.sock"), 20, self.process)
            children = open(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read().split()
            assert len(children) == 1, children
            self.vmm_pid = int(children[0])
            self.vmm_pidfd = os.pidfd_open(self.vmm_pid)  # signals reach this process, never a later one
        except BaseException:
            self.process.kill()
            self.process.wait()
            raise

    def status(self) -> dict:
        with open(f"/proc/{self.vmm_pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)

    def kill(self) -> None:
        """After a failed check: nothing of it may outlive the test."""
        self.process.kill()  # (Popen signals only a process it has not reaped)
        try:
            signal.pidfd_send_signal(self.vmm_pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(self.vmm_pidfd)
        self.process.wait()
        self.client.close()
        if not self.stderr.closed:
            self.stderr.close()
        wait_until(lambda: not _alive(self.vmm_pid), timeout=5)
        remove_tree(f"vmm/{self.id}")

    def stop(self) -> int:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(15)
        finally:
            os.close(self.vmm_pidfd)
            self.stderr.seek(0)
            self.err = self.stderr.read().decode(errors="replace")
            self.stderr.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("jails")
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="module")
def first(base):
    """A jailed VMM with the built-in guest in its jail and two --cgroup values."""
    jailed = Jailed(base, "first", UID, cgroups=[("pids.max", str(PIDS_MAX)), memory_setting()],
                    files=[builtin_guest_image()])
    yield jailed
    assert jailed.stop() == 0
    assert "Traceback" not in jailed.err, jailed.err


@pytest.fixture(scope="module")
def snapshot(first):
    """``first`` booted, invoked twice, paused and snapshotted into its jail (/vm.state, /vm.mem)."""
    client = first.client
    client.configure(1, 64, kernel_image_path="/guest.elf", boot_args="workload=hello")
    client.start()
    for count in (1, 2):
        verify_hello(b"jailed %d" % count, client.invoke(b"jailed %d" % count)[0], count)
    client.pause()
    client.create_snapshot("/vm.state", "/vm.mem")
    return first.root / "vm.state", first.root / "vm.mem"


@pytest.fixture
def victims():
    """A host directory the first jail's uid owns, with a file in it, under /tmp (which every uid may cross): were
    the VMM not jailed, it could overwrite that file, and read a snapshot copied there."""
    host = tempfile.mkdtemp(prefix="vmm-jail-victims-", dir="/tmp")
    try:
        with open(os.path.join(host, "victim"), "wb") as f:
            f.write(b"host data\n")
        os.chmod(host, 0o755)
        os.chown(host, UID, UID)
        yield pathlib.Path(host)
    finally:
        shutil.rmtree(host)


def reachable_as(uid: int, path, flags: int) -> bool:
    """Whether uid ``uid`` (no capabilities) could open ``path`` with ``flags`` on the host: what makes the
    refusals below the jail's doing, not the file's permissions."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.close(os.open(path, flags, 0o644))
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


def fingerprint(path) -> tuple:
    info = os.stat(path)
    return info.st_mtime_ns, info.st_size, hashlib.sha256(open(path, "rb").read()).hexdigest()


def climbing(host_path) -> str:
    """A relative path that reaches ``host_path`` from any directory of the host (../ more times than needed)."""
    return "../" * 24 + str(host_path).lstrip("/")


def test_the_jailed_vmm_is_in_every_layer(base, first):
    status = first.status()
    assert status["Uid"].split() == [str(UID)] * 4 and status["Gid"].split() == [str(UID)] * 4
    assert status["Groups"].strip() == ""
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, cap
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    assert status["NSpid"].split()[1:] == ["1"]  # pid 1 of its own pid namespace
    for name in NAMESPACES:
        assert os.readlink(f"/proc/{first.vmm_pid}/ns/{name}") != os.readlink(f"/proc/self/ns/{name}"), name
    # its / is the jail directory: only what the orchestrator put there and what the VMM made
    assert sorted(os.listdir(f"/proc/{first.vmm_pid}/root")) == sorted(os.listdir(first.root))
    assert os.stat(f"/proc/{first.vmm_pid}/root").st_ino == os.stat(first.root).st_ino
    assert os.stat(first.root).st_uid == UID  # so it can make its socket and snapshots there
    mounts = open(f"/proc/{first.vmm_pid}/mountinfo").read().splitlines()
    assert len(mounts) == 1, mounts  # nothing else mounted: no /proc, /sys or /dev of the host
    assert {"nosuid", "nodev", "noexec"} <= set(mounts[0].split()[5].split(","))
    # the environment is gone, even the strings exec left on its stack
    assert open(f"/proc/{first.vmm_pid}/environ", "rb").read().strip(b"\0") == b""
    # the cgroup vmm/ID holds it, with the values given
    where = membership(first.vmm_pid)
    file, value = memory_setting()
    for h in detect_layout().hierarchies:
        for ctrl, setting in (("pids", ("pids.max", str(PIDS_MAX))), ("memory", (file, value))):
            if ctrl in h.controllers:
                assert where[ctrl if h.version == 1 else ""] == "/vmm/first"
                group = os.path.join(h.mount, "vmm", "first")
                assert open(os.path.join(group, setting[0])).read().strip() == setting[1]
                assert str(first.vmm_pid) in open(os.path.join(group, "cgroup.procs")).read().split()
                assert str(first.process.pid) not in open(os.path.join(group, "cgroup.procs")).read().split()


def test_only_stdio_and_its_own_descriptors_survive(base):
    host_file = base / "host-secret"
    host_file.write_bytes(b"secret")
    fd = os.open(host_file, os.O_RDONLY)  # handed to `vmm jail`: the jailed VMM must not have it
    try:
        jailed = Jailed(base, "fds", UID + 5, pass_fds=(fd,))
    finally:
        os.close(fd)
    try:
        targets = {int(n): os.readlink(f"/proc/{jailed.vmm_pid}/fd/{n}") for n in os.listdir(f"/proc/{jailed.vmm_pid}/fd")}
        assert fd not in targets or targets[fd] != str(host_file)
        assert str(host_file) not in targets.values()
        for n, target in targets.items():
            if n > 2:  # /dev/kvm and /dev/userfaultfd (opened before the jail), pipes, sockets, KVM's inodes
                assert target in ("/dev/kvm", "/dev/userfaultfd") or target.split(":")[0] in (
                    "pipe", "socket", "anon_inode"), targets
        assert "/dev/kvm" in targets.values()
    finally:
        assert jailed.stop() == 0


def test_boot_invoke_pause_and_snapshot_inside_the_jail(first, snapshot):
    state, mem = snapshot
    for path in (state, mem):
        assert os.stat(path).st_uid == UID and os.path.getsize(path) > 0
    assert os.path.getsize(mem) >= 64 << 20
    assert first.client.instance_info()["state"] == "Paused"


@pytest.mark.parametrize("kind", ["/etc/passwd", "../../../etc/passwd", "host absolute", "host climbing"])
def test_a_snapshot_create_names_files_inside_the_jail_only(first, snapshot, victims, kind):
    victim = victims / "victim"
    target = {"host absolute": str(victim), "host climbing": climbing(victim)}.get(kind, kind)
    assert reachable_as(UID, victims / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # outside a jail it could
    os.unlink(victims / "new")
    before = fingerprint(victim), fingerprint("/etc/passwd"), sorted(os.listdir(victims))
    for body in ({"snapshot_path": target, "mem_file_path": "/scratch.mem"},
                 {"snapshot_path": "/scratch.state", "mem_file_path": target}):
        reply = first.client.request("PUT", "/snapshot/create", body)
        assert 400 <= reply.status < 500, (body, reply.status)
        assert "No such file or directory" in reply.fault_message()
    assert (fingerprint(victim), fingerprint("/etc/passwd"), sorted(os.listdir(victims))) == before
    assert first.client.instance_info()["state"] == "Paused"


def test_a_restore_in_a_second_jail_from_the_first_ones_files(base, first, snapshot, victims):
    state, mem = snapshot
    shutil.copy(state, victims / "vm.state")  # the same snapshot on the host, readable by the jailed uid
    shutil.copy(mem, victims / "vm.mem")
    for path in victims.iterdir():
        os.chmod(path, 0o644)
    assert reachable_as(UID + 1, victims / "vm.state", os.O_RDONLY)  # outside a jail it could load them
    assert reachable_as(UID + 1, victims / "vm.mem", os.O_RDONLY)
    second = Jailed(base, "second", UID + 1, files=[state, mem])
    try:
        client = second.client
        for snap, memory in ((str(victims / "vm.state"), str(victims / "vm.mem")),
                             (climbing(victims / "vm.state"), climbing(victims / "vm.mem")),
                             ("/vm.state", str(victims / "vm.mem")),
                             ("/etc/passwd", "/vm.mem"), ("../../../etc/passwd", "/vm.mem")):
            reply = client.request("PUT", "/snapshot/load", {"snapshot_path": snap, "resume_vm": True,
                                                             "mem_backend": {"backend_type": "File",
                                                                             "backend_path": memory}})
            assert 400 <= reply.status < 500, (snap, memory, reply.status)
            assert "does not exist" in reply.fault_message() or "No such file" in reply.fault_message()
            assert "root:" not in reply.fault_message()
        assert client.instance_info()["state"] == "Not started"  # a refused load leaves the process fresh
        client.load_snapshot("/vm.state", "/vm.mem", resume_vm=True)
        verify_hello(b"restored", client.invoke(b"restored")[0], 3)  # the count goes on from the snapshot's 2
        client.pause()
        client.create_snapshot("/again.state", "/again.mem")
        client.resume()
        verify_hello(b"and on", client.invoke(b"and on")[0], 4)
        assert {"again.state", "again.mem"} <= set(os.listdir(second.root))
    finally:
        assert second.stop() == 0
    assert "Traceback" not in second.err, second.err


def test_a_uffd_restore_through_a_page_server_inside_the_jail(base, snapshot, tmp_path):
    """The Uffd backend connects to a page server's socket the orchestrator put in the jail (`connect` in the
    role), and a snapshot of memory served that way is written there too."""
    state, mem = snapshot
    image = tmp_path / "vm.img"
    subprocess.run([sys.executable, "-m", "snapd.cli", "image", "build", str(mem), "--store", str(tmp_path / "store"),
                    "--out", str(image), "--quiet"], env=subprocess_env(), check=True, timeout=60)
    root = base / "vmm" / "uffd" / "root"
    root.mkdir(parents=True)
    shutil.copy(state, root / "vm.state")
    os.chmod(root / "vm.state", 0o644)
    sock = root / "ps.sock"
    server = subprocess.Popen([sys.executable, "-m", "snapd.pageserver", "--socket", str(sock), "--image",
                               str(image)], env=subprocess_env(), stdout=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: sock.exists() or server.poll() is not None, 10) and server.poll() is None
        os.chown(sock, UID + 6, UID + 6)  # connecting to a Unix socket needs write permission on it
        jailed = Jailed(base, "uffd", UID + 6)
        try:
            jailed.client.load_snapshot("/vm.state", "/ps.sock", resume_vm=True, backend_type="Uffd")
            verify_hello(b"served", jailed.client.invoke(b"served")[0], 3)
            jailed.client.pause()
            jailed.client.create_snapshot("/served.state", "/served.mem")
            assert os.path.getsize(root / "served.mem") == os.path.getsize(mem)
        finally:
            assert jailed.stop() == 0
        assert "Traceback" not in jailed.err, jailed.err
    finally:
        server.kill()
        server.wait()


def test_sigterm_stops_the_vm_and_the_jailer_exits(base):
    jailed = Jailed(base, "term", UID + 2, cgroups=[("pids.max", "64")], files=[builtin_guest_image()])
    jailed.client.configure(1, 32, kernel_image_path="/guest.elf", boot_args="workload=hello")
    jailed.client.start()
    verify_hello(b"x", jailed.client.invoke(b"x")[0], 1)
    groups = [os.path.join(h.mount, "vmm", "term") for h in detect_layout().hierarchies]
    assert all(os.path.isdir(g) for g in groups)
    t0 = time.monotonic()
    assert jailed.stop() == 0
    assert time.monotonic() - t0 < 5
    assert not os.path.exists(f"/proc/{jailed.vmm_pid}")
    assert not os.path.exists(jailed.root / "api.sock")
    assert not any(os.path.exists(g) for g in groups)  # the supervisor removed the cgroup
    assert "Traceback" not in jailed.err, jailed.err


def test_the_vmm_stops_when_its_supervisor_is_killed(base):
    jailed = Jailed(base, "orphan", UID + 3)
    try:
        os.kill(jailed.process.pid, signal.SIGKILL)
        jailed.process.wait()
        assert wait_until(lambda: not _alive(jailed.vmm_pid), timeout=10), "the VMM outlived its supervisor"
    finally:
        jailed.kill()  # and its cgroup: the supervisor was killed before it could remove it


def test_a_forbidden_call_from_the_jailed_vmm_kills_it_by_sigsys(base):
    jailed = Jailed(base, "sigsys", UID + 4)
    try:
        inject_syscall(jailed.vmm_pid, lib.seccomp_syscall_resolve_name(b"socket"), 2, 1, 0)  # AF_INET, STREAM
        assert jailed.process.wait(10) == 128 + signal.SIGSYS
    finally:
        jailed.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("change, cgroups, tail, words", [
    ({"--id": "../x"}, [], None, "--id"),
    ({"--id": "a" * 65}, [], None, "--id"),
    ({"--uid": "0"}, [], None, "--uid 0"),
    ({"--gid": "-3"}, [], None, "--gid"),
    ({"--uid": "abc"}, [], None, "not an integer"),
    ({"--chroot-base": "/nonexistent/base"}, [], None, "no such directory"),
    ({}, ["devices.allow=a *:* rwm"], None, "controller 'devices'"),
    ({}, ["memory.../../x=1"], None, "not a plain controller file name"),
    ({}, ["cgroup.procs=1"], None, "controller 'cgroup'"),
    ({}, ["pids.max"], None, "controller.file=value"),
    ({}, ["pids.max=1\n2"], None, "one line"),
    ({}, ["pids.no_such_file=1"], None, "no such file"),
    ({}, [], ["--", "--bogus"], "unrecognized arguments"),
    ({}, [], ["--"], "no vmm arguments"),
])
def test_bad_command_lines_get_one_line_and_no_jail(base, change, cgroups, tail, words):
    options = {"--id": "bad", "--uid": str(UID + 9), "--gid": str(UID + 9), "--chroot-base": str(base), **change}
    args = ["jail", *(word for pair in options.items() for word in pair)]
    for text in cgroups:
        args += ["--cgroup", text]
    args += ["--", "--api-sock", "/api.sock"] if tail is None else tail
    result = subprocess.run(vmm_command(*args), env=subprocess_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode in (1, 2), result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(base / "vmm" / options["--id"])  # nothing made for it
    assert not any(os.path.exists(os.path.join(h.mount, "vmm", options["--id"])) for h in detect_layout().hierarchies)


def test_the_vmm_seccomp_role_lets_it_serve_and_use_files_inside_its_root(tmp_path):
    """The role on its own, in a process jailed as `vmm jail` jails (bind-mounted root): what the API needs works,
    a socket of another family or an exec kills, other calls naming files are refused."""
    def allowed():
        out = {}
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind("/s.sock")
        server.listen(1)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect("/s.sock")
        conn, _ = server.accept()
        client.sendall(b"ping")
        out["socket"] = conn.recv(4).decode()
        a, b = socket.socketpair()
        a.sendall(b"pair")
        out["socketpair"] = b.recv(4).decode()
        with open("/f.tmp", "wb") as f:
            f.write(b"data")
            f.flush()
            os.fsync(f.fileno())
        os.rename("/f.tmp", "/f")
        out["stat"] = os.stat("/f").st_size
        os.unlink("/s.sock")
        try:
            os.mkdir("/d")
            out["mkdir"] = "made"
        except OSError as exc:
            out["mkdir"] = exc.errno
        return out

    report, status = run_in_vmm_role(tmp_path, allowed)
    assert report == {"socket": "ping", "socketpair": "pair", "stat": 4, "mkdir": 13}, report  # 13: EACCES
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert sorted(os.listdir(tmp_path / "root")) == ["f"]


@pytest.mark.parametrize("call", ["socket_inet", "execve", "symlink", "chmod"])
def test_the_vmm_seccomp_role_kills_what_a_vmm_never_does(tmp_path, call):
    def forbidden():
        if call == "socket_inet":
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        elif call == "execve":
            os.execv("/bin/true", ["true"])
        elif call == "symlink":
            os.symlink("/etc/passwd", "/link")
        else:
            os.chmod("/", 0o777)
        return {"survived": True}

    report, status = run_in_vmm_role(tmp_path, forbidden)
    assert "survived" not in report
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def run_in_vmm_role(tmp_path, body) -> tuple[dict, int]:
    """Fork; the child jails itself as `vmm jail` does (root bind-mounted, uid of its own, seccomp role "vmm") and
    runs ``body()``, whose dict comes back as JSON. Returns (report, wait status of the jailed process)."""
    root = tmp_path / "root"
    root.mkdir()
    os.chown(root, UID + 8, UID + 8)
    r, w = os.pipe()
    lib.jail_prctl(lib.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                enter(JailSpec(root=str(root), bind_root=True, uid=UID + 8, gid=UID + 8, seccomp="vmm",
                               keep_fds=(w,)), on_forked=lambda child: os.write(w, b"%d\n" % child))
                os.write(w, json.dumps(body()).encode() + b"\n")
            except BaseException as exc:  # noqa: BLE001
                os.write(w, json.dumps({"error": repr(exc)}).encode() + b"\n")
                os._exit(3)
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        lines = data.splitlines()
        jailed = int(lines[0])
        _, status = os.waitpid(jailed, 0)
        report = json.loads(lines[1]) if len(lines) > 1 else {}
        assert "error" not in report, report["error"]
        return report, status
    finally:
        lib.jail_prctl(lib.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
