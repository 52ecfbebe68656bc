"""A snapshot is one unit (issue 12): the state file names its memory file's identity (docs/snapshot-format.md,
"Memory file"), both files are published together, a crash between the two renames leaves a pair that is
refused, and what a crashed writer left is removed by the next snapshot into that directory (vmm) or the next
start (snapd). Real kernel, real processes; the kill between the renames is made by strace's syscall fault
injection (the second rename(2) of the VMM process: the state file's, memory first) and, where strace is absent,
by stopping the real writer after it published the memory file."""
import os
import shutil
import subprocess
import sys

import pytest

from snapd.atomic import AtomicPair, atomic_file, remove_stale_temps
from snapd.image.builder import build_image
from snapd.image.reader import BaseImage
from snapd.snapfile import (MEMORY_TRAILER_SIZE, ChecksumMismatch, NoMemoryTrailer, Truncated, UnsupportedVersion,
                            encode_state, pack_memory_trailer, pack_state_file, read_memory_trailer,
                            unpack_memory_trailer)
from tests.conftest import requires_kvm, subprocess_env
from tests.vm_helpers import QUIET, snapshot_guest, snapshot_memory
from vmm import workloads
from vmm.api.client import VmmProcess, wait_for_socket
from vmm.config import MachineConfig
from vmm.machine import Microvm
from vmm.snapshot import (SnapshotError, capture_state, create_snapshot, load_snapshot_file_backed, read_snapshot,
                          rebase_snapshot, write_snapshot_files)

pytestmark = requires_kvm
MEM_MIB = 64


def temps(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".tmp" in n)


def memory_id(mem_path) -> bytes:
    with open(mem_path, "rb") as f:
        return read_memory_trailer(f.fileno(), str(mem_path)).memory_id


def paused_hello(mem_mib: int = MEM_MIB, track: bool = False, invokes: int = 1) -> Microvm:
    machine = Microvm(MachineConfig(mem_size_mib=mem_mib, boot_args="workload=hello", track_dirty_pages=track),
                      serial_sink=QUIET)
    machine.boot()
    machine.wait_ready(10)
    for _ in range(invokes):
        machine.invoke(b"x")
    machine.pause()
    return machine


@pytest.fixture
def spawn(tmp_path):
    """VMM processes (`python -m vmm.cli --api-sock`), stopped at the end; none may print a traceback."""
    started = []

    def start(name: str) -> VmmProcess:
        err = open(tmp_path / f"{name}.stderr", "w+b")
        vmm = VmmProcess(str(tmp_path / f"{name}.sock"), stdout=subprocess.DEVNULL, stderr=err)
        vmm.stderr_file = err
        started.append(vmm)
        return vmm

    yield start
    for vmm in started:
        if vmm.process.poll() is None:
            vmm.stop()
        vmm.stderr_file.seek(0)
        stderr = vmm.stderr_file.read().decode(errors="replace")
        vmm.stderr_file.close()
        assert "Traceback" not in stderr, stderr


def started_hello(client, invokes: int = 1):
    client.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": MEM_MIB})
    client.start()
    for count in range(1, invokes + 1):
        request = f"call {count}".encode()
        reply, _ = client.invoke(request)
        workloads.verify_hello(request, reply, count)
    return client


def load_reply(client, state, mem):
    return client.request("PUT", "/snapshot/load", {"snapshot_path": str(state),
                                                    "mem_backend": {"backend_type": "File",
                                                                    "backend_path": str(mem)}})


def fault(reply) -> str:
    body = reply.json()
    assert set(body) == {"fault_message"}, body
    return body["fault_message"]


def assert_refused_pair(reply, state, mem) -> None:
    message = fault(reply)
    assert reply.status == 400, message
    assert str(state) in message and str(mem) in message and "is not the memory file of" in message, message


# ------------------------------------------------------------------------------ the format: the trailer

