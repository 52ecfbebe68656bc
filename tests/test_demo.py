"""`snapd demo` (what `make demo` runs): the whole path on the built-in guest, and its refusals."""
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import requires_kvm, subprocess_env


def demo(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snapd.cli", "demo", *map(str, args)], capture_output=True,
                          text=True, env=subprocess_env(), timeout=timeout)


@requires_kvm
def test_the_demo_restores_verified_distinct_clones_and_leaves_nothing_behind():
    r = demo("--mem-mib", 64, "--clones", 3)
    assert r.returncode == 0, r.stdout + r.stderr
    work = re.search(r"work directory (\S+)\)", r.stdout).group(1)
    daemon_pid = int(re.search(r"started `snapd serve` \(pid (\d+)", r.stdout).group(1))
    rows = re.findall(r"^   (c-\S+) +(\d+) .* hello #1 generation=([0-9a-f]{16}) random=([0-9a-f]{16})$",
                      r.stdout, re.M)
    assert len(rows) == 3, r.stdout
    assert len({row[2] for row in rows}) == 3 and len({row[3] for row in rows}) == 3, \
        "each clone must get its own generation and entropy"
    assert "3 verified replies (hello #2), 3 distinct generations" in r.stdout
    assert re.search(r"per clone [\d.]+ (MiB|KiB) proportional set size", r.stdout), r.stdout
    assert not os.path.exists(work), "the temporary work directory was left behind"
    for pid in [daemon_pid] + [int(row[1]) for row in rows]:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower(), \
            f"process {pid} outlived the demo"


@requires_kvm
def test_the_demo_keeps_its_files_in_a_work_dir_given(tmp_path):
    work = tmp_path / "demo"
    r = demo("--mem-mib", 32, "--clones", 1, "--work-dir", work)
    assert r.returncode == 0, r.stdout + r.stderr
    # 32 MiB of guest memory and the memory file's 4 KiB identity trailer (docs/snapshot-format.md)
    assert (work / "hello.state").is_file() and (work / "hello.mem").stat().st_size == (32 << 20) + 4096


@pytest.mark.parametrize("args, words", [
    (["--clones", "0"], "--clones: invalid whole number >= 1 value: '0'"),
    (["--clones", "65"], "--clones 65: at most 64"),
    (["--mem-mib", "x"], "--mem-mib: invalid whole number >= 1 value: 'x'"),
    (["--work-dir", "{not_empty}"], "not empty"),
])
def test_the_demo_refuses_bad_arguments_in_one_line(tmp_path, args, words):
    (tmp_path / "file").write_text("mine")
    r = demo(*[a.format(not_empty=tmp_path) for a in args])
    assert r.returncode == 2 and r.stderr.startswith("snapd: error:") and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and (tmp_path / "file").read_text() == "mine"


@requires_kvm
def test_a_demo_stopped_by_sigterm_leaves_no_daemon_and_no_files():
    proc = subprocess.Popen([sys.executable, "-m", "snapd.cli", "demo", "--mem-mib", "32", "--clones", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        lines = []
        while not lines or not lines[-1].startswith("4. restored"):
            line = proc.stdout.readline()
            assert line, "".join(lines) + proc.stderr.read()
            lines.append(line)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    text = "".join(lines)
    work = re.search(r"work directory (\S+)\)", text).group(1)
    daemon_pid = int(re.search(r"started `snapd serve` \(pid (\d+)", text).group(1))
    assert not os.path.exists(work)
    assert not os.path.exists(f"/proc/{daemon_pid}") or "zombie" in open(f"/proc/{daemon_pid}/status").read().lower()
