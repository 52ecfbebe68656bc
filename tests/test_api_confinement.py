"""What the snapd API may touch (docs/snapd.md, "What the API may touch"), against a real `snapd serve`:

- reads only beneath the import roots (STATE/import and --import-root), regular files only, sizes bounded;
- clone snapshots written only beneath STATE/snapshots, never over an existing file;
- a refused path is a 4xx naming the path and the rule, the target untouched, no byte of any file in the reply;
- the Unix socket 0660 with the group given; TCP only with the bearer token, the listener's Host, JSON bodies,
  and never through the restore lane.
"""
import base64
import grp
import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from snapd.daemon_process import DaemonProcess, wait_pool
from tests.conftest import requires_kvm, subprocess_env
from tests.daemon_helpers import hello_snapshot
from vmm import workloads
from vmm.api.client import VmmProcess

pytestmark = requires_kvm

SECRET = b"Zq9#xK2!-confinement-secret-" + os.urandom(8).hex().encode()  # first 8 bytes: what was quoted
TOKEN = "tok-" + os.urandom(16).hex()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def other_group() -> int:
    """A group the daemon's socket can be given that is not the daemon's primary one."""
    candidates = [g.gr_gid for g in grp.getgrall()] if os.geteuid() == 0 else os.getgroups()
    for gid in candidates:
        if gid != os.getgid():
            return gid
    pytest.skip("no group other than the primary one to give the socket")


class World:
    """The daemon and the files around it: an extra import root with the hello snapshot, an outside directory
    with a secret and a victim file, and traps beneath the import root (FIFO, symlinks out, a device)."""

    def __init__(self, base):
        self.base = base
        self.state_dir = base / "state"
        self.extra = base / "extra"
        self.outside = base / "outside"
        for d in (self.extra, self.outside):
            d.mkdir()
        self.state, self.mem = hello_snapshot(self.extra)
        self.secret = self.outside / "secret"
        self.secret.write_bytes(SECRET + b"\n" * 64)
        self.victim = self.outside / "victim"
        self.victim.write_bytes(SECRET)
        self.token_file = base / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.token_file.chmod(0o600)
        self.port = free_port()
        self.gid = other_group()
        imports = self.state_dir / "import"
        imports.mkdir(parents=True)
        (imports / "secret-here").write_bytes(SECRET + b"\0" * 64)  # beneath the root, but not a snapshot
        os.mkfifo(imports / "fifo")
        os.symlink(self.secret, imports / "link-out")
        os.symlink("/dev/zero", imports / "zero-link")
        os.symlink("../../outside", imports / "dir-out")
        (imports / "subdir").mkdir()
        self.device = None
        if os.geteuid() == 0:
            os.mknod(imports / "zero-device", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
            self.device = imports / "zero-device"
        with open(imports / "huge.state", "wb") as f:
            f.truncate(65 << 20)  # over the state file format's 64 MiB: refused before it is read
        with open(self.mem, "rb") as f:
            (imports / "short.mem").write_bytes(f.read(1 << 20))
        os.link(self.state, imports / "hello.state")
        snapshots = self.state_dir / "snapshots"
        snapshots.mkdir()
        (snapshots / "taken.state").write_bytes(SECRET)
        os.symlink(self.victim, snapshots / "victim-link")
        os.symlink(self.outside, snapshots / "dir-link")
        self.snapshots = snapshots
        self.daemon = DaemonProcess(str(self.state_dir), "--pool-size", "1", "--huge-pages", "off",
                                    "--socket-group", str(self.gid), "--tcp-port", str(self.port),
                                    "--token-file", str(self.token_file), prepared=1,
                                    import_roots=[self.extra, snapshots])
        self.client = self.daemon.client
        self.image = self.client.register_image(self.state, self.mem)["id"]

    def fingerprints(self) -> dict:
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (self.secret, self.victim,
                                                                    self.snapshots / "taken.state")}

    def close(self) -> None:
        self.daemon.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("confinement"))
    yield w
    w.close()


def assert_refused(reply, status: int, *words: str, elapsed: float | None = None) -> str:
    """A 4xx with the status and words expected, and no byte of the secret in it (nor its escaped forms)."""
    assert reply.status == status, (reply.status, reply.body)
    message = reply.json()["fault_message"]
    for word in words:
        assert word in message, message
    for leak in (SECRET[:8], SECRET[:8].decode(), repr(SECRET[:8]), SECRET[8:20]):
        assert (leak if isinstance(leak, bytes) else leak.encode()) not in reply.body, reply.body
    if elapsed is not None:
        assert elapsed < 5, f"took {elapsed:.1f} s"
    return message