def test_the_trailer_is_one_checksummed_page_naming_its_memory():
    trailer = pack_memory_trailer(b"m" * 16, b"s" * 16, 64 << 20)
    assert len(trailer) == MEMORY_TRAILER_SIZE == 4096 and trailer[:8] == b"UVMMEMID"
    parsed = unpack_memory_trailer(trailer, "x")
    assert (parsed.memory_id, parsed.snapshot_id, parsed.data_size) == (b"m" * 16, b"s" * 16, 64 << 20)
    for at in (9, 20, 40, 100, 4095):  # any byte: version, id, size, padding, checksum
        bad = bytearray(trailer)
        bad[at] ^= 1
        with pytest.raises((ChecksumMismatch, UnsupportedVersion)):
            unpack_memory_trailer(bytes(bad), "x")
    with pytest.raises(NoMemoryTrailer, match="x: does not end with a memory identity trailer"):
        unpack_memory_trailer(bytes(4096), "x")


def test_a_memory_file_is_guest_memory_then_its_trailer(tmp_path):
    state_path, mem_path = snapshot_guest(str(tmp_path), "workload=hello", mem_mib=MEM_MIB, invokes=1)
    state = read_snapshot(state_path)
    assert state.memory_file.data_size == MEM_MIB << 20 and len(state.memory_file.id) == 32
    assert os.path.getsize(mem_path) == (MEM_MIB << 20) + MEMORY_TRAILER_SIZE
    with open(mem_path, "rb") as f:
        trailer = read_memory_trailer(f.fileno(), mem_path)
    assert trailer.memory_id.hex() == state.memory_file.id and trailer.snapshot_id.hex() == state.snapshot_id
    with open(mem_path, "r+b") as f:  # extended: the trailer no longer ends it
        f.truncate(os.path.getsize(mem_path) + 4096)
        with pytest.raises(NoMemoryTrailer):
            read_memory_trailer(f.fileno(), mem_path)
    cut = tmp_path / "cut.mem"  # a trailer after less memory than it says (a file cut short and re-ended)
    cut.write_bytes(bytes(8192) + pack_memory_trailer(b"m" * 16, b"s" * 16, 1 << 20))
    with open(cut, "rb") as f, pytest.raises(Truncated, match="truncated or extended"):
        read_memory_trailer(f.fileno(), str(cut))


# ------------------------------------------------------------------------------ a mismatched pair is refused

