"""Scenario 2 of the fault suite: the SSE server killed with -9 and started again at random
moments while runs stream, and clients that keep dropping and coming back.

Covers: reconnects with ``Last-Event-ID`` (header) and ``lastEventId`` (query), clients
leaving by themselves after a random number of events and clients cut off by a crashed
server, a restarted server serving the same streams from Redis; every client ends with
exactly the events of the run's stream in Redis: no gap, no duplicate (ids and ``seq``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis as redis_sync
from faults.conftest import Figures, count
from faults.fault_support import Follower, SSEProcess, redis_ids

from agentrun_harness import sse as sse_harness
from agentrun_harness.controlplane import ControlPlane
from agentrun_harness.redisserver import RedisServer
from agentrun_operator import events

from support import Kubectl, create_run, newest_only

pytestmark = newest_only(
    "the SSE server and Redis under load do not depend on the Kubernetes version"
)

SCENARIO = "SSE server crash and client churn"
RECONNECTS = count(1000, 200)
RUNS = count(6, 4)
CLIENTS_PER_RUN = count(5, 4)
EVENTS_PER_SECOND = 40  # per run
SEED = 20260207


@pytest.fixture
async def sse(
    cluster: ControlPlane, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[SSEProcess]:
    proc = SSEProcess(plane=cluster, redis_url=redis_server.url, workdir=tmp_path / "sse")
    await asyncio.to_thread(proc.start)
    yield proc
    await asyncio.to_thread(proc.stop)


@pytest.mark.timeout(count(900, 300))
async def test_clients_reconnecting_across_server_crashes_miss_nothing_and_see_nothing_twice(
    cluster: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    redis_server: RedisServer,
    sse: SSEProcess,
    r: redis_sync.Redis,
    figures: Figures,
) -> None:
    rng = random.Random(SEED)
    token = cluster.token("admin")
    redis = events.connect(redis_server.url)
    runs = []
    for i in range(RUNS):
        name = f"churn-{i}"
        uid = await asyncio.to_thread(create_run, kubectl, namespace, name, goal="churn")
        op = await sse_harness.FakeOperator(redis, uid=uid, run=f"{namespace}/{name}").start()
        runs.append((name, uid, op))
    followers = [
        Follower(
            url=f"{sse.url}{events.stream_path(namespace, name)}",
            token=token,
            rng=random.Random(rng.random()),
            drop_after=(3, 60),
            use_query=k % 2 == 1,
        )
        for name, _uid, _op in runs
        for k in range(CLIENTS_PER_RUN)
    ]

    def reconnects() -> int:
        return sum(max(0, f.connects - 1) for f in followers)

    churning = True
    kills = 0

    async def write(op: sse_harness.FakeOperator) -> None:
        n = 0
        while churning:
            n += 1
            await op.emit("token", {"text": f"t{n} ", "node": "act"})
            await asyncio.sleep(1 / EVENTS_PER_SECOND)  # the writer's pace, not a wait
        await op.end()

    async def kill_and_restart() -> None:
        nonlocal kills
        while churning:
            await asyncio.sleep(rng.uniform(0.5, 2.5))  # a random moment: the fault
            if not churning:
                return
            await asyncio.to_thread(sse.kill)
            kills += 1
            await asyncio.sleep(rng.uniform(0, 0.5))  # down for a while
            await asyncio.to_thread(sse.start)

    began = time.monotonic()
    deadline = began + count(600, 200)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as http:
        readers = [asyncio.create_task(f.run(http, deadline=deadline)) for f in followers]
        writers = [asyncio.create_task(write(op)) for _n, _u, op in runs]
        killer = asyncio.create_task(kill_and_restart())
        try:
            while reconnects() < RECONNECTS:
                failed = [t for t in readers if t.done() and t.exception()]
                if failed:
                    await failed[0]
                assert time.monotonic() < deadline, f"only {reconnects()} reconnects"
                await asyncio.sleep(0.1)  # polling a counter the tasks share
            churning = False
            await killer
            await asyncio.gather(*writers)
            async with asyncio.timeout(60):
                await asyncio.gather(*readers)
        finally:
            churning = False
            for t in [*readers, *writers, killer]:
                t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*readers, *writers, killer, return_exceptions=True)
            await redis.aclose()
    took = time.monotonic() - began

    gaps = dupes = 0
    total_events = 0
    expected = {uid: redis_ids(r, uid) for _n, uid, _o in runs}
    per_run = CLIENTS_PER_RUN
    for i, f in enumerate(followers):
        uid = runs[i // per_run][1]
        g, d = f.faults(expected[uid])
        gaps += g
        dupes += d
        total_events += len(f.got)
        assert f.got == expected[uid], f"client {i}: {g} gaps, {d} duplicates"
    cut = sum(f.cut for f in followers)
    figures.record(SCENARIO, "reconnects with Last-Event-ID", reconnects(), f">= {RECONNECTS}")
    figures.record(SCENARIO, "kill -9 and restarts of the SSE server", kills)
    figures.record(SCENARIO, "streams cut by a server crash", cut)
    figures.record(
        SCENARIO, "clients / runs / events received", f"{len(followers)} / {RUNS} / {total_events}"
    )
    figures.record(SCENARIO, "gaps (all clients)", gaps, "0")
    figures.record(SCENARIO, "duplicates (all clients)", dupes, "0")
    figures.record(SCENARIO, "wall time (s)", round(took, 1))
    assert kills >= 3 and cut >= kills, f"{kills} kills cut {cut} streams: too few faults"
    assert gaps == 0 and dupes == 0
