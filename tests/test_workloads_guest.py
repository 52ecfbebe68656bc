"""Every built-in workload booted on the real VMM and invoked many times; every reply verified in Python."""
import subprocess

import pytest

from tests.conftest import requires_kvm, subprocess_env, vmm_command
from vmm.config import MachineConfig
from vmm.driver import WorkloadDriver, WorkloadParams, invoke_verified
from vmm.machine import Microvm

pytestmark = requires_kvm


@pytest.mark.parametrize("workload, vcpus", [("hello", 1), ("kv", 1), ("scan", 1), ("kv", 2)])
def test_workload_answers_many_verified_invocations(workload, vcpus):
    params = WorkloadParams(workload=workload, seed=11, kv_mib=8, scan_mib=8)
    machine = Microvm(MachineConfig(mem_size_mib=64, vcpu_count=vcpus, boot_args=params.boot_args()),
                      serial_sink=lambda data: None)
    try:
        machine.boot()
        machine.wait_ready(10)
        results = invoke_verified(machine, WorkloadDriver(params), 40, timeout=10)
        assert [r["invocation"] for r in results] == list(range(1, 41))
    finally:
        machine.close()


def test_cli_run_prints_guest_console_and_verified_replies():
    out = subprocess.run(vmm_command("run", "--workload", "kv", "--mem", "64", "--kv-mib", "4", "--invoke", "5"),
                         capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "vmguest: kv ready" in out.stdout
    assert out.stdout.count("(verified)") == 5


@pytest.mark.parametrize("args, words", [
    (["--mem", "0"], "mem_size_mib must be at least 2 MiB"),
    (["--mem", "100000000"], "mem_size_mib"),
    (["--vcpus", "0"], "vcpu_count must be between"),
    (["--kernel", "/nonexistent.elf"], "does not exist"),
    (["--kernel", "/etc/hostname"], "not an ELF file"),
    (["--boot-args", "workload=nosuch"], "guest stopped before it was ready"),
    (["--boot-args", "seed=x"], "boot argument seed='x' is not a whole number"),
])
def test_cli_bad_input_is_one_clear_line(args, words):
    out = subprocess.run(vmm_command("run", *args), capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert words in out.stderr
    assert out.stderr.strip().startswith("vmm: error:")


def test_cli_guest_fault_prints_registers(tiny_guests):
    out = subprocess.run(vmm_command("run", "--kernel", tiny_guests["ud2"], "--mem", "16", "--duration", "5"),
                         capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "invalid opcode" in out.stderr and "vmm: registers: rax=" in out.stderr


def test_unknown_workload_guest_explains_itself():
    out = subprocess.run(vmm_command("run", "--boot-args", "workload=nosuch"), capture_output=True, text=True,
                         env=subprocess_env(), timeout=60)
    assert "vmguest: error: unknown workload 'nosuch'" in out.stdout