def test_a_state_file_with_another_snapshots_memory_file_of_the_same_size_is_refused(spawn, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = snapshot_guest(str(tmp_path / "a"), "workload=hello", mem_mib=MEM_MIB, invokes=1)
    b = snapshot_guest(str(tmp_path / "b"), "workload=hello", mem_mib=MEM_MIB, invokes=2)
    assert os.path.getsize(a[1]) == os.path.getsize(b[1])
    with pytest.raises(SnapshotError, match="is not the memory file of snapshot file"):
        load_snapshot_file_backed(a[0], b[1], serial_sink=QUIET)
    vmm = spawn("mixed")
    assert_refused_pair(load_reply(vmm.client, a[0], b[1]), a[0], b[1])
    assert vmm.client.instance_info()["state"] == "Not started"  # no guest ran; the process is still fresh
    reply = load_reply(vmm.client, b[0], b[1])  # its own pair loads in that same process
    assert reply.status == 204, reply.body
    vmm.client.resume()
    reply, _ = vmm.client.invoke(b"after")
    workloads.verify_hello(b"after", reply, 3)


def test_the_image_builder_checks_the_pair_and_leaves_the_trailer_out(tmp_path):
    from tests.daemon_helpers import RunningDaemon
    state_path, mem_path = snapshot_guest(str(tmp_path), "workload=hello", mem_mib=MEM_MIB, invokes=1)
    other = tmp_path / "other"
    other.mkdir()
    _, other_mem = snapshot_guest(str(other), "workload=hello", mem_mib=MEM_MIB, invokes=2)
    # build_image from the path: guest memory only (the trailer is not a chunk of it)
    build_image(mem_path, tmp_path / "store", tmp_path / "vm.img", chunk_size=512 << 10)
    image = BaseImage.open(tmp_path / "vm.img")
    try:
        assert image.mem_size == MEM_MIB << 20
        assert b"".join(image.read_chunk(i) for i in range(image.nchunks)) == snapshot_memory(mem_path,
                                                                                              MEM_MIB << 20)
    finally:
        image.close()
    # snapd image build --state: the pair is checked, the snapshot id recorded
    cli = [sys.executable, "-m", "snapd.cli", "image", "build", "--quiet", "--store", str(tmp_path / "store")]
    r = subprocess.run([*cli, "--state", state_path, other_mem, "--out", str(tmp_path / "x.img")],
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 2 and "is not the memory file of snapshot file" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "x.img")
    r = subprocess.run([*cli, "--state", state_path, mem_path, "--out", str(tmp_path / "y.img")],
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    image = BaseImage.open(tmp_path / "y.img")
    assert image.header.source_id == read_snapshot(state_path).snapshot_id and image.mem_size == MEM_MIB << 20
    image.close()
    # POST /v1/images: 400 naming both files; nothing registered
    daemon = RunningDaemon(str(tmp_path / "state"), pool_size=1)
    try:
        reply = daemon.client.request("POST", "/v1/images", {"state_path": state_path, "mem_path": other_mem})
        message = reply.json()["fault_message"]
        assert reply.status == 400 and state_path in message and other_mem in message, message
        assert "is not the memory file of snapshot file" in message
        assert daemon.client.images() == []
        assert daemon.client.register_image(state_path, mem_path)["mem_size_mib"] == MEM_MIB
    finally:
        daemon.close()


# ------------------------------------------------------------------------------ the kill between the renames

@pytest.mark.skipif(shutil.which("strace") is None, reason="strace (syscall fault injection) is not installed")
def test_a_vmm_killed_between_the_two_renames_leaves_a_pair_that_is_refused(spawn, tmp_path):
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    first = spawn("first")
    started_hello(first.client, invokes=1)
    first.client.pause()
    first.client.create_snapshot(str(state), str(mem))
    old_state, old_id = state.read_bytes(), memory_id(mem)

    # The same snapshot again, to the same paths, by a VMM that strace kills (SIGKILL) at its second rename(2):
    # the memory file is renamed into place, the state file never is.
    sock = str(tmp_path / "killed.sock")
    log = tmp_path / "strace.log"
    process = subprocess.Popen(["strace", "-f", "-q", "-o", str(log), "-e", "trace=rename",
                                "-e", "inject=rename:error=EIO:signal=KILL:when=2",
                                sys.executable, "-B", "-m", "vmm.cli", "--api-sock", sock],  # -B: no .pyc renames
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    try:
        client = wait_for_socket(sock, 30, process)
        started_hello(client, invokes=2)
        client.pause()
        with pytest.raises(Exception):  # noqa: B017 (the connection drops: the process is gone)
            client.create_snapshot(str(state), str(mem))
        assert process.wait(30) != 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    renames = [line for line in log.read_text().splitlines() if "rename(" in line]
    assert len(renames) == 2 and "vm.mem" in renames[0] and "vm.state" in renames[1], renames
    assert state.read_bytes() == old_state  # the old state file ...
    assert memory_id(mem) != old_id  # ... beside the new memory file
    (leftover,) = temps(tmp_path)  # and the state file's temporary, which nothing will rename now
    assert leftover.startswith(".vm.state.tmp-")

    # That pair is refused before any guest runs, naming both files.
    loader = spawn("loader")
    assert_refused_pair(load_reply(loader.client, state, mem), state, mem)
    assert loader.client.instance_info()["state"] == "Not started"

    # The next snapshot into that directory removes the leftover of the killed VMM, and its pair loads.
    second = spawn("second")
    started_hello(second.client, invokes=3)
    second.client.pause()
    second.client.create_snapshot(str(tmp_path / "new.state"), str(tmp_path / "new.mem"))
    assert temps(tmp_path) == []
    assert load_reply(loader.client, tmp_path / "new.state", tmp_path / "new.mem").status == 204


def test_the_interleaving_of_a_crash_between_the_renames_is_refused_in_either_direction(tmp_path):
    """Without strace: the real writer stopped where the kill above stops it (memory published, state not), and
    the other order too (an old memory file beside a new state file): both pairs are refused."""
    state, mem = str(tmp_path / "vm.state"), str(tmp_path / "vm.mem")
    machine = paused_hello()
    try:
        create_snapshot(machine, state, mem)
        old_state, old_mem = open(state, "rb").read(), open(mem, "rb").read()
        machine.resume()
        machine.invoke(b"y")
        machine.pause()
        pair = AtomicPair(mem, state)  # what create_snapshot does, stopped after the first rename
        write_snapshot_files(machine.memory, capture_state(machine), pair.files[1], pair.files[0])
        pair.sync()
        pair.publish_first()
        pair.close()  # the process "dies": the state file's temporary stays
    finally:
        machine.close()
    assert open(state, "rb").read() == old_state and open(mem, "rb").read() != old_mem
    with pytest.raises(SnapshotError, match=f"memory file {mem} is not the memory file of snapshot file {state}"):
        load_snapshot_file_backed(state, mem, serial_sink=QUIET)
    (leftover,) = temps(tmp_path)
    os.rename(tmp_path / leftover, state)  # publish the new state: now it is the old memory that is missing
    with open(mem, "wb") as f:
        f.write(old_mem)
    with pytest.raises(SnapshotError, match="is not the memory file of snapshot file"):
        load_snapshot_file_backed(state, mem, serial_sink=QUIET)


# ------------------------------------------------------------------------------ paths

def test_one_file_for_both_paths_is_a_400_naming_both_and_writes_nothing(spawn, tmp_path):
    vmm = spawn("same")
    started_hello(vmm.client)
    vmm.client.pause()
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "sub", tmp_path / "link")
    (tmp_path / "existing").write_bytes(b"x")
    os.link(tmp_path / "existing", tmp_path / "hardlink")
    cases = [(tmp_path / "vm.snap", tmp_path / "vm.snap"),
             (tmp_path / "sub" / ".." / "vm.snap", tmp_path / "vm.snap"),
             (tmp_path / "link" / "vm.snap", tmp_path / "sub" / "vm.snap"),
             (tmp_path / "existing", tmp_path / "hardlink")]
    for snap, mem in cases:
        reply = vmm.client.request("PUT", "/snapshot/create", {"snapshot_path": str(snap), "mem_file_path": str(mem)})
        message = fault(reply)
        assert reply.status == 400 and str(snap) in message and str(mem) in message and "same file" in message
    assert sorted(os.listdir(tmp_path / "sub")) == [] and (tmp_path / "existing").read_bytes() == b"x"
    assert not os.path.exists(tmp_path / "vm.snap") and temps(tmp_path) == []


def test_a_snapshot_that_fails_on_its_state_path_leaves_no_memory_file(spawn, tmp_path):
    vmm = spawn("fails")
    started_hello(vmm.client)
    vmm.client.pause()
    mem = tmp_path / "vm.mem"
    (tmp_path / "a-directory").mkdir()
    for snap in (tmp_path / "missing-dir" / "vm.state", tmp_path / "a-directory"):
        reply = vmm.client.request("PUT", "/snapshot/create", {"snapshot_path": str(snap), "mem_file_path": str(mem)})
        message = fault(reply)
        assert reply.status == 400 and str(snap) in message, message
        assert not mem.exists() and temps(tmp_path) == [] and os.listdir(tmp_path / "a-directory") == []
    # over an existing pair: the failure leaves the old pair as it was, and it still loads
    vmm.client.create_snapshot(str(tmp_path / "vm.state"), str(mem))
    before = (tmp_path / "vm.state").read_bytes(), mem.read_bytes()
    reply = vmm.client.request("PUT", "/snapshot/create", {"snapshot_path": str(tmp_path / "a-directory"),
                                                           "mem_file_path": str(mem)})
    assert reply.status == 400
    assert ((tmp_path / "vm.state").read_bytes(), mem.read_bytes()) == before and temps(tmp_path) == []
    assert load_reply(spawn("loads").client, tmp_path / "vm.state", mem).status == 204


# ------------------------------------------------------------------------------ leftovers of a crash

WRITER = """
import sys, time
from snapd.atomic import atomic_file
with atomic_file(sys.argv[1]) as f:
    f.write(b"half a memory file")
    f.flush()
    print("writing", flush=True)
    time.sleep(600)
"""


def writer_in_progress(path) -> subprocess.Popen:
    """A process in the middle of an atomic write of ``path`` (its temporary file exists and is locked)."""
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                               env=subprocess_env())
    assert process.stdout.readline() == b"writing\n"
    return process


def test_the_next_snapshot_removes_what_killed_writers_left_and_nothing_a_live_one_holds(tmp_path):
    dead = writer_in_progress(tmp_path / "old.mem")
    dead.kill()  # kill -9 mid-write
    dead.wait()
    live = writer_in_progress(tmp_path / "busy.mem")
    try:
        (tmp_path / ".unrelated.tmp").write_bytes(b"not ours")  # not a temporary name of snapd.atomic
        (dead_temp,) = [n for n in temps(tmp_path) if n.startswith(f".old.mem.tmp-{dead.pid}-")]
        (live_temp,) = [n for n in temps(tmp_path) if n.startswith(f".busy.mem.tmp-{live.pid}-")]
        with atomic_file(tmp_path / "mine") as f:  # this process's own write in progress: held, so kept too
            f.write(b"x")
            assert remove_stale_temps(tmp_path) == [dead_temp]
            assert len(temps(tmp_path)) == 3  # the live writer's, this one's and the unrelated file
        machine = paused_hello()
        try:
            (tmp_path / "snaps").mkdir()
            dead2 = writer_in_progress(tmp_path / "snaps" / "x.state")
            dead2.kill()
            dead2.wait()
            create_snapshot(machine, str(tmp_path / "snaps" / "x.state"), str(tmp_path / "x.mem"))
        finally:
            machine.close()
        assert temps(tmp_path / "snaps") == []  # both directories of the snapshot are swept
        assert temps(tmp_path) == sorted([".unrelated.tmp", live_temp])
    finally:
        live.kill()
        live.wait()


def test_snapd_removes_unfinished_snapshot_files_beneath_its_snapshot_root_at_start(tmp_path):
    from tests.daemon_helpers import RunningDaemon
    state_dir = tmp_path / "state"
    nested = state_dir / "snapshots" / "team" / "fn"
    nested.mkdir(parents=True)
    (state_dir / "snapshots" / ".snapd-0123456789abcdef.tmp").write_bytes(b"x")
    (nested / ".snapd-fedcba9876543210.tmp").write_bytes(b"x")
    dead = writer_in_progress(nested / "c.state")
    dead.kill()
    dead.wait()
    (nested / "kept.state").write_bytes(b"a published file")
    daemon = RunningDaemon(str(state_dir), pool_size=1)
    try:
        left = [os.path.join(d, n) for d, _, names in os.walk(state_dir / "snapshots") for n in names]
        assert left == [str(nested / "kept.state")]
    finally:
        daemon.close()


# ------------------------------------------------------------------------------ older snapshots and Diffs

def test_an_older_format_snapshot_is_refused_naming_its_version(spawn, tmp_path):
    import msgpack
    state_path, mem_path = snapshot_guest(str(tmp_path), "workload=hello", mem_mib=MEM_MIB, invokes=1)
    state = read_snapshot(state_path)
    body = msgpack.unpackb(encode_state(state))
    del body["memory_file"]  # what format 1.0 wrote: no memory identity
    old_state = tmp_path / "old.state"
    old_state.write_bytes(pack_state_file(msgpack.packb(body, use_bin_type=True), (1, 0)))
    old_mem = tmp_path / "old.mem"  # and its memory file: guest memory, no trailer
    with open(mem_path, "rb") as src, open(old_mem, "wb") as dst:
        dst.write(src.read(MEM_MIB << 20))
    vmm = spawn("old")
    for snap, mem, words in ((old_state, old_mem, "format version 1.0 is older than this reader's major version 2"),
                             (old_state, mem_path, "take the snapshot again"),
                             (state_path, old_mem, "does not end with a memory identity trailer")):
        reply = load_reply(vmm.client, snap, mem)
        message = fault(reply)
        assert reply.status == 400 and words in message and str(snap) in message, message
    assert load_reply(vmm.client, state_path, mem_path).status == 204


def test_a_rebase_checks_both_memory_files_and_writes_a_new_pair(tmp_path):
    machine = paused_hello(track=True)
    try:
        paths = {name: (str(tmp_path / f"{name}.state"), str(tmp_path / f"{name}.mem"))
                 for name in ("base", "diff", "other", "full")}
        create_snapshot(machine, *paths["base"])
        machine.resume()
        machine.invoke(b"z")
        machine.pause()
        create_snapshot(machine, *paths["diff"], snapshot_type="Diff")
        create_snapshot(machine, *paths["full"])
    finally:
        machine.close()
    other = paused_hello()
    try:
        create_snapshot(other, *paths["other"])
    finally:
        other.close()
    out_state, out_mem = str(tmp_path / "r.state"), str(tmp_path / "r.mem")
    with pytest.raises(SnapshotError, match="is not the memory of snapshot"):  # another snapshot as the base
        rebase_snapshot(paths["other"][1], paths["diff"][0], paths["diff"][1], out_state, out_mem)
    with pytest.raises(SnapshotError, match="is not the memory file of snapshot file"):  # not the diff's memory
        rebase_snapshot(paths["base"][1], paths["diff"][0], paths["base"][1], out_state, out_mem)
    assert not os.path.exists(out_state) and not os.path.exists(out_mem) and temps(tmp_path) == []
    rebase_snapshot(paths["base"][1], paths["diff"][0], paths["diff"][1], out_state, out_mem)
    rebased = read_snapshot(out_state)
    assert rebased.memory_file.id != read_snapshot(paths["diff"][0]).memory_file.id == memory_id(paths["diff"][1]).hex()
    assert snapshot_memory(out_mem, MEM_MIB << 20) == snapshot_memory(paths["full"][1], MEM_MIB << 20)
    restored = load_snapshot_file_backed(out_state, out_mem, serial_sink=QUIET)
    try:
        workloads.verify_hello(b"rebased", restored.invoke(b"rebased"), 3)
    finally:
        restored.close()


def test_snapd_puts_a_clone_snapshot_in_place_only_if_its_two_files_are_one_pair(tmp_path):
    """What a clone's worker wrote is checked before the daemon links it into place (snapd.daemon.paths)."""
    from snapd.daemon.errors import CloneFailed
    from snapd.daemon.paths import ApiPaths
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = snapshot_guest(str(tmp_path / "a"), "workload=hello", mem_mib=MEM_MIB, invokes=1)
    b = snapshot_guest(str(tmp_path / "b"), "workload=hello", mem_mib=MEM_MIB, invokes=2)
    paths = ApiPaths(str(tmp_path / "state"))
    snapshots = tmp_path / "state" / "snapshots"

    def written(state_path, mem_path):
        files = paths.snapshot_files("c.state", "c.mem")
        for fd, source in zip(files.fds, (state_path, mem_path)):
            with open(source, "rb") as src, os.fdopen(fd, "wb", closefd=False) as dst:
                shutil.copyfileobj(src, dst)
        return files

    try:
        files = written(a[0], b[1])
        try:
            with pytest.raises(CloneFailed, match="not one snapshot"):
                files.commit()
        finally:
            files.close()
        assert os.listdir(snapshots) == []
        files = written(a[0], a[1])
        try:
            files.commit()
        finally:
            files.close()
        assert sorted(os.listdir(snapshots)) == ["c.mem", "c.state"]
        assert read_snapshot(str(snapshots / "c.state")).memory_file.id == memory_id(snapshots / "c.mem").hex()
    finally:
        paths.close()
