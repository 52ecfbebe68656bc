import json
import os
import random
import subprocess
import sys

import pytest

from tests.conftest import subprocess_env



def snapd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "snapd.cli", *map(str, args)], capture_output=True,
                          text=True, env=subprocess_env(), cwd=cwd, timeout=60)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rnd = random.Random(5)
    block = rnd.randbytes(65536)
    (d / "vm.mem").write_bytes(block + bytes(65536) * 2 + block + (b"text " * 13108)[:65536])
    r = snapd("image", "build", d / "vm.mem", "--store", d / "store", "--out", d / "vm.img",
              "--chunk-size", "64K", "--codec", "zstd", "--level", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    return d, r


def test_build_reports_counts(built):
    d, r = built
    assert "5 chunks, 2 zero, 1 already stored, 2 new" in r.stdout
    assert (d / "vm.img").exists()


def test_inspect_json(built):
    d, _ = built
    r = snapd("image", "inspect", d / "vm.img", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["nchunks"] == 5 and info["chunk_size"] == 65536 and info["mem_size"] == 5 * 65536
    assert info["zero_fraction"] == 0.4 and info["duplicate_fraction"] == 0.2
    assert info["codec"] == "zstd" and info["ratio"] > 2


def test_inspect_text(built):
    d, _ = built
    r = snapd("image", "inspect", d / "vm.img")
    assert r.returncode == 0 and "zero_fraction" in r.stdout and "0.4" in r.stdout


def test_verify_ok_then_corrupt(built, tmp_path):
    d, _ = built
    r = snapd("image", "verify", d / "vm.img")
    assert r.returncode == 0 and "OK (5 chunks)" in r.stdout
    pack = d / "store" / "packs" / "00000001.pack"
    saved = pack.read_bytes()
    try:
        with open(pack, "r+b") as f:
            f.seek(len(saved) - 10)
            f.write(b"XXXXXXXXXX")
        r = snapd("image", "verify", d / "vm.img")
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("snapd: error: verify failed:") and "chunk 4" in lines[0]
        assert "Traceback" not in r.stderr
    finally:
        pack.write_bytes(saved)


@pytest.mark.parametrize("args, needle", [
    (["image", "inspect", "/nonexistent.img"], "image index not found"),
    (["image", "verify", "/nonexistent.img"], "image index not found"),
    (["image", "build", "/nonexistent.mem"], "no such file"),
    (["image", "build", "{mem}", "--chunk-size", "3000", "--out", "{tmp}/x.img"], "power of two"),
    (["image", "build", "{mem}", "--chunk-size", "lots"], "not a size"),
    (["image", "inspect", "{mem}"], "not an image index"),
    (["image"], "required"),
])
def test_user_errors_are_one_line_exit_2(built, tmp_path, args, needle):
    d, _ = built
    args = [a.format(mem=d / "vm.mem", tmp=tmp_path) for a in args]
    r = snapd(*args)
    assert "Traceback" not in r.stderr
    assert needle in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("snapd: error:")
    assert r.returncode in (1, 2) and (r.returncode == 2 or "not an image index" in needle)


def test_default_output_and_store_paths(tmp_path):
    (tmp_path / "m.mem").write_bytes(os.urandom(8192))
    r = snapd("image", "build", "m.mem", "--chunk-size", "4K", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.mem.img").exists() and (tmp_path / "chunks" / "packs").is_dir()
    assert snapd("image", "verify", "m.mem.img", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("args, env, message", [
    (["--tcp-port", "70000"], {}, "argument --tcp-port: invalid port (1-65535) value: '70000'"),
    (["--pool-size", "0"], {}, "argument --pool-size: invalid whole number >= 1 value: '0'"),
    ([], {"SNAPD_PREPARED": "x"}, "SNAPD_PREPARED must be a whole number >= 0, not 'x'"),
])
def test_snapd_serve_refuses_bad_settings_with_a_message_not_a_traceback(tmp_path, args, env, message):
    r = subprocess.run([sys.executable, "-m", "snapd.cli", "serve", "--state-dir", str(tmp_path), *args],
                       capture_output=True, text=True, env=dict(subprocess_env(), **env), timeout=60)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "run" / "procs") or not os.listdir(tmp_path / "run" / "procs"), \
        "a refused start left a process record (a zygote) behind"
