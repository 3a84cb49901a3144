"""The `agentrun` command line: one entry point, one subcommand per job.

Owns argument parsing and exit codes only; each subcommand delegates to the module that
does the work.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path


def _version(_: argparse.Namespace) -> int:
    print(f"agentrun {metadata.version('agentrun')}")
    return 0


def _mock_llm(args: argparse.Namespace) -> int:
    # Imported here: starlette and uvicorn load only for this subcommand.
    from agentrun_operator import mockllm

    return mockllm.serve(
        host=args.host,
        port=args.port,
        script=args.script,
        tokens_per_second=args.tokens_per_second,
        api_key=args.api_key,
    )


def _watch(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from agentrun_operator import config, watch

    namespace, _, name = args.run.rpartition("/")
    if not namespace or not name:
        print("agentrun watch: give the run as NAMESPACE/NAME", file=sys.stderr)
        return 2
    server = args.server or os.environ.get("AGENTRUN_SERVER")
    try:
        if args.redis_url:
            # Development only: Redis holds every run's stream, so this bypasses the
            # per-person authorization the server does.
            phase = asyncio.run(
                watch.watch(namespace=namespace, name=name, redis_url=args.redis_url)
            )
        elif server:
            token = args.token or os.environ.get("AGENTRUN_TOKEN") or None
            phase = asyncio.run(
                watch.watch_server(namespace=namespace, name=name, server=server, token=token)
            )
        else:
            print(
                "agentrun watch: give the agentrun server's URL with --server URL (or "
                "AGENTRUN_SERVER), e.g. after `kubectl port-forward -n agentrun-system "
                "svc/agentrun 8080`: --server http://127.0.0.1:8080",
                file=sys.stderr,
            )
            return 2
    except watch.WatchError as e:
        print(f"agentrun watch: {e}", file=sys.stderr)
        return 1
    except config.ConfigError as e:
        print(f"agentrun watch: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if phase == "Succeeded" else 1


def _kube_namespace(given: str | None) -> str:
    if given:
        return given
    # The current context's namespace, as kubectl would use it.
    import os

    import yaml

    path = os.environ.get("KUBECONFIG", os.path.expanduser("~/.kube/config")).split(os.pathsep)[0]
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
        current = cfg.get("current-context")
        for ctx in cfg.get("contexts") or []:
            if ctx.get("name") == current:
                return str((ctx.get("context") or {}).get("namespace") or "default")
    except OSError:
        pass
    return "default"


def _approvals(args: argparse.Namespace) -> int:
    import asyncio

    from agentrun_operator import decisions

    return asyncio.run(
        decisions.list_approvals(namespace=_kube_namespace(args.namespace), everything=args.all)
    )


def _decide(args: argparse.Namespace) -> int:
    import asyncio

    from agentrun_operator import decisions

    decision = "Approved" if args.command == "approve" else "Denied"
    if args.all:
        if not args.run or args.call_id:
            print(
                f"agentrun {args.command}: --all needs --run NAMESPACE/NAME and no CALL_ID",
                file=sys.stderr,
            )
            return 2
        namespace, _, run = args.run.rpartition("/")
        results = asyncio.run(
            decisions.decide_all(
                namespace=namespace or _kube_namespace(args.namespace),
                run=run,
                decision=decision,
                comment=args.comment,
            )
        )
        if not results:
            print(f"no pending approvals for run {args.run}")
        for name, error in results:
            print(f"{name}: {'refused: ' + error if error else decision.lower()}")
        return 1 if any(error for _, error in results) else 0
    if not args.call_id:
        print(f"agentrun {args.command}: give a CALL_ID, or --run NS/NAME --all", file=sys.stderr)
        return 2
    try:
        ta = asyncio.run(
            decisions.decide(
                namespace=_kube_namespace(args.namespace),
                call_id=args.call_id,
                decision=decision,
                comment=args.comment,
            )
        )
    except decisions.DecisionError as e:
        print(f"agentrun {args.command}: {e}", file=sys.stderr)
        return 1
    by = ((ta.get("spec") or {}).get("decidedBy") or {}).get("username", "?")
    print(f"{ta['metadata']['name']}: {decision.lower()} by {by}")
    return 0


def _delete_runs(args: argparse.Namespace) -> int:
    import asyncio

    from agentrun_operator import cleanup

    globs = [g.strip() for g in (args.namespaces or "").split(",") if g.strip()]
    return asyncio.run(cleanup.delete_runs(namespaces=globs, timeout=args.timeout))


def add_mock_llm_arguments(parser: argparse.ArgumentParser) -> None:
    """The mock LLM's options (also ``python -m agentrun_operator.mockllm``'s)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--script", type=Path, help="YAML or JSON rules (see mockllm.py)")
    parser.add_argument("--tokens-per-second", type=float, default=50.0, help="0: no pacing")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentrun",
        description="Kubernetes-native AI agent runs that people can watch, approve and stop.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=_version)
    mock = sub.add_parser("mock-llm", help="serve an OpenAI-compatible mock LLM (tests, demo)")
    add_mock_llm_arguments(mock)
    mock.set_defaults(func=_mock_llm)
    watch = sub.add_parser(
        "watch", help="print a run's events live, through the agentrun server, as yourself"
    )
    watch.add_argument("run", metavar="NAMESPACE/NAME")
    watch.add_argument("--server", help="the agentrun server's URL (default: AGENTRUN_SERVER)")
    watch.add_argument(
        "--token",
        help="a Kubernetes bearer token (default: AGENTRUN_TOKEN, else your kubeconfig's)",
    )
    watch.add_argument(
        "--redis-url",
        help="development only: read the stream straight from this Redis, bypassing the "
        "server's authorization",
    )
    watch.set_defaults(func=_watch)
    listing = sub.add_parser("approvals", help="list pending ToolApprovals")
    listing.add_argument("-n", "--namespace", help="default: the kubeconfig context's")
    listing.add_argument("-A", "--all", action="store_true", help="also settled ones")
    listing.set_defaults(func=_approvals)
    for verb in ("approve", "deny"):
        cmd = sub.add_parser(verb, help=f"{verb} a tool call, as yourself (your kubeconfig)")
        cmd.add_argument("call_id", metavar="CALL_ID", nargs="?")
        cmd.add_argument("--run", metavar="NAMESPACE/NAME", help="with --all: that run's calls")
        cmd.add_argument("--all", action="store_true", help="every pending call of --run")
        cmd.add_argument("-n", "--namespace", help="default: the kubeconfig context's")
        cmd.add_argument("--comment", help="a note passed to the agent")
        cmd.set_defaults(func=_decide)
    delete = sub.add_parser(
        "delete-runs",
        help="delete AgentRuns and wait until the operator has cleaned each up (uninstall)",
    )
    delete.add_argument(
        "--namespaces", help="comma-separated namespace globs (default: every namespace)"
    )
    delete.add_argument("--timeout", type=float, default=120, help="seconds to wait (120)")
    delete.set_defaults(func=_delete_runs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
