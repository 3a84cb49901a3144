"""Scenario 5 of the fault suite: many viewers of one streaming run, some of which never read.

Covers: the viewers that read get every event, in order, with a delivery latency (writer's
append to the viewer's read, one machine's monotonic clock) unaffected by the stuck ones;
the SSE server's memory stays bounded while the stuck ones' sockets are full; each stuck
viewer is cut off by the server with a reason (a ``lagged`` event naming the last id it
got) and the count of cut viewers is exactly the count of stuck ones.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import statistics
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from faults.conftest import Figures, count
from faults.fault_support import SSEProcess, clock, rss_mib, viewer_process

from agentrun_harness import sse as sse_harness
from agentrun_harness.controlplane import ControlPlane
from agentrun_harness.redisserver import RedisServer
from agentrun_operator import events

from sse_support import StuckViewer
from support import Kubectl, create_run, newest_only

pytestmark = newest_only(
    "the SSE server and Redis under load do not depend on the Kubernetes version"
)

SCENARIO = "Slow clients"
VIEWERS = count(200, 100)
STUCK = count(20, 10)
PER_PROCESS = 50  # reading viewers per client process
RATE = 50  # events per second
SECONDS = count(20, 15)
# Per event. A socket nobody reads still takes about 3 MB on loopback (the kernel grows
# the send buffer to tcp_wmem's 4 MB) before the server sees it full: big events fill that
# within seconds.
TEXT = "x" * 8000
QUEUE = 128  # the server's --viewer-queue: events a viewer may fall behind (default 2048)
P99_BOUND_MS = 500.0  # generous: a shared 2-core machine runs the writer and 200 viewers
RSS_GROWTH_BOUND_MIB = 64.0


@pytest.fixture
async def sse(
    cluster: ControlPlane, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[SSEProcess]:
    proc = SSEProcess(
        plane=cluster,
        redis_url=redis_server.url,
        workdir=tmp_path / "sse",
        args=("--viewer-queue", str(QUEUE)),
    )
    await asyncio.to_thread(proc.start)
    yield proc
    await asyncio.to_thread(proc.stop)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@pytest.mark.timeout(count(600, 300))
async def test_stuck_viewers_are_cut_with_a_reason_and_the_others_keep_their_pace(
    cluster: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    redis_server: RedisServer,
    sse: SSEProcess,
    figures: Figures,
) -> None:
    uid = await asyncio.to_thread(create_run, kubectl, namespace, "crowded", goal="watch")
    redis = events.connect(redis_server.url)
    op = await sse_harness.FakeOperator(redis, uid=uid, run=f"{namespace}/crowded").start()
    path = events.stream_path(namespace, "crowded")
    token = cluster.token("admin")
    rss_idle = rss_mib(sse.pid)

    readers = VIEWERS - STUCK
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for start in range(0, readers, PER_PROCESS):
        parent, child = ctx.Pipe(duplex=False)
        n = min(PER_PROCESS, readers - start)
        proc = ctx.Process(target=viewer_process, args=(sse.port, path, token, n, child))
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    stuck = [StuckViewer(sse.port, path, token) for _ in range(STUCK)]
    try:
        for viewer in stuck:
            await viewer.open()
        for pipe in pipes:
            assert await asyncio.to_thread(pipe.recv) == "open"
        rss_open = rss_mib(sse.pid)

        total = RATE * SECONDS
        peak = rss_open
        began = clock()
        for i in range(total):
            delay = began + i / RATE - clock()
            if delay > 0:
                await asyncio.sleep(delay)  # the writer's fixed pace
            await op.emit("token", {"text": TEXT, "node": "act", "sentAt": clock()})
            if i % 25 == 0:
                peak = max(peak, rss_mib(sse.pid))
        await op.end()
        results = []
        for pipe in pipes:
            results += await asyncio.to_thread(pipe.recv)
        for proc in procs:
            proc.join(30)
        lagged = sse.metric("agentrun_sse_viewers_lagged_total")
        peak = max(peak, rss_mib(sse.pid))
        cut = [await viewer.read_all() for viewer in stuck]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        await redis.aclose()

    # The readers: every event, in order, nothing twice; none of them was cut.
    expected = list(range(1, total + 2))
    incomplete = sum(1 for seqs, _ in results if seqs != expected)
    lags = [lag * 1000 for _, lat in results for lag in lat]
    p50, p99 = statistics.median(lags), pct(lags, 99)
    # The stuck ones: cut with a reason, having got a gapless prefix of the stream.
    reasons = 0
    for msgs, _complete in cut:
        ids = [m for m in msgs if m.id is not None]
        seqs = [json.loads(m.data)["seq"] for m in ids]
        assert seqs == list(range(1, len(seqs) + 1)), seqs[:10]
        if msgs and msgs[-1].event == "lagged":
            reason = msgs[-1].json()
            assert "fell behind" in reason["reason"] and reason["lastId"] == ids[-1].id
            reasons += 1

    figures.record(SCENARIO, "viewers (of which never read)", f"{VIEWERS} ({STUCK})")
    figures.record(SCENARIO, "events streamed", f"{total} x {len(TEXT) // 1000} kB at {RATE}/s")
    figures.record(SCENARIO, "p50 latency of readers (ms)", round(p50, 1))
    figures.record(SCENARIO, "p99 latency of readers (ms)", round(p99, 1), f"< {P99_BOUND_MS:.0f}")
    figures.record(SCENARIO, "readers with a gap, duplicate or cut", incomplete, "0")
    figures.record(
        SCENARIO, "stuck viewers cut with a reason", f"{reasons}/{STUCK}", f"{STUCK}/{STUCK}"
    )
    figures.record(
        SCENARIO,
        "SSE server RSS idle / open / peak (MiB)",
        f"{rss_idle:.0f} / {rss_open:.0f} / {peak:.0f}",
        f"peak - open < {RSS_GROWTH_BOUND_MIB:.0f}",
    )
    assert incomplete == 0
    assert lagged == STUCK, f"{lagged} viewers were cut, {STUCK} were stuck"
    assert reasons == STUCK
    assert p99 < P99_BOUND_MS, f"p99 {p99:.0f} ms"
    assert peak - rss_open < RSS_GROWTH_BOUND_MIB, (rss_open, peak)
