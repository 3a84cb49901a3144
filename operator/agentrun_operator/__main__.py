"""``python -m agentrun_operator``: check settings, then hand off to kopf's runner.

Owns the command line of the operator process only.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import kopf

from agentrun_operator import config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agentrun_operator")
    parser.add_argument("--namespace", "-n", action="append", help="watch only these")
    parser.add_argument("--redis-url", help="overrides AGENTRUN_REDIS_URL")
    parser.add_argument("--verbose", "-v", action="store_true")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    try:
        settings = config.load(redis_url=args.redis_url)
    except config.ConfigError as e:
        print(f"agentrun-operator: configuration error: {e}", file=sys.stderr)
        return 2
    namespaces = args.namespace or settings.namespaces
    from agentrun_operator import handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose, debug=args.debug)
    liveness = (
        f"http://{settings.health_host}:{settings.health_port}/healthz"
        if settings.health_port
        else None
    )
    memo = kopf.Memo()
    memo["settings"] = settings  # the startup handler uses these, flags included
    asyncio.run(
        kopf.operator(
            memo=memo,
            clusterwide=not namespaces,
            namespaces=namespaces or [],
            liveness_endpoint=liveness,
            standalone=True,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
