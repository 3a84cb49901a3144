"""``python -m agentrun_operator``: check settings, then hand off to kopf's runner; with
``AGENTRUN_LEADER_LEASE``, only once this replica holds the controller's Lease (``leader``),
standing by until then (alive for its liveness probe), and exiting when the Lease is lost.

Owns the command line and the life of the operator process only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import kopf
from aiohttp import web

from agentrun_operator import config, kube, leader
from agentrun_operator import metrics as prom

log = logging.getLogger("agentrun.main")


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
    options: dict[str, Any] = {
        "memo": memo,
        "clusterwide": not namespaces,
        "namespaces": namespaces or [],
        "liveness_endpoint": liveness,
        "standalone": True,
    }
    if not settings.leader_lease:
        asyncio.run(kopf.operator(**options))
        return 0
    return asyncio.run(_lead(settings, options))


async def _lead(settings: config.Settings, options: dict[str, Any]) -> int:
    """Stand by until this replica holds the Lease, then operate while it holds it."""
    k = await kube.Kube.from_env()
    elector = leader.Elector(
        k,
        lease=settings.leader_lease,
        identity=settings.operator_id,
        lease_seconds=settings.leader_lease_seconds,
    )
    try:
        prom.serve(host=settings.health_host, port=settings.metrics_port)
        prom.LEADER.set(0)
        standby = await _standby_probe(settings)
        try:
            await elector.acquire()
        finally:
            if standby is not None:
                await standby.cleanup()  # kopf serves the probe from now on
        prom.LEADER.set(1)
        # No stop flag: kopf would wait 5 s for its waiter at every SIGTERM, delaying the
        # hand-over; a lost Lease cancels it instead.
        operating = asyncio.create_task(kopf.operator(**options))
        holding = asyncio.create_task(elector.hold())
        await asyncio.wait({operating, holding}, return_when=asyncio.FIRST_COMPLETED)
        if operating.done():  # SIGTERM or SIGINT: kopf finished; let a standby take over
            holding.cancel()
            await elector.release()
            operating.result()
            return 0
        log.error(
            "%s; stopping this controller so that only one acts (the process exits and "
            "its pod restarts as a standby)",
            holding.exception(),
        )
        operating.cancel()
        try:
            await asyncio.wait_for(operating, settings.leader_lease_seconds / 3)
        except (asyncio.CancelledError, Exception) as e:  # leaving anyway
            if not isinstance(e, asyncio.CancelledError):
                log.warning("the operator did not stop cleanly: %s", e)
        return 3
    finally:
        await k.close()


async def _standby_probe(settings: config.Settings) -> web.AppRunner | None:
    """/healthz while standing by: a standby is alive, not broken."""
    if not settings.health_port:
        return None

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="standby")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.health_host, settings.health_port).start()
    return runner


if __name__ == "__main__":
    sys.exit(main())
