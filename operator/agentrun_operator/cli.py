"""The `agentrun` command line: one entry point, one subcommand per job.

Owns argument parsing and exit codes only; each subcommand delegates to the module that
does the work.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata


def _version(_: argparse.Namespace) -> int:
    print(f"agentrun {metadata.version('agentrun')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentrun",
        description="Kubernetes-native AI agent runs that people can watch, approve and stop.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
