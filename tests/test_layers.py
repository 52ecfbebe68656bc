"""Diff snapshots as image layers, against real KVM: a layer over its base restores (stacked) to exactly the
memory of a Full snapshot taken at the same moment; squash equals the stack; a missing or altered base is
refused."""
import os
import shutil

import pytest

from snapd.cli import main as cli_main
from snapd.image.builder import build_image
from snapd.image.errors import LayerParentMismatch, LayerParentMissing
from snapd.image.index import CODEC_PARENT
from snapd.image.reader import BaseImage
from snapd.pageserver import ChunkTable, PageServer
from tests.conftest import requires_kvm
from tests.vm_helpers import QUIET, assert_memory_equals_snapshot
from vmm import workloads
from vmm.config import MachineConfig
from vmm.machine import Microvm
from vmm.snapshot import create_snapshot, load_snapshot_uffd_backed, read_snapshot

pytestmark = requires_kvm
KV_MIB = 4
MEM_MIB = 64
CHUNK = 64 << 10


@pytest.fixture(scope="module")
def snaps(tmp_path_factory):
    """base (Full), then invocations and VMM writes, then a Diff and a Full of the same moment; base image."""
    tmp = tmp_path_factory.mktemp("layers")
    machine = Microvm(MachineConfig(mem_size_mib=MEM_MIB, boot_args=f"workload=kv kv_mib={KV_MIB}",
                                    track_dirty_pages=True), serial_sink=QUIET)
    try:
        machine.boot()
        machine.wait_ready(10)
        machine.pause()
        create_snapshot(machine, str(tmp / "base.state"), str(tmp / "base.mem"))
        machine.resume()
        for seed in (1, 2):
            request = workloads.kv_request(100, seed)
            workloads.verify_kv(1, KV_MIB, request, machine.invoke(request))
        machine.pause()
        # Pages changed by the VMM: partial chunks, a run across a chunk edge, a zeroed page, the last page.
        gpa_of = lambda off: off  # noqa: E731  one region at guest address 0 = file offset 0
        machine.memory.write(gpa_of(3 * CHUNK + 4096), b"\xa5" * 4096)
        machine.memory.write(gpa_of(10 * CHUNK - 4096), os.urandom(3 * 4096))
        machine.memory.write(gpa_of(2 * 1024 * 1024 + 8192), bytes(4096))
        machine.memory.write(gpa_of((MEM_MIB << 20) - 4096), b"end!" * 1024)
        create_snapshot(machine, str(tmp / "diff.state"), str(tmp / "diff.mem"), snapshot_type="Diff")
        create_snapshot(machine, str(tmp / "now.state"), str(tmp / "now.mem"))
    finally:
        machine.close()
    base_id = read_snapshot(str(tmp / "base.state")).snapshot_id
    build_image(str(tmp / "base.mem"), str(tmp / "store"), str(tmp / "base.img"), chunk_size=CHUNK,
                source_id=base_id)
    build_image(str(tmp / "now.mem"), str(tmp / "store"), str(tmp / "now.img"), chunk_size=CHUNK)
    assert cli_main(["image", "build", "--parent", str(tmp / "base.img"), str(tmp / "diff.state"),
                     str(tmp / "diff.mem"), "--out", str(tmp / "diff.img"), "--store", str(tmp / "store"),
                     "--quiet"]) == 0
    return tmp


def test_layer_stores_only_changed_chunks_and_composes_to_the_full_image(snaps):
    layer, now = BaseImage.open(str(snaps / "diff.img")), BaseImage.open(str(snaps / "now.img"))
    try:
        own = [i for i in range(layer.nchunks) if layer.entry(i).codec != CODEC_PARENT]
        assert 0 < len(own) < layer.nchunks // 4
        assert {3, 9, (MEM_MIB << 20) // CHUNK - 1} <= set(own)
        assert layer.header.content_id == now.header.content_id  # same memory, same identity
        for i in range(layer.nchunks):
            assert layer.read_chunk(i, check_hash=True) == now.read_chunk(i), f"chunk {i}"
    finally:
        layer.close()
        now.close()


def test_stacked_restore_equals_the_full_snapshot_page_for_page(snaps):
    with PageServer() as server:
        image = server.add_image(ChunkTable.from_base_image(str(snaps / "diff.img")))
        listener = server.serve(str(snaps / "stack.sock"), image, "lazy")
        machine = load_snapshot_uffd_backed(str(snaps / "diff.state"), listener.sock_path, resume=False,
                                            serial_sink=QUIET, layered=True)
        try:
            assert_memory_equals_snapshot(machine, str(snaps / "now.mem"))
            machine.resume()
            request = workloads.kv_request(500, 11)
            workloads.verify_kv(1, KV_MIB, request, machine.invoke(request))
        finally:
            machine.close()


def test_squash_equals_the_stack(snaps, tmp_path):
    out = tmp_path / "squashed.img"
    assert cli_main(["image", "squash", str(snaps / "diff.img"), "--out", str(out),
                     "--store", str(tmp_path / "store2")]) == 0
    squashed, layer = BaseImage.open(str(out)), BaseImage.open(str(snaps / "diff.img"))
    try:
        assert squashed.parent is None and squashed.header.version == (1, 0)
        assert squashed.header.content_id == layer.header.content_id
        for i in range(layer.nchunks):
            assert squashed.read_chunk(i, check_hash=True) == layer.read_chunk(i), f"chunk {i}"
    finally:
        squashed.close()
        layer.close()
    assert cli_main(["image", "verify", str(out)]) == 0


def test_missing_or_altered_base_is_refused(snaps, tmp_path, capsys):
    for name in ("base.img", "diff.img", "base.mem", "now.mem"):
        shutil.copy(snaps / name, tmp_path / name)
    os.symlink(snaps / "store", tmp_path / "store")
    layer = str(tmp_path / "diff.img")
    os.rename(tmp_path / "base.img", tmp_path / "gone.img")
    with pytest.raises(LayerParentMissing, match="missing"):
        ChunkTable.from_base_image(layer)
    # Same path, other content: an image of another snapshot's memory.
    build_image(str(tmp_path / "now.mem"), str(tmp_path / "store"), str(tmp_path / "base.img"), chunk_size=CHUNK)
    with pytest.raises(LayerParentMismatch, match="altered or replaced"):
        BaseImage.open(layer)
    assert cli_main(["image", "inspect", layer]) == 1
    assert "altered or replaced" in capsys.readouterr().err
    # A layer cannot be built over the wrong base either (the base records another snapshot id).
    build_image(str(tmp_path / "now.mem"), str(tmp_path / "store"), str(tmp_path / "other.img"), chunk_size=CHUNK,
                source_id="not-the-parent")
    assert cli_main(["image", "build", "--parent", str(tmp_path / "other.img"), str(snaps / "diff.state"),
                     str(snaps / "diff.mem"), "--out", str(tmp_path / "x.img"), "--quiet"]) == 1
    assert "the diff's parent is snapshot" in capsys.readouterr().err
