"""The page server against real userfaultfd: every page compared with the snapshot, lazy and eager,
all codecs and several chunk sizes; corrupt/missing data never installed; VMM and server deaths."""
import os
import subprocess
import sys
import threading
import time

import pytest

from bench.fault_service import GuestMemory, synthetic_memory, write_image
from snapd import uffd_handshake as hs
from snapd.pageserver import CODEC_LZ4, CODEC_RAW, CODEC_ZERO, CODEC_ZSTD, ChunkRef, PageServer
from tests.conftest import subprocess_env

PAGE = 4096


@pytest.fixture
def server():
    with PageServer() as s:
        yield s


@pytest.fixture
def guests():
    made = []

    def make(size, **kw):
        made.append(GuestMemory(size, **kw))
        return made[-1]
    yield make
    for g in made:
        g.close()


def assert_pages_equal(actual: bytes, expected: bytes):
    assert len(actual) == len(expected)
    bad = [i for i in range(0, len(expected), PAGE) if actual[i:i + PAGE] != expected[i:i + PAGE]]
    assert not bad, f"{len(bad)} pages differ, first at offset {bad[0]:#x}"


def page_present(addr: int) -> bool:
    """/proc/self/pagemap bit 63: the page is mapped (root sees it)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        return bool(int.from_bytes(f.read(8), "little") >> 63)


@pytest.mark.parametrize("mode", ["lazy", "eager"])
@pytest.mark.parametrize("chunk_size", [4 << 10, 64 << 10, 2 << 20])
def test_guest_sees_exactly_the_snapshot(server, guests, tmp_path, mode, chunk_size):
    mem = max(1 << 20, 3 * chunk_size) + 3 * chunk_size // 2  # last chunk short
    mem -= mem % PAGE
    data = synthetic_memory(mem, chunk_size)
    table = write_image(str(tmp_path), data, chunk_size)
    assert {c.codec for c in table.chunks} == {CODEC_ZERO, CODEC_RAW, CODEC_LZ4, CODEC_ZSTD}
    sock = str(tmp_path / "s.sock")
    listener = server.serve(sock, server.add_image(table), mode)
    g = guests(mem)
    g.connect(sock).wait_ready(10)
    vm = listener.wait_for_vms(1)[0]
    if mode == "eager":
        st = server.stats(vm)
        assert not st.eager_pending and st.chunks_installed == len(table.chunks) and st.faults == 0
    assert_pages_equal(g.read(), data)
    time.sleep(0.01)  # the loop counts a fault just after waking the faulting thread
    st = server.stats(vm)
    assert st.state == "active" and st.errors == 0
    if mode == "eager":
        assert st.faults == 0  # everything was in place before ready
    else:
        assert 0 < st.faults <= len(table.chunks) and sum(c for _, _, c in st.histogram) == st.faults


def test_regions_with_offsets_not_chunk_aligned(server, guests, tmp_path):
    """Two regions mapping parts of the image at offsets inside chunks: installs are clipped."""
    cs = 64 << 10
    data = synthetic_memory(1 << 20, cs)
    sock = str(tmp_path / "s.sock")
    server.serve(sock, server.add_image(write_image(str(tmp_path), data, cs)))
    a, b = guests(5 * PAGE), guests(40 * PAGE)
    a_off, b_off = 3 * PAGE, 100 * PAGE + 7 * PAGE
    a.register()
    a.connect(sock, [(a.addr, a.size, a_off)]).wait_ready(5)
    b.connect(sock, [(b.addr, b.size, b_off)]).wait_ready(5)
    assert_pages_equal(b.read(), data[b_off:b_off + b.size])
    assert_pages_equal(a.read(), data[a_off:a_off + a.size])


def test_two_regions_one_uffd(server, guests, tmp_path):
    cs = 16 << 10
    data = synthetic_memory(512 << 10, cs)
    sock = str(tmp_path / "s.sock")
    server.serve(sock, server.add_image(write_image(str(tmp_path), data, cs)), "eager")
    g = guests(len(data))
    half = len(data) // 2
    g.connect(sock, [(g.addr, half, 0), (g.addr + half, half, half)]).wait_ready(5)
    assert_pages_equal(g.read(), data)


def corrupt_table(table, index):
    """Flip the stored checksum of chunk `index` (the bytes no longer match it)."""
    c = table.chunks[index]
    table.chunks[index] = c._replace(checksum=c.checksum ^ 1)
    return table


def test_corrupt_chunk_is_never_installed_and_other_vms_continue(server, guests, tmp_path):
    cs = 64 << 10
    data = synthetic_memory(1 << 20, cs)
    table = write_image(str(tmp_path), data, cs, name="img-corrupt")
    bad = 5
    assert table.chunks[bad].codec != CODEC_ZERO
    sock = str(tmp_path / "s.sock")
    listener = server.serve(sock, server.add_image(corrupt_table(table, bad)))
    victim, other = guests(len(data)), guests(len(data))
    victim_msgs = victim.connect(sock)
    victim_msgs.wait_ready(5)
    other.connect(sock).wait_ready(5)

    toucher = threading.Thread(target=victim.touch, args=(bad * cs, PAGE), daemon=True)
    toucher.start()
    with pytest.raises(hs.PageServerError, match=r"image img-corrupt chunk 5: checksum mismatch"):
        victim_msgs.wait_ready(5)
    toucher.join(0.2)
    assert toucher.is_alive(), "the faulting thread must stay blocked: nothing may be installed"
    assert not any(page_present(victim.addr + bad * cs + p) for p in range(0, cs, PAGE))

    # The other VM is served everything but the bad chunk.
    assert_pages_equal(other.read(0, bad * cs), data[:bad * cs])
    assert_pages_equal(other.read((bad + 1) * cs), data[(bad + 1) * cs:])
    stats = {vm: server.stats(vm) for vm in listener.wait_for_vms(2)}
    assert sorted(s.state for s in stats.values()) == ["active", "failed"]

    victim.unregister()  # wakes the blocked thread (it then faults in a plain zero page)
    toucher.join(5)
    assert not toucher.is_alive()
    assert victim.read(bad * cs, PAGE) == bytes(PAGE)


@pytest.mark.parametrize("damage", ["missing pack", "truncated pack", "bad zstd frame"])
def test_unreadable_chunk_reports_error(server, guests, tmp_path, damage):
    cs = 16 << 10
    data = synthetic_memory(256 << 10, cs, zero_every=0)
    table = write_image(str(tmp_path), data, cs, codecs=(CODEC_ZSTD,), name="img-dmg", npacks=1)
    pack = table.chunks[0].pack_path
    if damage == "missing pack":
        os.unlink(pack)
        expect = "No such file"
    elif damage == "truncated pack":
        os.truncate(pack, table.chunks[-1].offset + 3)
        expect = "ends at"
    else:  # a frame whose checksum matches its garbage: caught by the decoder
        import xxhash
        junk = b"\x28\xb5\x2f\xfd" + b"junk" * 20
        with open(pack, "ab") as f:
            off = f.tell()
            f.write(junk)
        table.chunks[-1] = ChunkRef(pack, off, len(junk), CODEC_ZSTD, xxhash.xxh3_64_intdigest(junk))
        expect = "zstd frame"
    sock = str(tmp_path / "s.sock")
    server.serve(sock, server.add_image(table))
    g = guests(len(data))
    msgs = g.connect(sock)
    msgs.wait_ready(5)
    last = len(table.chunks) - 1
    t = threading.Thread(target=g.touch, args=(last * cs, PAGE), daemon=True)
    t.start()
    with pytest.raises(hs.PageServerError, match=f"image img-dmg chunk {last}: .*{expect}"):
        msgs.wait_ready(5)
    g.unregister()
    t.join(5)
    assert not t.is_alive()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_vmm_disconnect_releases_uffd(server, tmp_path):
    cs = 64 << 10
    data = synthetic_memory(512 << 10, cs)
    sock = str(tmp_path / "s.sock")
    listener = server.serve(sock, server.add_image(write_image(str(tmp_path), data, cs)))
    g = GuestMemory(len(data))
    g.connect(sock).wait_ready(5)
    assert_pages_equal(g.read(), data)
    assert server.live_vms() == 1
    baseline = open_fds()
    g.sock.close()  # the VMM goes away
    g.sock = None
    deadline = time.monotonic() + 5
    while server.live_vms() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.live_vms() == 0
    assert server.stats(listener.wait_for_vms(1)[0]).state == "closed"
    assert open_fds() <= baseline - 2  # the server closed its uffd and its end of the socket... and ours
    g.close()


def test_server_death_is_seen_by_vmm_quickly(tmp_path):
    cs = 64 << 10
    data = synthetic_memory(512 << 10, cs)
    table = write_image(str(tmp_path), data, cs)
    table_path = tmp_path / "table.json"
    import json
    table_path.write_text(json.dumps(table.to_json()))
    sock = str(tmp_path / "srv.sock")
    proc = subprocess.Popen([sys.executable, "-m", "snapd.pageserver", "--socket", sock,
                             "--chunk-table", str(table_path)], env=subprocess_env(), stdout=subprocess.PIPE)
    g = GuestMemory(len(data))
    try:
        assert b"serving" in proc.stdout.readline()
        msgs = g.connect(sock)
        msgs.wait_ready(5)
        assert_pages_equal(g.read(0, 4 * cs), data[:4 * cs])  # served by the subprocess
        proc.kill()
        t0 = time.monotonic()
        with pytest.raises(hs.PageServerDied):
            msgs.read(timeout=5)
        assert time.monotonic() - t0 < 1.0
    finally:
        proc.kill()
        proc.wait()
        g.close()


def test_handshake_accepts_firecracker_page_size_kib():
    regions = hs.parse_regions([{"base_host_virt_addr": 4096, "size": 8192, "offset": 0, "page_size_kib": 4}])
    assert regions == [hs.Region(4096, 8192, 0, 4096)]
    with pytest.raises(hs.HandshakeError):
        hs.parse_regions([{"size": 1}])


def test_bad_handshake_is_rejected_and_listener_keeps_serving(server, guests, tmp_path):
    import socket as socket_mod
    cs = 64 << 10
    data = synthetic_memory(256 << 10, cs)
    sock = str(tmp_path / "s.sock")
    listener = server.serve(sock, server.add_image(write_image(str(tmp_path), data, cs)))
    s = socket_mod.socket(socket_mod.AF_UNIX)
    s.connect(sock)
    s.sendall(b'[{"size": 1}]')  # no fd, no address
    with pytest.raises(hs.PageServerError, match="handshake rejected"):
        hs.ServerMessages(s).wait_ready(5)
    s.close()
    g = guests(len(data))
    g.connect(sock).wait_ready(5)
    assert_pages_equal(g.read(), data)
    assert len(listener.errors) == 1


def test_kernel_mode_faults_are_served(server, guests, tmp_path):
    """The kernel reading guest memory (as KVM does) faults in kernel mode: the uffd must not be
    UFFD_USER_MODE_ONLY. Here write(2) copies the unfetched memory into a pipe."""
    import ctypes
    cs = 64 << 10
    data = synthetic_memory(256 << 10, cs)
    sock = str(tmp_path / "s.sock")
    server.serve(sock, server.add_image(write_image(str(tmp_path), data, cs)))
    g = guests(len(data))
    g.connect(sock).wait_ready(5)
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        view = (ctypes.c_char * cs).from_address(g.addr + cs)
        assert os.write(w, view) == cs  # pipe capacity is 64 KiB
        assert os.read(r, cs) == data[cs:2 * cs]
    finally:
        os.close(r)
        os.close(w)


def test_attach_refuses_a_region_out_of_range_and_closes_the_uffd(server, tmp_path):
    """An in-process caller's bad region is a ValueError (it was cffi's OverflowError), and the uffd it handed
    over is closed, not leaked."""
    from snapd.uffd import create
    image = server.add_image(write_image(str(tmp_path), synthetic_memory(1 << 20, 1 << 16), 1 << 16))
    fd = create()
    with pytest.raises(ValueError, match="region 0"):
        server.attach(image, fd, None, [(-4096, 4096, 0)])
    with pytest.raises(OSError):
        os.fstat(fd)
