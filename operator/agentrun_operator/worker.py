"""``python -m agentrun_operator.worker``: executes the runs a controller (an operator with
``AGENTRUN_ROLE=controller``) queued, claimed from the Redis Stream ``agentrun:work:{0}`` (on
a Redis Cluster, the 8 shards ``agentrun:work:{0}`` … ``{7}``) through the consumer group
``workers``.

Owns claiming (``XREADGROUP``, up to ``AGENTRUN_MAX_CONCURRENT_RUNS`` runs at once), holding
(an entry stays pending while its run's task runs here; ``XCLAIM … JUSTID`` refreshes it at
the lease cadence so no other worker reclaims a live run), acknowledging (when the run ends
or waits for people; only entries still its own: one another worker reclaimed while this one
was cut off is left to that worker), reclaiming the entries of workers that died
(``XAUTOCLAIM`` of entries idle for a whole lease term; the fenced lease and the call
records make the resumed run go on from its checkpoint with no duplicate event or tool
call), and draining on SIGTERM (each held run is queued again and its lease released, so
another worker resumes it at once).
Never: admits a run (first sight is the controller's), runs the clocks (expiries, TTL,
orphaned keys: the controller's), or watches Kubernetes (it reads the runs it is given).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from agentrun_operator import config, kube
from agentrun_operator import metrics as prom
from agentrun_operator.engine.runtime import Runtime, open_runtime

log = logging.getLogger("agentrun.worker")

CLAIM_BLOCK_MS = 1000
RECLAIM_BATCH = 50


class Worker:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.store = rt.store
        self.registry = rt.registry
        self.id = rt.settings.operator_id
        self.capacity = rt.settings.max_concurrent_runs
        self.lease = rt.settings.lease_seconds
        # The work entries behind each run this worker executes (acknowledged when it ends).
        self.held: dict[str, list[str]] = {}
        self.claiming = False
        self.draining = False
        self._acks: set[asyncio.Task[None]] = set()
        self._loops: asyncio.Future[tuple[None, None, None]] | None = None
        self.registry.on_done.append(self._done)

    # -- the loops -------------------------------------------------------------------------
    async def run(self) -> None:
        await self.store.ensure_work_group()
        self.claiming = True
        loops = asyncio.gather(self._claim(), self._hold(), self._reclaim())
        self._loops = loops
        with contextlib.suppress(asyncio.CancelledError):
            await loops

    async def _claim(self) -> None:
        while not self.draining:
            free = self.capacity - len(self.registry.running)
            if free <= 0:
                await asyncio.sleep(0.1)
                continue
            try:
                entries = await self.store.claim_work(
                    self.id, count=min(free, RECLAIM_BATCH), block_ms=CLAIM_BLOCK_MS
                )
            except Exception as e:
                log.warning("cannot claim work (%s); retrying", e)
                await asyncio.sleep(1)
                continue
            for entry_id, work in entries:
                prom.WORK_CLAIMS.labels("new").inc()
                await self._take(entry_id, work)

    async def _hold(self) -> None:
        while not self.draining:
            await asyncio.sleep(self.lease / 3)
            ids = [i for ids in self.held.values() for i in ids]
            with contextlib.suppress(Exception):  # the next round tries again
                kept = await self.store.hold_work(self.id, ids)
                if kept < len(ids):
                    # Reclaimed by another worker while this one was frozen or cut off for
                    # longer than a lease: theirs now (this run's fenced lease stops it here).
                    log.warning("%d of %d held work entries were taken over by other workers",
                                len(ids) - kept, len(ids))  # fmt: skip
                prom.WORK_QUEUE.set(await self.store.work_depth())
                prom.WORK_AGE.set(await self.store.work_age_seconds())

    async def _reclaim(self) -> None:
        while not self.draining:
            await asyncio.sleep(self.lease / 3)
            try:
                # A live worker refreshes its entries every lease/3: one idle for a whole
                # lease term belongs to a worker that is gone (its run's lease lapses too).
                entries = await self.store.reclaim_work(
                    self.id, min_idle_ms=int(self.lease * 1000), count=RECLAIM_BATCH
                )
            except Exception as e:
                log.warning("cannot reclaim work (%s); retrying", e)
                continue
            for entry_id, work in entries:
                log.info("taking over run %s/%s from a worker that is gone",
                         work.get("namespace"), work.get("name"))  # fmt: skip
                prom.WORK_CLAIMS.labels("reclaimed").inc()
                await self._take(entry_id, work)

    # -- one entry -------------------------------------------------------------------------
    async def _take(self, entry_id: str, work: dict[str, str]) -> None:
        uid, namespace, name = work.get("uid", ""), work.get("namespace", ""), work.get("name", "")
        if self.draining:
            # Claimed as we leave (a claim was in flight): back on the queue for another.
            with contextlib.suppress(Exception):
                await self.store.enqueue_work(
                    uid=uid, namespace=namespace, name=name, why="handover"
                )
                await self._ack([entry_id])
            return
        try:
            body = await self.rt.kube.get_agentrun(namespace=namespace, name=name)
        except kube.KubeError as e:
            # Left pending on this worker, unrefreshed: reclaimed (here or elsewhere) later.
            log.warning("cannot read run %s/%s (%s); it is taken again later", namespace, name, e)
            return
        if body is None or body["metadata"]["uid"] != uid:
            await self._ack([entry_id])  # the run is gone
            return
        slot = self.registry.running.get(uid)
        if slot is not None:
            # Already running here (e.g. a vote while its task ran): it looks again at the
            # approvals when its task ends.
            slot.recheck = True
            await self._ack([entry_id])
            return
        await self.registry.ensure(body)
        if uid in self.registry.running:
            self.held.setdefault(uid, []).append(entry_id)
        else:
            await self._ack([entry_id])  # finished, stopped, or nothing to do

    def _done(self, uid: str) -> None:
        ids = self.held.pop(uid, [])
        if ids and not self.draining:
            task = asyncio.create_task(self._ack(ids))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

    async def _ack(self, ids: list[str]) -> None:
        try:
            await self.store.ack_work(self.id, ids)
        except Exception as e:  # pending, then reclaimed: the run is looked at once more
            log.warning("cannot acknowledge work %s (%s)", ids, e)

    # -- leaving ---------------------------------------------------------------------------
    async def drain(self) -> None:
        """Stop claiming; queue every held run again (another worker takes it at once) and
        release its lease; then acknowledge the old entries."""
        self.draining = True
        self.claiming = False
        if self._loops is not None:  # no claim in flight may take the runs handed over
            self._loops.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loops
        handed = dict(self.held)
        self.held.clear()
        for uid in handed:
            slot = self.registry.running.get(uid)
            if slot is None:
                continue
            with contextlib.suppress(Exception):
                await self.store.enqueue_work(
                    uid=uid, namespace=slot.ref.namespace, name=slot.ref.name, why="handover"
                )
        await self.registry.close()  # tasks cancelled without finishing; leases released
        await self._ack([i for ids in handed.values() for i in ids])
        if self._acks:
            await asyncio.gather(*self._acks, return_exceptions=True)
        log.info("drained: %d runs handed over", len(handed))


async def _probes(worker: Worker, host: str, port: int) -> web.AppRunner:
    """/healthz (alive) and /readyz (claiming work) for the worker's pod."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(_: web.Request) -> web.Response:
        ok = worker.claiming and not worker.draining
        return web.Response(text="claiming" if ok else "not claiming", status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def serve(cfg: config.Settings) -> None:
    rt = await open_runtime(cfg, role="worker", clocks=False)
    worker = Worker(rt)
    prom.serve(host=cfg.health_host, port=cfg.metrics_port)
    probes = await _probes(worker, cfg.health_host, cfg.health_port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    main = asyncio.create_task(worker.run(), name="agentrun-worker")
    log.info("worker %s claiming up to %d runs", worker.id, worker.capacity)
    waiter = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait({main, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if main in done and main.exception() is not None:
        log.error("worker loop failed", exc_info=main.exception())
    await worker.drain()
    main.cancel()
    waiter.cancel()
    with contextlib.suppress(BaseException):
        await main
    await rt.close()
    await probes.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agentrun_operator.worker")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="[%(asctime)s] %(name)-20.20s [%(levelname)-8s] %(message)s",
    )
    try:
        cfg = config.load()
        asyncio.run(serve(cfg))
    except config.ConfigError as e:
        print(f"agentrun-worker: configuration error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
