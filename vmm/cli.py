"""`vmm` command line. It only builds a MachineConfig (or an API server) and hands it to the VMM.

Guest serial output goes to standard output, as Firecracker's serial console does; with --json the guest's
output goes to standard error and standard output carries one JSON document.
"""
import argparse
import sys

from vmm.config import DEFAULT_MEM_MIB, MachineConfig, builtin_guest_image
from vmm.errors import GuestFault, VmmError

WORKLOADS = ("hello", "kv", "scan", "progress")


def _boot_args(args) -> str:
    words = [f"workload={args.workload}", f"seed={args.seed}"]
    if args.kv_mib is not None:
        words.append(f"kv_mib={args.kv_mib}")
    if args.scan_mib is not None:
        words.append(f"scan_mib={args.scan_mib}")
    if args.boot_args:
        words.append(args.boot_args)
    return " ".join(words)


def _add_machine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernel", default="", help="guest ELF image (default: the built-in function guest)")
    parser.add_argument("--workload", default="hello", choices=WORKLOADS, help="built-in guest workload")
    parser.add_argument("--mem", type=int, default=DEFAULT_MEM_MIB, metavar="MiB", help="guest memory in MiB")
    parser.add_argument("--vcpus", type=int, default=1, help="number of vCPUs")
    parser.add_argument("--seed", type=int, default=1, help="seed of the guest's deterministic data")
    parser.add_argument("--kv-mib", type=int, help="kv: hash table size in MiB")
    parser.add_argument("--scan-mib", type=int, help="scan: array size in MiB")
    parser.add_argument("--boot-args", default="", help="extra key=value words for the guest command line")
    parser.add_argument("--initrd", default="", help="initrd for a Linux kernel given with --kernel")
    parser.add_argument("--track-dirty-pages", action="store_true", help="log dirty pages (for Diff snapshots)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmm", description="KVM microVM monitor with snapshot and restore.")
    parser.add_argument("--api-sock", metavar="PATH", help="serve the Firecracker-compatible API on this Unix socket")
    parser.add_argument("--log-level", default="Warning", choices=("Error", "Warning", "Info", "Debug"),
                        help="API server: Info logs each request to standard error")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="boot a guest and invoke its function")
    _add_machine_options(run)
    run.add_argument("--invoke", type=int, default=3, metavar="N", help="invocations to make (0: just boot)")
    run.add_argument("--duration", type=float, default=2.0, help="progress: seconds to run before stopping")
    run.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the guest to be ready")
    run.add_argument("--json", action="store_true", help="print one JSON document instead of text")

    sub.add_parser("guest-image", help="print the path of the built-in guest image")
    from vmm.api.commands import add_subcommands
    add_subcommands(sub)
    return parser


def config_from_args(args) -> MachineConfig:
    return MachineConfig(vcpu_count=args.vcpus, mem_size_mib=args.mem, kernel_image=args.kernel,
                         boot_args=args.boot_args if args.kernel else _boot_args(args), initrd_path=args.initrd,
                         track_dirty_pages=args.track_dirty_pages)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.api_sock:
            from vmm.api.server import serve
            return serve(args.api_sock, args.log_level)
        if args.command == "guest-image":
            print(builtin_guest_image())
            return 0
        if args.command == "run":
            from vmm.run import run_command
            return run_command(config_from_args(args), args)
        from vmm.api.commands import COMMANDS as API_COMMANDS
        if args.command in API_COMMANDS:
            return API_COMMANDS[args.command](args)
        parser.print_help()
        return 2
    except GuestFault as fault:
        print(f"vmm: error: {fault}", file=sys.stderr)
        if fault.registers:
            print(f"vmm: registers: {fault.registers}", file=sys.stderr)
        return 1
    except VmmError as exc:
        print(f"vmm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
