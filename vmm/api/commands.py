"""`vmm snapshot`, `vmm restore` and `vmm api`: the API's operations for people without an HTTP client."""
import http.client
import json
import sys
import time

from vmm.api.client import ApiClient, ApiClientError
from vmm.errors import VmmError


def _client(socket_path: str) -> ApiClient:
    return ApiClient(socket_path)


def snapshot_command(args) -> int:
    """Pause the VM of a running VMM process (if it runs), snapshot it, and optionally resume it."""
    try:
        with _client(args.target_sock) as client:
            state = client.instance_info()["state"]
            if state == "Running":
                client.pause()
            t0 = time.perf_counter()
            client.create_snapshot(args.snapshot_path, args.mem_file_path)
            took_ms = (time.perf_counter() - t0) * 1e3
            if args.resume:
                client.resume()
    except ApiClientError as exc:
        raise VmmError(exc.fault_message) from None
    except OSError as exc:
        raise VmmError(f"cannot reach the VMM on {args.target_sock}: {exc.strerror or exc}") from None
    print(f"snapshot written to {args.snapshot_path} and {args.mem_file_path} in {took_ms:.1f} ms"
          f"{'; VM resumed' if args.resume else '; VM left paused'}")
    return 0


def restore_command(args) -> int:
    """Restore a snapshot in this process (File backend), answer its pending invocations, invoke N times."""
    from vmm import snapshot as snapshots
    from vmm.devices.serial import stdout_sink
    from vmm.driver import WorkloadDriver, WorkloadParams, invoke_verified, print_invocation_report
    from vmm.run import stderr_sink

    t0 = time.perf_counter()
    machine = snapshots.load_snapshot_file_backed(args.snapshot, args.mem_file, resume=False,
                                                  serial_sink=stderr_sink if args.json else stdout_sink)
    try:
        port = machine.fnport
        pending = port.pending()
        first_count = port.seq + 1 + sum(1 for invocation in pending if not invocation.seq)
        snapshots.resume_restored(machine)
        t_resumed = time.perf_counter()
        restored = []
        for invocation in pending:
            reply = invocation.wait(args.timeout)
            restored.append({"seq": invocation.seq, "payload_size": len(invocation.payload),
                             "reply_size": len(reply)})
        # A kernel's boot arguments are the kernel's: only the built-in guest's name a workload.
        params = (WorkloadParams(workload="kernel") if machine.config.kernel_image
                  else WorkloadParams.from_boot_args(machine.config.boot_args))
        results = []
        if args.invoke and params.workload not in ("progress", "kernel"):
            results = invoke_verified(machine, WorkloadDriver(params, first_count=first_count), args.invoke,
                                      args.timeout)
        machine.stop("restore finished")
    finally:
        machine.close()
    report = {"workload": params.workload, "vcpus": machine.config.vcpu_count,
              "mem_mib": machine.config.mem_size_mib, "restore_ms": round((t_resumed - t0) * 1e3, 3),
              "restored_pending": restored, "invocations": results, "verified": True}
    print_invocation_report(
        report, f"restored {params.workload} ({report['mem_mib']} MiB, {report['vcpus']} vCPU) in "
                f"{report['restore_ms']:.2f} ms", args.json,
        [f"  pending invocation {r['seq']} from the snapshot answered ({r['reply_size']} bytes)" for r in restored])
    return 0


def api_command(args) -> int:
    """One raw request, as `curl --unix-socket`: prints the JSON reply; exit 1 on an error status."""
    body = None
    if args.body is not None:
        try:
            body = json.loads(args.body)
        except json.JSONDecodeError as exc:
            raise VmmError(f"the request body is not JSON: {exc.msg}") from None
    try:
        with _client(args.target_sock) as client:
            reply = client.request(args.method.upper(), args.path, body)
    except OSError as exc:
        raise VmmError(f"cannot reach the VMM on {args.target_sock}: {exc.strerror or exc}") from None
    except http.client.InvalidURL as exc:  # http.client refuses the path itself (a space, a control character)
        raise VmmError(f"{args.method.upper()} {args.path!r}: not a request path: {exc}") from None
    if reply.body:
        print(reply.body.decode(errors="replace"))
    if reply.status >= 300:
        print(f"vmm: error: {args.method.upper()} {args.path} -> {reply.status}", file=sys.stderr)
        return 1
    return 0


def add_subcommands(sub) -> None:
    # --api-sock of these subcommands names a VMM to talk to; dest differs from the top-level --api-sock (serve).
    snap = sub.add_parser("snapshot", help="snapshot the VM of a VMM process serving the API")
    snap.add_argument("--api-sock", dest="target_sock", required=True, metavar="PATH", help="API socket of the VMM process")
    snap.add_argument("--snapshot-path", required=True, help="state file to write")
    snap.add_argument("--mem-file-path", required=True, help="memory file to write")
    snap.add_argument("--resume", action="store_true", help="resume the VM after the snapshot")

    restore = sub.add_parser("restore", help="restore a snapshot in this process and invoke its function")
    restore.add_argument("--snapshot", required=True, help="state file")
    restore.add_argument("--mem-file", required=True, help="memory file")
    restore.add_argument("--invoke", type=int, default=3, metavar="N", help="invocations to make after restore")
    restore.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each reply")
    restore.add_argument("--json", action="store_true", help="print one JSON document instead of text")

    api = sub.add_parser("api", help="send one request to a VMM's API (like curl --unix-socket)")
    api.add_argument("--api-sock", dest="target_sock", required=True, metavar="PATH", help="API socket of the VMM process")
    api.add_argument("method", help="GET, PUT or PATCH")
    api.add_argument("path", help="e.g. / or /machine-config")
    api.add_argument("body", nargs="?", help="JSON request body")


COMMANDS = {"snapshot": snapshot_command, "restore": restore_command, "api": api_command}