# -------------------------------------------------------------------------------------------- reads

def read_cases(w: World):
    out = str(w.secret)
    cases = [
        ("absolute outside the roots", out, 400, "outside the import roots"),
        ("/etc/shadow", "/etc/shadow", 400, "outside the import roots"),
        ("..", "../../outside/secret", 400, "leads outside"),
        ("absolute with ..", str(w.state_dir / "import" / ".." / ".." / "outside" / "secret"), 400, "leads outside"),
        ("symlink out", "link-out", 400, "leads outside"),
        ("symlink to /dev/zero", "zero-link", 400, "leads outside"),
        ("directory symlink out", "dir-out/secret", 400, "leads outside"),
        ("FIFO", "fifo", 400, "FIFO"),
        ("/dev/zero", "/dev/zero", 400, "outside the import roots"),
        ("directory", "subdir", 400, "a directory"),
        ("the root itself", str(w.state_dir / "import"), 400, "a directory"),
        ("NUL byte", "hello\0.state", 400, "NUL"),
        ("missing", "nothing-here.state", 404, "does not exist"),
    ]
    if w.device is not None:
        cases.append(("device node beneath the root", "zero-device", 400, "character device"))
    return cases


def test_registration_from_an_extra_import_root_and_from_the_default_one_works(world):
    assert world.client.image(world.image)["state_path"].startswith(str(world.state_dir / "images"))
    relative = world.client.request("POST", "/v1/images", {"state_path": "hello.state", "mem_path": world.mem})
    assert relative.status == 201, relative.body  # a relative path: beneath STATE/import
    assert relative.json()["id"] != world.image
    world.client.delete_image(relative.json()["id"])


@pytest.mark.parametrize("field", ["state_path", "mem_path", "loading_set"])
def test_register_refuses_every_path_outside_or_unfit_promptly_and_quotes_no_bytes(world, field):
    before = world.fingerprints()
    images = len(world.client.images())
    for name, path, status, words in read_cases(world):
        body = {"state_path": world.state, "mem_path": world.mem, field: path}
        t0 = time.monotonic()
        reply = world.client.request("POST", "/v1/images", body)
        message = assert_refused(reply, status, words, f"images.{field}", elapsed=time.monotonic() - t0)
        assert repr(path) in message or json.dumps(path) in message, (name, message)  # the path is named
    assert world.fingerprints() == before and len(world.client.images()) == images


def test_register_never_quotes_a_file_beneath_the_root(world):
    for field in ("state_path", "loading_set"):
        body = {"state_path": world.state, "mem_path": world.mem, field: "secret-here"}
        assert_refused(world.client.request("POST", "/v1/images", body), 400, "secret-here")
    body = {"state_path": world.state, "mem_path": "secret-here"}
    assert_refused(world.client.request("POST", "/v1/images", body), 400, "exactly")  # not the layout's size


def test_sizes_are_bounded_before_reading(world):
    t0 = time.monotonic()
    reply = world.client.request("POST", "/v1/images", {"state_path": "huge.state", "mem_path": world.mem})
    assert_refused(reply, 400, "huge.state", "more than", elapsed=time.monotonic() - t0)
    reply = world.client.request("POST", "/v1/images", {"state_path": world.state, "mem_path": "short.mem"})
    assert_refused(reply, 400, "short.mem", "exactly")


def test_loading_set_path_is_confined_too(world):
    before = world.fingerprints()
    route = f"/v1/images/{world.image}/loading-set"
    for name, path, status, words in read_cases(world):
        t0 = time.monotonic()
        reply = world.client.request("POST", route, {"path": path})
        assert_refused(reply, status, words, "loading_set.path", elapsed=time.monotonic() - t0)
    assert_refused(world.client.request("POST", route, {"path": "secret-here"}), 400, "not a loading set")
    assert world.client.request("GET", route).json()["chunks"] == 0  # the image is unchanged
    assert world.fingerprints() == before


# -------------------------------------------------------------------------------------------- writes

@pytest.fixture(scope="module")
def clone(world):
    wait_pool(world.client, 1, prepared=1)
    request = workloads.hello_request("confined")
    (c,) = world.client.create_clones(world.image, payload=request)
    workloads.verify_hello(request, c["result"], 1)
    return c["id"]


