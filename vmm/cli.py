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


def _positive(kind):
    """An argparse type: a number > 0 (and finite) of ``kind``."""
    def convert(text: str):
        value = kind(text)
        if not 0 < value < float("inf"):
            raise ValueError(text)
        return value
    convert.__name__ = f"{kind.__name__} > 0"
    return convert


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


def build_parser(parser_class=argparse.ArgumentParser, prog: str = "vmm") -> argparse.ArgumentParser:
    parser = parser_class(prog=prog, description="KVM microVM monitor with snapshot and restore.")
    parser.add_argument("--api-sock", metavar="PATH", help="serve the Firecracker-compatible API on this Unix socket")
    parser.add_argument("--log-level", default="Warning", choices=("Error", "Warning", "Info", "Debug"),
                        help="API server: Info logs each request to standard error")
    parser.add_argument("--api-max-connections", type=_positive(int), default=64, metavar="N",
                        help="API connections open at once (default 64): one more gets a 503 and is closed")
    parser.add_argument("--api-idle-timeout", type=_positive(float), default=60.0, metavar="S",
                        help="seconds a kept-alive API connection may wait for its next request (default 60)")
    parser.add_argument("--api-request-timeout", type=_positive(float), default=10.0, metavar="S",
                        help="seconds from a request's first byte to its last (default 10): a slower one gets a 408")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="boot a guest and invoke its function")
    _add_machine_options(run)
    run.add_argument("--invoke", type=int, default=3, metavar="N", help="invocations to make (0: just boot)")
    run.add_argument("--duration", type=float, default=2.0, help="progress: seconds to run before stopping")
    run.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the guest to be ready")
    run.add_argument("--json", action="store_true", help="print one JSON document instead of text")

    sub.add_parser("guest-image", help="print the path of the built-in guest image")
    sub.add_parser("jail", add_help=False, help="start `vmm ARGS` jailed, as Firecracker's jailer does "
                   "(`vmm jail --help`)")
    from vmm.api.commands import add_subcommands
    add_subcommands(sub)
    return parser


class _OneLineParser(argparse.ArgumentParser):
    """Bad input is one line on standard error and exit status 2 (no usage block, no traceback)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_jail_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="vmm jail", usage="vmm jail --id ID --uid U --gid G --chroot-base DIR [--cgroup FILE=VALUE]... -- ARGS",
        description="Start `vmm ARGS` (e.g. --api-sock /api.sock) jailed in DIR/vmm/ID/root: own namespaces, that "
                    "directory as its whole file system, uid U and gid G without capabilities, the seccomp role "
                    "'vmm', and the cgroup vmm/ID. Needs root. See docs/api.md, \"Jailed: vmm jail\".")
    parser.add_argument("--id", required=True, help="the jail's name: 1-64 of A-Z a-z 0-9 -")
    parser.add_argument("--uid", required=True, help="uid the VMM runs as (not 0)")
    parser.add_argument("--gid", required=True, help="gid the VMM runs as (not 0)")
    parser.add_argument("--chroot-base", required=True, metavar="DIR", help="an existing directory; the jail is "
                        "DIR/vmm/ID/root, made if missing")
    parser.add_argument("--cgroup", action="append", default=[], metavar="FILE=VALUE",
                        help="controller.file=value written in the cgroup vmm/ID (memory, pids, cpu, cpuset), "
                             "e.g. pids.max=64; repeatable")
    return parser


def jail_config_from_args(argv: list[str]):
    """`vmm jail` options, then `--`, then the jailed vmm's arguments -> a JailerConfig (JailerUsageError or
    SystemExit(2) on bad input)."""
    from vmm.jail.jailer import JailerConfig, JailerUsageError, parse_cgroup_option
    ours, vmm_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = build_jail_parser()
    args = parser.parse_args(ours)
    ids = {}
    for name in ("uid", "gid"):
        try:
            ids[name] = int(getattr(args, name), 10)
        except ValueError:
            raise JailerUsageError(f"--{name} {getattr(args, name)!r} is not an integer") from None
    if vmm_args:
        parse_jailed_args(vmm_args)  # their mistakes told before any jail is made
    return JailerConfig(id=args.id, uid=ids["uid"], gid=ids["gid"], chroot_base=args.chroot_base,
                        cgroups=tuple(parse_cgroup_option(text) for text in args.cgroup), vmm_args=tuple(vmm_args))


def parse_jailed_args(vmm_args) -> argparse.Namespace:
    """The jailed vmm's arguments, parsed (SystemExit(2) and one line for a mistake); they must ask for something
    to run (--api-sock, or a command)."""
    parser = build_parser(_OneLineParser, prog="vmm jail -- ARGS")
    args = parser.parse_args(list(vmm_args))
    if args.command == "jail":
        parser.error("the arguments after -- are for the jailed vmm, not another `vmm jail`")
    if not args.api_sock and not args.command:
        parser.error("the arguments after -- ask for nothing to run: give --api-sock PATH (or a command)")
    return args


def jail_main(argv: list[str]) -> int:
    from vmm.jail.jailer import JailerUsageError, run
    try:
        config = jail_config_from_args(argv)
    except JailerUsageError as exc:
        print(f"vmm jail: error: {exc}", file=sys.stderr)
        return 2
    try:
        return run(config)
    except VmmError as exc:
        print(f"vmm jail: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def config_from_args(args) -> MachineConfig:
    return MachineConfig(vcpu_count=args.vcpus, mem_size_mib=args.mem, kernel_image=args.kernel,
                         boot_args=args.boot_args if args.kernel else _boot_args(args), initrd_path=args.initrd,
                         track_dirty_pages=args.track_dirty_pages)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["jail"]:
        return jail_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "jail":
        parser.error("`jail` must come first: vmm jail --id ID ... -- ARGS")
    return run_parsed(args, parser)


def run_parsed(args, parser: argparse.ArgumentParser | None = None) -> int:
    """Do what parsed arguments ask (a jailed vmm gets them parsed before its jail: argparse asks the terminal
    its width, an ioctl its seccomp role does not allow)."""
    try:
        if args.api_sock:
            from vmm.api.server import ConnectionLimits, serve
            limits = ConnectionLimits(args.api_max_connections, args.api_idle_timeout, args.api_request_timeout)
            return serve(args.api_sock, args.log_level, limits=limits)
        if args.command == "guest-image":
            print(builtin_guest_image())
            return 0
        if args.command == "run":
            from vmm.run import run_command
            return run_command(config_from_args(args), args)
        from vmm.api.commands import COMMANDS as API_COMMANDS
        if args.command in API_COMMANDS:
            return API_COMMANDS[args.command](args)
        if parser is not None:
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
