"""`snapd serve` run by a user that is not root (issue #11): its workers jailed in user namespaces, for real.

The test needs root only to set the scene, without touching the host's /dev: copies of the /dev/kvm and
/dev/userfaultfd device nodes (same major/minor) owned by an unprivileged uid, bind-mounted over /dev/kvm and
/dev/userfaultfd in a private mount namespace, in which the daemon is then exec'd as that uid with no groups and no
capabilities (unshare + setpriv). Its state directory and import root belong to that uid. The API is used as root
(the socket is 0660; root may connect to it). Every check of a worker is made from outside, from the host's
/proc, so it reads what the kernel enforces, not what the process says of itself.
"""
import os
import select
import shutil
import signal
import stat
import sys
import tempfile
import time

import pytest

from snapd.daemon_process import DaemonProcess
from tests.conftest import wait_until
from tests.daemon_helpers import children, hello_snapshot, worker_processes
from vmm import workloads
from vmm.jail.native import lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UID = 65534  # nobody: a uid with no file of its own here and no capability
UFFD_SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"
NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")
TOOLS = ("unshare", "setpriv", "mount", "sh")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="setting up an unprivileged daemon's devices and uid needs root"),
    pytest.mark.skipif(not all(os.path.exists(d) for d in ("/dev/kvm", "/dev/userfaultfd")),
                       reason="needs /dev/kvm and /dev/userfaultfd to copy"),
    pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS), reason=f"needs {', '.join(TOOLS)}"),
]


def status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def sysctl_unprivileged_userfaultfd() -> str:
    try:
        with open(UFFD_SYSCTL) as f:
            return f.read().strip()
    except OSError:
        return ""


def hidden_ancestor(path: str) -> tuple[str, str] | None:
    """(the first directory on the way to ``path`` that UID may not search, its child on that way), or None."""
    parts = os.path.realpath(path).split(os.sep)[1:]
    for i in range(len(parts) - 1):
        directory = os.sep + os.path.join(*parts[:i]) if i else os.sep
        info = os.stat(directory)
        searchable = info.st_mode & 0o001 or (info.st_uid == UID and info.st_mode & 0o100)
        if not searchable:
            return directory, os.path.join(directory, parts[i])
    return None