def test_clone_snapshots_outside_the_snapshot_root_are_refused_and_touch_nothing(world, clone):
    before = world.fingerprints()
    route = f"/v1/clones/{clone}/snapshot"
    victim = str(world.victim)
    cases = [
        ({"state_path": victim}, 400, "outside", "snapshot.state_path"),
        ({"mem_path": victim}, 400, "outside", "snapshot.mem_path"),
        ({"state_path": "../../outside/victim"}, 400, "leads outside"),
        ({"mem_path": "../import/new.mem"}, 400, "leads outside"),
        ({"state_path": "dir-link/new.state"}, 400, "leads outside"),  # a symlinked directory out
        ({"state_path": "victim-link"}, 409, "already exists"),  # a symlink is never written through or replaced
        ({"state_path": "taken.state"}, 409, "already exists"),  # an existing file beneath the root: kept
        ({"state_path": str(world.snapshots / "taken.state")}, 409, "already exists"),
        ({"state_path": "same", "mem_path": "./same"}, 400, "same file"),
        ({"state_path": "a\0b"}, 400, "NUL"),
        ({"state_path": "no-dir/x.state"}, 404, "does not exist"),
        ({"state_path": "sub/"}, 400, "file name"),
        ({"state_path": ".."}, 400, "file name"),
    ]
    for body, status, *words in cases:
        assert_refused(world.client.request("POST", route, body), status, *words)
    assert world.fingerprints() == before
    assert not (world.outside / "new.state").exists() and not (world.state_dir / "import" / "new.mem").exists()
    assert not [n for n in os.listdir(world.snapshots) if n.startswith(".snapd-")], "temporaries left behind"
    assert not (world.snapshots / "same").exists()
    assert world.client.clone(clone)["state"] == "running"


def test_a_clone_snapshot_beneath_the_snapshot_root_is_written_and_loads(world, clone):
    reply = world.client.request("POST", f"/v1/clones/{clone}/snapshot", {"state_path": "c1.state",
                                                                         "mem_path": "c1.mem"})
    assert reply.status == 200, reply.body
    files = reply.json()
    assert files == {"state_path": str(world.snapshots / "c1.state"), "mem_path": str(world.snapshots / "c1.mem")}
    assert not [n for n in os.listdir(world.snapshots) if n.startswith(".snapd-")], "temporaries left behind"
    again = world.client.request("POST", f"/v1/clones/{clone}/snapshot", {"state_path": "c1.state",
                                                                         "mem_path": "c2.mem"})
    assert_refused(again, 409, "c1.state")  # never replaced
    assert not (world.snapshots / "c2.mem").exists()  # and nothing of the refused pair was left
    default = world.client.snapshot_clone(clone)  # default names, beneath STATE/snapshots
    assert os.path.dirname(default["state_path"]) == str(world.snapshots)
    image = world.client.register_image(files["state_path"], files["mem_path"])["id"]
    request = workloads.hello_request("from the clone's snapshot")
    (child,) = world.client.create_clones(image, payload=request)
    workloads.verify_hello(request, child["result"], 2)  # the clone had answered once before its snapshot
    world.client.delete_clone(child["id"])
    world.client.delete_image(image)


# -------------------------------------------------------------------------------------------- the Unix socket

def test_the_unix_socket_is_0660_with_the_group_given(world):
    info = os.stat(world.daemon.socket_path)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660, oct(info.st_mode)
    assert info.st_uid == os.getuid() and info.st_gid == world.gid != os.getgid()


# -------------------------------------------------------------------------------------------- TCP

def tcp(world, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
        host: str | None = None, token: str | None = TOKEN) -> tuple[int, dict, bytes]:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{world.port}'}", "Connection: close"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
    with socket.create_connection(("127.0.0.1", world.port), timeout=30) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers_out = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers_out, payload


def test_tcp_needs_the_bearer_token(world):
    assert tcp(world, "GET", "/v1/images", token=None)[0] == 401
    status, headers, body = tcp(world, "GET", "/v1/images", token="wrong-" + TOKEN)
    assert status == 401 and headers.get("www-authenticate", "").startswith("Bearer")
    assert "Authorization: Bearer" in json.loads(body)["fault_message"]
    assert tcp(world, "GET", "/v1/images", token=TOKEN[:-1])[0] == 401  # a prefix is not the token
    status, _, body = tcp(world, "GET", "/v1/images")
    assert status == 200 and world.image in {i["id"] for i in json.loads(body)["images"]}


