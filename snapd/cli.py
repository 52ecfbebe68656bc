"""`snapd` command line. Each command group lives in its own module exposing
`register(subparsers)`; add the module's name to COMMAND_MODULES to plug it in.

A handler is stored as `func` on its parser and returns an exit status. Errors a user can act on
(bad arguments, missing or corrupt files) are printed as one line `snapd: error: ...`."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

COMMAND_MODULES = ("snapd.image.commands", "snapd.serve", "snapd.loadset_commands", "snapd.demo")

EXIT_FAILED = 1   # the command ran and found a problem (e.g. verify found corruption)
EXIT_USAGE = 2    # bad arguments, missing files, unreadable input


class CliError(Exception):
    """Raise from a handler to print `snapd: error: <message>` and exit with `status`."""

    def __init__(self, message: str, status: int = EXIT_USAGE):
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are the same single `snapd: error:` line as every other error."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"snapd: error: {message} (see '{self.prog} --help')\n")


def print_info(info: dict, as_json: bool) -> None:
    """A command's findings: one JSON document, or aligned ``key  value`` lines."""
    if as_json:
        print(json.dumps(info, indent=2))
        return
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="snapd", description="microVM snapshot and base-image tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: one line, exit 2 (see _Parser)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"snapd: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("snapd: error: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"snapd: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    # Run the copy imported as `snapd.cli`, so command modules and we share one CliError class.
    from snapd.cli import main as _main
    sys.exit(_main())
