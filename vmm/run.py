"""`vmm run`: boot a guest, wait for its init phase, invoke it N times and verify every reply."""
import json
import sys
import time

from vmm.config import MachineConfig
from vmm.devices.serial import stdout_sink
from vmm.driver import WorkloadDriver, WorkloadParams, invoke_verified, print_invocation_report
from vmm.machine import Microvm


def stderr_sink(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def run_command(config: MachineConfig, args) -> int:
    # A kernel's boot arguments are the kernel's: only the built-in guest's name a workload.
    params = None if config.kernel_image else WorkloadParams.from_boot_args(config.boot_args)
    t_start = time.perf_counter()
    machine = Microvm(config, serial_sink=stderr_sink if args.json else stdout_sink)
    try:
        machine.boot()
        if params is None or params.workload == "progress":
            machine.wait(args.duration)
            machine.stop("run duration elapsed" if not machine.stopped.is_set() else machine.stop_reason)
            return _report_plain_run(machine, args, t_start)
        machine.wait_ready(args.timeout)
        t_ready = time.perf_counter()
        results = invoke_verified(machine, WorkloadDriver(params), args.invoke, args.timeout)
        machine.stop("run finished")
    finally:
        machine.close()
    report = {
        "workload": params.workload, "vcpus": config.vcpu_count, "mem_mib": config.mem_size_mib,
        "boot_to_ready_ms": round((t_ready - t_start) * 1e3, 3), "invocations": results, "verified": True,
    }
    print_invocation_report(report, f"booted {params.workload} ({config.mem_size_mib} MiB, {config.vcpu_count} "
                                    f"vCPU): ready in {report['boot_to_ready_ms']:.2f} ms", args.json)
    return 0


def _report_plain_run(machine: Microvm, args, t_start: float) -> int:
    fault = machine.fault
    report = {"stop_reason": machine.stop_reason, "ran_ms": round((time.perf_counter() - t_start) * 1e3, 1)}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"stopped after {report['ran_ms']} ms: {report['stop_reason']}")
    if fault is not None:
        raise fault
    return 0