def test_tcp_restores_never_skip_the_checks_through_the_lane(world):
    """A prepared, held worker is waiting (the lane would answer a clone request in C): a TCP request without the
    token still gets a 401 and no clone; with the token it gets its clone (answered the Python way)."""
    wait_pool(world.client, 1, prepared=1)
    before = {c["id"] for c in world.client.clones()}
    request = workloads.hello_request("tcp")
    body = json.dumps({"image": world.image, "payload": base64.b64encode(request).decode()}).encode()
    json_type = {"Content-Type": "application/json"}
    assert tcp(world, "POST", "/v1/clones", body, json_type, token=None)[0] == 401
    assert tcp(world, "POST", "/v1/clones", body, json_type, token="nope")[0] == 401
    assert {c["id"] for c in world.client.clones()} == before
    status, _, reply = tcp(world, "POST", "/v1/clones", body, json_type)
    assert status == 201, reply
    (made,) = json.loads(reply)["clones"]
    workloads.verify_hello(request, base64.b64decode(made["result"]), 1)
    world.client.delete_clone(made["id"])


def test_tcp_refuses_a_cross_origin_text_plain_post(world):
    body = json.dumps({"image": world.image}).encode()
    browser = {"Content-Type": "text/plain;charset=UTF-8", "Origin": "http://evil.example"}
    before = {c["id"] for c in world.client.clones()}
    assert tcp(world, "POST", "/v1/clones", body, browser, token=None)[0] == 401  # what a page can send
    status, _, reply = tcp(world, "POST", "/v1/clones", body, browser)  # even with the token
    assert status == 415 and "application/json" in json.loads(reply)["fault_message"]
    assert tcp(world, "POST", "/v1/clones", body, {}, token=TOKEN)[0] == 415  # no Content-Type at all
    assert {c["id"] for c in world.client.clones()} == before


def test_tcp_refuses_another_host(world):
    for host in (f"evil.example:{world.port}", "127.0.0.1:1", f"localhost.evil.example:{world.port}"):
        status, _, reply = tcp(world, "GET", "/v1/images", host=host)
        assert status == 421 and "Host" in json.loads(reply)["fault_message"], (host, reply)
    assert tcp(world, "GET", "/v1/images", host=f"localhost:{world.port}")[0] == 200


# -------------------------------------------------------------------------------------------- start-up refusals

def serve(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snapd.cli", "serve", "--state-dir", str(tmp_path / "s"), *args],
                          capture_output=True, text=True, env=subprocess_env(), timeout=60)


@pytest.mark.parametrize("args, words", [
    (["--tcp-port", "{port}"], "--tcp-port needs --token-file"),
    (["--tcp-port", "{port}", "--token-file", "{empty}"], "empty"),
    (["--tcp-port", "{port}", "--token-file", "{missing}"], "cannot read"),
    (["--import-root", "{missing}"], "import root"),
    (["--socket-group", "no-such-group-xyz"], "no such group"),
])
def test_serve_refuses_unsafe_or_unusable_settings_in_one_line(tmp_path, args, words):
    (tmp_path / "empty").write_text("\n")
    values = {"port": str(free_port()), "empty": str(tmp_path / "empty"), "missing": str(tmp_path / "missing")}
    r = serve(tmp_path, *[a.format(**values) for a in args])
    assert r.returncode == 2 and r.stderr.startswith("snapd: error:") and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# -------------------------------------------------------------------------------------------- the VMM's API

def test_the_vmm_api_refuses_a_nul_byte_in_a_path(tmp_path):
    with VmmProcess(str(tmp_path / "vmm.sock"), stdout=subprocess.DEVNULL) as vmm:
        for method, path, body in [
            ("PUT", "/boot-source", {"kernel_image_path": "/x\0y"}),
            ("PUT", "/snapshot/load", {"snapshot_path": "a\0b", "mem_file_path": "m"}),
            ("PUT", "/snapshot/load", {"snapshot_path": "a", "mem_backend": {"backend_type": "File",
                                                                            "backend_path": "m\0"}}),
            ("PUT", "/snapshot/create", {"snapshot_path": "s\0", "mem_file_path": "m"}),
        ]:
            reply = vmm.client.request(method, path, body)
            assert reply.status == 400 and "NUL" in reply.json()["fault_message"], (path, reply.body)
        assert vmm.client.request("GET", "/").status == 200  # and it is still alive