class Scene:
    """A directory for one daemon of UID: device nodes, an import root with a hello snapshot, a state directory."""

    def __init__(self, base: str, snapshot: tuple[str, str]):
        self.base = base
        self.state = self._dir("state")
        self.imports = self._dir("import")
        self.devices = self._dir("dev", mode=0o755)
        self.files = []
        for path in snapshot:  # readable by UID: its own copies
            target = os.path.join(self.imports, os.path.basename(path))
            shutil.copyfile(path, target)
            os.chown(target, UID, UID)
            self.files.append(target)
        self.kvm = self.node("/dev/kvm", "kvm")
        self.userfaultfd = self.node("/dev/userfaultfd", "userfaultfd")

    def _dir(self, name: str, mode: int = 0o700, owner: int = UID) -> str:
        path = os.path.join(self.base, name)
        os.mkdir(path, mode)
        os.chown(path, owner, owner)
        return path

    def node(self, device: str, name: str, owner: int = UID) -> str:
        """A device node like ``device`` (same major/minor), mode 0600, owned by ``owner``."""
        path = os.path.join(self.devices, name)
        os.mknod(path, stat.S_IFCHR | 0o600, os.stat(device).st_rdev)
        os.chown(path, owner, owner)
        return path

    def wrapper(self, kvm: str | None = None, userfaultfd: str | None = None) -> tuple[str, ...]:
        """unshare a mount namespace, bind the nodes over /dev/kvm and /dev/userfaultfd in it, make this Python
        reachable by UID there, then become UID (no groups, no capabilities) and exec the daemon ("$@")."""
        lines = ["set -e",
                 f"mount --bind {kvm or self.kvm} /dev/kvm",
                 f"mount --bind {userfaultfd or self.userfaultfd} /dev/userfaultfd"]
        hidden = {h for h in map(hidden_ancestor, (sys.executable, sys.base_prefix, sys.prefix, os.getcwd())) if h}
        if len(hidden) > 1:
            pytest.skip(f"this Python lies behind several directories uid {UID} cannot search: {sorted(hidden)}")
        for directory, child in hidden:  # e.g. a pyenv under /root (0700): only that child is shown, in there
            stage = self._dir("stage", mode=0o755, owner=0)
            lines += [f"mount --bind {child} {stage}", f"mount -t tmpfs -o mode=0755 snapd-test {directory}",
                      f"mkdir -p {child}", f"mount --move {stage} {child}"]
        lines.append(f'exec setpriv --reuid={UID} --regid={UID} --clear-groups --inh-caps=-all "$@"')
        return ("unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines), "sh")


@pytest.fixture(scope="module")
def snapshot():
    base = tempfile.mkdtemp(prefix="snapd-unpriv-")
    try:
        os.chmod(base, 0o755)
        snapshot_dir = os.path.join(base, "snapshot")
        os.mkdir(snapshot_dir)
        yield base, hello_snapshot(snapshot_dir)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def scene(snapshot):
    base, files = snapshot
    directory = tempfile.mkdtemp(dir=base, prefix="s")  # short: socket paths beneath it must fit in sun_path
    os.chmod(directory, 0o755)
    return Scene(directory, files)


def start(scene: Scene) -> DaemonProcess:
    return DaemonProcess(scene.state, "--pool-size", "1", wrapper=scene.wrapper(), import_roots=[scene.imports])


def zygote(daemon: DaemonProcess) -> int:
    """The daemon's child that is in the daemon's pid namespace (its workers, reparented to it, are not)."""
    found = []
    for pid in children(daemon.process.pid):
        try:
            if len(status(pid)["NSpid"].split()) == 1:
                found.append(pid)
        except FileNotFoundError:  # a worker that just went
            pass
    assert len(found) == 1, found
    return found[0]


def workers(daemon: DaemonProcess) -> set[int]:
    return worker_processes(zygote(daemon), daemon.process.pid)


def assert_jailed(pid: int, daemon_pid: int) -> None:
    st = status(pid)
    assert st["Uid"].split() == [str(UID)] * 4 and st["Gid"].split() == [str(UID)] * 4  # the daemon's, on the host
    assert st["Groups"].strip() == ""
    for field in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):  # none, not even in its own user namespace
        assert int(st[field], 16) == 0, (field, st[field])
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert st["NSpid"].split()[1:] == ["1"]  # pid 1 of a pid namespace of its own
    for ns in NAMESPACES:
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/{daemon_pid}/ns/{ns}"), ns
    with open(f"/proc/{pid}/uid_map") as f:  # root in there is the daemon's uid, and no other uid exists there
        assert f.read().split() == ["0", str(UID), "1"]
    assert os.listdir(f"/proc/{pid}/root") == []  # an empty root: no host file reachable by name


def test_an_unprivileged_daemon_serves_clones_from_jailed_workers(scene):
    with start(scene) as daemon:
        daemon_status = status(daemon.process.pid)
        assert daemon_status["Uid"].split() == [str(UID)] * 4 and int(daemon_status["CapEff"], 16) == 0
        assert os.stat(daemon.socket_path).st_uid == UID
        client = daemon.client
        image = client.register_image(*scene.files)["id"]
        (clone,) = client.create_clones(image, payload=b"unprivileged")
        workloads.verify_hello(b"unprivileged", clone["result"], 1)
        assert clone["pid"] in workers(daemon)
        assert_jailed(clone["pid"], daemon.process.pid)
        workloads.verify_hello(b"again", client.invoke(clone["id"], b"again"), 2)
        saved = client.snapshot_clone(clone["id"])  # files the daemon (UID) made, written by the jailed worker
        for path in (saved["state_path"], saved["mem_path"]):
            assert os.stat(path).st_uid == UID and os.stat(path).st_size > 0
        workloads.verify_hello(b"after snapshot", client.invoke(clone["id"], b"after snapshot"), 3)
        assert wait_until(lambda: len(workers(daemon)) >= 2)  # the warm one too, jailed before any request
        for pid in workers(daemon):
            assert_jailed(pid, daemon.process.pid)
        client.delete_clone(clone["id"])
        assert all(c["id"] != clone["id"] for c in client.clones())
        (second,) = client.create_clones(image, payload=b"after delete")
        workloads.verify_hello(b"after delete", second["result"], 1)
        client.delete_clone(second["id"])


