"""Remake the seed corpora of the fuzz suite (tests/fuzz/corpus/) from the real writers.

    .venv/bin/python -m tests.fuzz.make_corpus        # needs /dev/kvm and the built guest; a few seconds

Everything here is made by the code that makes it in production, so the fuzzers start from inputs the readers
must accept and mutate them from there:

- ``state/``: a Full and a Diff snapshot of the built-in guest (``snapshot_builtin_guest``'s machine, 16 MiB, dirty
  tracking on); the state files themselves, and ``*.trailer``, the last 4 KiB of each memory file (its identity
  trailer: the memory files are 16 MiB, too big to keep, and the trailer is all a load reads of them).
- ``image/``: ``build_image`` of the Full snapshot's memory (128 KiB lz4 chunks, and 512 KiB zstd chunks) into one
  chunk store, and ``snapd image build --parent`` of the Diff over the lz4 image (a diff layer).
- ``loadset/``: the loading set a page server recorded (``serve(record=True)``) while the Full snapshot was restored
  from ``base.img`` and answered one invocation.
- ``wire/``: the bytes a VMM sends a page server in its handshake (``send_uffd`` of the restored VM's regions) and
  the messages the page server (its C loop, and the listener's refusal) sends back.
- ``api/``: request bodies as the clients (``vmm.api.client``, ``snapd.client``) send them, one per object spec.

Deterministic in shape (sizes, layouts), not in bytes (snapshot ids are random): a remade corpus differs, and
every test reads whatever is there.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
MEM_MIB = 16
BASE_CHUNK = 128 << 10

# Bodies as the clients send them (vmm/api/client.py, snapd/client.py, docs/api.md), keyed by the spec's module
# and name; each must pass parse_body.
API_BODIES = {
    "vmm.api.fields:MACHINE_CONFIG": {"vcpu_count": 1, "mem_size_mib": 256, "smt": False, "track_dirty_pages": True},
    "vmm.api.fields:MACHINE_CONFIG_PATCH": {"mem_size_mib": 512},
    "vmm.api.fields:BOOT_SOURCE": {"kernel_image_path": "/srv/vmlinux", "boot_args": "console=ttyS0 reboot=k"},
    "vmm.api.fields:INSTANCE_ACTION": {"action_type": "InstanceStart"},
    "vmm.api.fields:VM_STATE": {"state": "Paused"},
    "vmm.api.fields:INVOKE": {"payload": "aGVsbG8=", "timeout_ms": 1000},
    "vmm.api.fields:INVOCATION_WAIT": {"timeout_ms": 500},
    "vmm.api.fields:SNAPSHOT_CREATE": {"snapshot_type": "Full", "snapshot_path": "vm.state",
                                       "mem_file_path": "vm.mem"},
    "vmm.api.fields:SNAPSHOT_LOAD": {"snapshot_path": "vm.state",
                                     "mem_backend": {"backend_type": "Uffd", "backend_path": "/tmp/ps.sock"},
                                     "track_dirty_pages": False, "resume_vm": True, "network_overrides": [],
                                     "clock_realtime": False},
    "vmm.api.fields:MEMORY_BACKEND": {"backend_type": "File", "backend_path": "vm.mem"},
    "vmm.api.fields:NETWORK_OVERRIDE": {"iface_id": "eth0", "host_dev_name": "tap0"},
    "vmm.api.fields:VSOCK_OVERRIDE": {"uds_path": "/tmp/v.sock"},
    "snapd.daemon.http:IMAGE_REGISTER": {"state_path": "/srv/vm.state", "mem_path": "/srv/vm.mem",
                                         "chunk_size": 524288, "codec": "lz4"},
    "snapd.daemon.http:LOADING_SET": {"path": "/srv/vm.img.loadset"},
    "snapd.daemon.http:CLONES_CREATE": {"image": "img-eca0ef592241", "count": 2, "payload": "cmVxdWVzdA==",
                                        "timeout_ms": 1000},
    "snapd.daemon.http:INVOKE": {"payload": "cmVxdWVzdA==", "timeout_ms": 1000},
    "snapd.daemon.http:SNAPSHOT": {"state_path": "/srv/c.state", "mem_path": "/srv/c.mem"},
}


def _put(rel: str, data: bytes) -> None:
    path = os.path.join(CORPUS, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _snapshots(tmp: str) -> None:
    from vmm.config import MachineConfig
    from vmm.machine import Microvm
    from vmm.snapshot import create_snapshot
    machine = Microvm(MachineConfig(mem_size_mib=MEM_MIB, boot_args="workload=hello", track_dirty_pages=True),
                      serial_sink=lambda data: None)
    try:
        machine.boot()
        machine.wait_ready(30)
        machine.pause()
        create_snapshot(machine, f"{tmp}/full.state", f"{tmp}/full.mem")
        machine.resume()
        machine.pause()
        # Pages the VMM changes: one inside a chunk, a run across a chunk edge, the last page.
        machine.memory.write(3 * BASE_CHUNK + 4096, b"\xa5" * 4096)
        machine.memory.write(5 * BASE_CHUNK - 4096, os.urandom(2 * 4096))
        machine.memory.write((MEM_MIB << 20) - 4096, b"end!" * 1024)
        create_snapshot(machine, f"{tmp}/diff.state", f"{tmp}/diff.mem", snapshot_type="Diff")
    finally:
        machine.close()
    for name in ("full", "diff"):
        with open(f"{tmp}/{name}.state", "rb") as f:
            _put(f"state/{name}.state", f.read())
        with open(f"{tmp}/{name}.mem", "rb") as f:
            f.seek(-4096, os.SEEK_END)
            _put(f"state/{name}.trailer", f.read())


def _images(tmp: str) -> None:
    from snapd.cli import main as snapd_main
    from snapd.image.builder import build_image
    from vmm.snapshot import read_snapshot
    image = os.path.join(CORPUS, "image")
    shutil.rmtree(image, ignore_errors=True)
    os.makedirs(image)
    store = os.path.join(image, "store")
    build_image(f"{tmp}/full.mem", store, f"{image}/base.img", chunk_size=BASE_CHUNK, codec="lz4",
                source_id=read_snapshot(f"{tmp}/full.state").snapshot_id)
    build_image(f"{tmp}/full.mem", store, f"{image}/zstd.img", chunk_size=512 << 10, codec="zstd")
    rc = snapd_main(["image", "build", "--parent", f"{image}/base.img", f"{tmp}/diff.state", f"{tmp}/diff.mem",
                     "--out", f"{image}/layer.img", "--store", store, "--quiet"])
    assert rc == 0, "snapd image build --parent failed"
    os.unlink(os.path.join(store, "lock"))  # a store's lock file is empty and made on open


def _restore(tmp: str) -> None:
    """Restore the Full snapshot from base.img through a recording page server: the loading set it records, and
    the handshake and messages on a wire we read (a socketpair in front of the real C loop)."""
    from snapd import uffd_handshake as hs
    from snapd.pageserver import ChunkTable, PageServer
    from vmm import snapshot
    image = os.path.join(CORPUS, "image", "base.img")
    sent = {}
    real_send_uffd = hs.send_uffd

    def recording_send_uffd(server, uffd_fd, regions, timeout=5.0):
        sock = real_send_uffd(server, uffd_fd, regions, timeout)
        sent["regions"] = json.dumps([r.to_json() if isinstance(r, hs.Region) else r for r in regions]).encode()
        return sock

    with PageServer() as server:
        img = server.add_image(ChunkTable.from_base_image(image))
        listener = server.serve(f"{tmp}/rec.sock", img, "lazy", record=True)
        import vmm.uffd_backend as backend
        backend.send_uffd = recording_send_uffd  # the backend imported it by name
        try:
            machine = snapshot.load_snapshot_uffd_backed(f"{tmp}/full.state", listener.sock_path,
                                                         serial_sink=lambda data: None)
        finally:
            backend.send_uffd = real_send_uffd
        try:
            reply = machine.invoke(b"fuzz corpus")
            assert reply, "the restored guest did not answer"
            machine.pause()
            vm = listener.wait_for_vms(1)[0]
            loading_set = server.stop_recording(vm)
        finally:
            machine.close()
        # The C loop's own messages, read on a socketpair it was attached with (a second VM on the same image).
        from snapd.uffd import create_registered_uffd
        from vmm.memory import GuestMemory
        from vmm.snapshot import read_snapshot, region_layouts
        state = read_snapshot(f"{tmp}/full.state")
        memory = GuestMemory.anonymous(0, region_layouts(state))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            uffd = create_registered_uffd([(r.host_addr, r.size) for r in memory.regions], "missing")
            regions = [hs.Region(r.host_addr, r.size, r.layout.file_offset) for r in memory.regions]
            server.attach(img, uffd, theirs, regions, "lazy")
            messages = hs.ServerMessages(ours)
            ready = []
            while not ready:
                ready = messages.read(timeout=5)
            _put("wire/ready.jsonl", b"".join(json.dumps(m).encode() + b"\n" for m in ready))
        finally:
            ours.close()
            memory.close()
    os.makedirs(os.path.join(CORPUS, "loadset"), exist_ok=True)
    loading_set.save(os.path.join(CORPUS, "loadset", "base.img.loadset"))
    _put("wire/handshake.json", sent["regions"])
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:  # the listener's refusal and a chunk error, as the server words them
        hs.send_message(a, {"error": "handshake rejected: page size 65536 not supported (only 4096)"})
        hs.send_message(a, {"error": "image base.img chunk 5: checksum mismatch"})
        _put("wire/errors.jsonl", b.recv(65536))


def _api() -> None:
    import importlib
    shutil.rmtree(os.path.join(CORPUS, "api"), ignore_errors=True)
    from vmm.api.fields import parse_body
    for key, body in API_BODIES.items():
        module, name = key.split(":")
        data = json.dumps(body).encode()
        parse_body(data, getattr(importlib.import_module(module), name))  # valid as sent
        _put(f"api/{module.rsplit('.', 1)[-1]}.{name}.json", data)


def main() -> int:
    os.makedirs(CORPUS, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fuzz-corpus-") as tmp:
        _snapshots(tmp)
        _images(tmp)
        _restore(tmp)
    _api()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(CORPUS) for f in fs)
    print(f"{CORPUS}: {sum(len(fs) for _, _, fs in os.walk(CORPUS))} files, {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
