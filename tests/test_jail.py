"""vmm.jail against the real kernel: each layer checked on its own, in a forked child that enters the jail.

Every test forks; the child jails itself and reports over a pipe; the test process is made a subreaper so that the
jailed child (forked once more into its own pid namespace) comes back to it to be reaped, with its exit status.
"""
import json
import os
import signal
import socket
import time

import pytest

from vmm.jail import JailSpec, enter
from vmm.jail.native import lib

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail's root mode needs root")
UID = 299990


@pytest.fixture(autouse=True)
def subreaper():
    lib.jail_prctl(lib.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    lib.jail_prctl(lib.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def run_jailed(tmp_path, body, observe=None, **spec) -> tuple[dict, int]:
    """Fork; the child enters a jail built from ``spec`` and runs ``body()`` (a dict it reports, as JSON). With
    ``observe``, the jailed process waits until ``observe(host_pid)`` has looked at it from outside. Returns
    (report, wait status of the jailed process)."""
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(go_w)
        try:
            enter(JailSpec(root=str(root), keep_fds=(w, go_r), **spec),
                  on_forked=lambda child: os.write(w, json.dumps({"host_pid": child}).encode() + b"\n"))
            os.write(w, b'{"jailed": true}\n')
            os.read(go_r, 1)
            report = body()
            os.write(w, json.dumps(report).encode() + b"\n")
        except BaseException as exc:  # noqa: BLE001
            os.write(w, json.dumps({"error": repr(exc)}).encode() + b"\n")
            os._exit(3)
        os._exit(0)
    os.close(w)
    os.close(go_r)
    os.waitpid(pid, 0)  # the parent that forked into the pid namespace leaves at once
    head = b""
    while head.count(b"\n") < 2:  # its host pid, then word that it is jailed
        byte = os.read(r, 1)
        assert byte, f"the child failed before its jail was entered: {head!r}"
        head += byte
    lines = [json.loads(line) for line in head.splitlines()]
    assert "error" not in lines[1], lines[1]["error"]
    host_pid = lines[0]["host_pid"]
    observed = observe(host_pid) if observe else None
    os.write(go_w, b"g")
    os.close(go_w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    _, status = os.waitpid(host_pid, 0)
    report = {k: v for line in data.splitlines() for k, v in json.loads(line).items()}
    assert "error" not in report, report["error"]
    if observe:
        report["observed"] = observed
    return report, status


def status_fields(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_every_layer_is_in_place(tmp_path):
    def body():
        return {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(), "hostname": socket.gethostname(),
                "env": dict(os.environ)}

    def observe(pid):  # from outside, while the jailed process waits
        return {"status": status_fields(pid), "root": os.listdir(f"/proc/{pid}/root"),
                "ns": {name: os.readlink(f"/proc/{pid}/ns/{name}") != os.readlink(f"/proc/self/ns/{name}")
                       for name in ("mnt", "pid_for_children", "net", "ipc", "uts", "cgroup")}}

    report, exit_status = run_jailed(tmp_path, body, observe, uid=UID, gid=UID)
    seen = report["observed"]
    status = seen["status"]
    assert report["pid"] == 1  # pid 1 of its own pid namespace
    assert status["NSpid"].split()[1:] == ["1"]
    assert (report["uid"], report["gid"], status["Groups"].strip()) == (UID, UID, "")
    assert status["Uid"].split() == [str(UID)] * 4
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapBnd"], 16) == 0
    assert int(status["CapInh"], 16) == int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # a filter
    assert all(seen["ns"].values()), seen["ns"]
    assert seen["root"] == []  # an empty root: no host file reachable by name
    assert report["hostname"] == "vmm"
    assert report["env"] == {}
    assert os.WIFEXITED(exit_status) and os.WEXITSTATUS(exit_status) == 0


@pytest.mark.parametrize("call", ["socket_inet", "execve", "ptrace", "mount", "unshare"])
def test_a_forbidden_system_call_kills_the_process_by_sigsys(tmp_path, call):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def body():
        if call == "socket_inet":
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        elif call == "execve":
            os.execv("/bin/true", ["true"])
        elif call == "unshare":
            lib.jail_unshare(lib.CLONE_NEWUSER)
        elif call == "ptrace":
            libc.ptrace(16, 1, 0, 0)  # PTRACE_ATTACH
        else:
            libc.mount(b"none", b"/", b"tmpfs", 0, None)
        return {"survived": True}

    report, status = run_jailed(tmp_path, body, uid=UID, gid=UID)
    assert "survived" not in report
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_files_are_out_of_reach_by_name_without_seccomp(tmp_path):
    """The root layer on its own (no filter): the host's files are simply not there."""
    def body():
        out = {"root": os.listdir("/")}
        for path in ("/etc/passwd", "/dev/kvm", "/proc/1/status", "/" + str(tmp_path)):
            try:
                open(path, "rb").close()
                out[path] = "opened"
            except OSError as exc:
                out[path] = exc.errno
        try:
            open("/new-file", "w").close()
            out["write"] = "written"
        except OSError as exc:
            out["write"] = exc.errno
        return out

    report, _ = run_jailed(tmp_path, body, uid=UID, gid=UID, seccomp=None)
    assert report.pop("root") == []
    assert report.pop("write") != "written"  # read-only, and not ours
    assert all(value != "opened" for value in report.values()), report


def test_other_processes_cannot_be_seen_or_signalled_without_seccomp(tmp_path):
    """The pid namespace and uid layers on their own: a process outside is invisible and keeps running."""
    victim = os.fork()
    if victim == 0:
        time.sleep(30)
        os._exit(0)
    try:
        def body():
            out = {}
            for sig in (0, signal.SIGKILL):
                try:
                    os.kill(victim, sig)
                    out[str(sig)] = "sent"
                except OSError as exc:
                    out[str(sig)] = exc.errno
            try:
                os.kill(-1, signal.SIGKILL)  # everyone it may signal: only itself is left in its namespace
            except OSError:
                pass
            return out

        report, status = run_jailed(tmp_path, body, uid=UID, gid=UID, seccomp=None)
        assert "sent" not in report.values(), report
        assert os.waitpid(victim, os.WNOHANG) == (0, 0)  # still running
    finally:
        os.kill(victim, signal.SIGKILL)
        os.waitpid(victim, 0)


def test_no_network_without_seccomp(tmp_path):
    """The net namespace on its own: a listener on the host's loopback is unreachable."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        def body():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect(("127.0.0.1", port))
                return {"connect": "connected"}
            except OSError as exc:
                return {"connect": exc.errno}

        report, _ = run_jailed(tmp_path, body, uid=UID, gid=UID, seccomp=None)
        assert report["connect"] != "connected"
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


def test_privileges_cannot_be_regained(tmp_path):
    def body():
        out = {"caps_empty": lib.jail_capabilities_empty()}
        try:
            os.setuid(0)
            out["setuid"] = "root"
        except OSError as exc:
            out["setuid"] = exc.errno
        return out

    report, _ = run_jailed(tmp_path, body, uid=UID, gid=UID, seccomp=None)
    assert report["caps_empty"] == 1
    assert report["setuid"] != "root"


def test_only_the_kept_descriptors_survive(tmp_path):
    extra = os.open("/dev/null", os.O_RDONLY)  # inheritable or not, it must be closed in the jail
    try:
        def body():
            return {"open": [fd for fd in range(256) if _is_open(fd)]}

        report, _ = run_jailed(tmp_path, body, uid=UID, gid=UID)
        assert extra not in report["open"]
        assert len([fd for fd in report["open"] if fd > 2]) == 2  # the two pipe ends it was told to keep
    finally:
        os.close(extra)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