def test_sigterm_stops_the_daemon_and_every_worker(scene):
    daemon = start(scene)
    try:
        image = daemon.client.register_image(*scene.files)["id"]
        (clone,) = daemon.client.create_clones(image, payload=b"live")  # a live clone, not deleted
        workloads.verify_hello(b"live", clone["result"], 1)
        assert wait_until(lambda: len(workers(daemon)) >= 2)  # the clone's and a warm one
        pids = workers(daemon) | {zygote(daemon)}
        assert clone["pid"] in pids
        pidfds = {pid: os.pidfd_open(pid) for pid in pids}  # each names its process, whatever pids are reused
        try:
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.process.wait(30) == 0
            # A pidfd is readable once its process has exited.
            running = lambda: {pid for pid, fd in pidfds.items() if not select.select([fd], [], [], 0)[0]}  # noqa: E731
            assert wait_until(lambda: not running(), timeout=10), f"left behind: {running()}"
            assert not os.path.exists(daemon.socket_path)
        finally:
            for fd in pidfds.values():
                os.close(fd)
    finally:
        daemon.stop()


def serve_command(scene: Scene) -> list[str]:
    return [sys.executable, "-m", "snapd.cli", "serve", "--state-dir", scene.state, "--pool-size", "1"]


def refusal(scene: Scene, pid: int, output: str) -> str:
    """Wait (15 s at most) for the daemon started as ``pid`` (stdout and stderr into ``output``) to refuse to start;
    its one error line."""
    deadline = time.monotonic() + 15
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with open(output) as f:
        text = f.read()
    assert done[0] != 0, f"snapd serve did not refuse to start: {text[-2000:]}"
    errors = [line for line in text.splitlines() if line.startswith("snapd: error:")]
    assert os.waitstatus_to_exitcode(done[1]) == 2 and len(errors) == 1, text
    assert "serving on" not in text and "Traceback" not in text
    procs = os.path.join(scene.state, "run", "procs")
    assert not os.path.isdir(procs) or not os.listdir(procs)  # no process record: no zygote was started
    return errors[0]


def spawn(argv: list[str], output: str, before_exec=None) -> int:
    """fork + exec ``argv`` with stdout and stderr into ``output``; ``before_exec()`` runs in the child first."""
    out = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    env = dict(os.environ, PYTHONPATH=ROOT)
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(out, 1)
            os.dup2(out, 2)
            if before_exec:
                before_exec()
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    os.close(out)
    return pid


@pytest.mark.parametrize("device", ["userfaultfd", "kvm"])
def test_refuses_to_start_with_one_line_when_a_device_cannot_be_opened(scene, device):
    if device == "userfaultfd" and sysctl_unprivileged_userfaultfd() != "0":
        pytest.skip(f"{UFFD_SYSCTL} is not 0 here: an unprivileged uffd catches kernel faults without the device")
    theirs = scene.node(f"/dev/{device}", f"{device}-root", owner=0)  # the same device, which UID may not open
    output = os.path.join(scene.base, "output")
    error = refusal(scene, spawn([*scene.wrapper(**{device: theirs}), *serve_command(scene)], output), output)
    if device == "userfaultfd":
        assert "/dev/userfaultfd cannot be opened (Permission denied)" in error
        assert "vm.unprivileged_userfaultfd is 0" in error and "vm.unprivileged_userfaultfd=1" in error
    else:
        assert "cannot open /dev/kvm (Permission denied)" in error


def test_refuses_to_start_with_one_line_without_user_namespaces(scene):
    """The daemon and its wrapper run in a user namespace of root's (every uid below 65536 mapped to itself) whose
    user.max_user_namespaces is 0: the daemon is uid 65534 as before, but may make no user namespace. The host's
    own limit is not touched (the setting is per user namespace)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def own_user_namespace():
        os.close(ready_r)
        os.close(go_w)
        os.write(ready_w, str(lib.jail_unshare(lib.CLONE_NEWUSER)).encode())
        os.read(go_r, 1)  # until our parent has written the uid and gid maps

    output = os.path.join(scene.base, "output")
    script = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'
    pid = spawn(["sh", "-c", script, "sh", *scene.wrapper(), *serve_command(scene)], output, own_user_namespace)
    os.close(ready_w)
    os.close(go_r)
    try:
        assert os.read(ready_r, 16) == b"0", "unshare(CLONE_NEWUSER) failed"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write("0 0 65536")
    finally:
        os.write(go_w, b"g")
        os.close(go_w)
        os.close(ready_r)
    error = refusal(scene, pid, output)
    assert "no user namespace of its own (unshare(CLONE_NEWUSER) failed" in error, error
    assert "user.max_user_namespaces" in error and "run snapd serve as root" in error
