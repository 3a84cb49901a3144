"""Debian's real NGINX in front of the SSE server, run from ``docs/nginx.conf`` itself.

Covers: with the documented config, every event comes through as soon as it is written
(its latency through NGINX within a few milliseconds of the direct one); as a control that
can fail, NGINX's buffering (``proxy_buffering on`` and ``proxy_ignore_headers
X-Accel-Buffering``, since NGINX obeys the server's ``X-Accel-Buffering: no`` otherwise)
holds the same events back and hands them over in batches; and heartbeats keep a stream
that is idle for longer than the proxy's read timeout open, where without them NGINX cuts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from redis import asyncio as aioredis

from agentrun_harness import sse as sse_harness
from agentrun_harness.controlplane import ControlPlane
from agentrun_harness.redisserver import RedisServer
from agentrun_operator import events

from sse_support import NGINX, create_run, nginx, sse_settings
from support import Kubectl, newest_only, require_tool

pytestmark = newest_only(
    "NGINX in front of the SSE server does not depend on the Kubernetes version"
)


@pytest.fixture(autouse=True)
def nginx_installed() -> None:
    require_tool(NGINX, package="nginx")


@pytest.fixture
async def http(cluster: ControlPlane) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {cluster.token('admin')}"}
    async with httpx.AsyncClient(headers=headers, timeout=30) as c:
        yield c


async def latencies(
    http: httpx.AsyncClient,
    *,
    live: list[str],
    held: str,
    op: sse_harness.FakeOperator,
    n: int,
    gap: float,
) -> tuple[list[float], list[list[float]]]:
    """When each of ``n`` events was written, and per URL (``live`` ones, then ``held``)
    each one's latency (s) from its write to its arrival.

    A buffering proxy holds even the response headers back until its buffer fills, so
    ``held`` is opened without waiting for them; it replays from the run's start, so no
    event is missed however late it attaches. The run ends after the events, so every
    stream, buffered ones too, is complete when its response ends.
    """
    held_tap = sse_harness.StreamTap(http, held)
    opening = asyncio.create_task(held_tap.__aenter__())
    try:
        async with contextlib.AsyncExitStack() as stack:
            taps = [await stack.enter_async_context(sse_harness.StreamTap(http, u)) for u in live]
            await asyncio.gather(*(tap.heartbeat() for tap in taps))  # live, not replaying
            written: dict[str, float] = {}
            pad = "z" * 100
            for i in range(n):
                event_id = await op.emit("token", {"text": f"{i}{pad}", "node": "act"})
                written[event_id] = time.monotonic()
                await asyncio.sleep(gap)  # the producer's pace, not a synchronisation
            await op.end()
            async with asyncio.timeout(15):
                await opening
            for tap in [*taps, held_tap]:
                await tap.until_closed(timeout=15)
            at = list(written.values())
            return at, [
                [tap.arrived[i] - t for i, t in written.items()] for tap in [*taps, held_tap]
            ]
    finally:
        opening.cancel()
        await held_tap.close()


def bursts(lags: list[float], *, written: list[float]) -> int:
    """How many separate deliveries: events written apart but arriving within 5 ms of the
    previous one came in the same burst."""
    arrivals = [w + lag for w, lag in zip(written, lags, strict=True)]
    return 1 + sum(1 for a, b in itertools.pairwise(arrivals) if b - a > 0.005)


def ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.1f} ms, max {max(values) * 1000:.1f} ms"


async def test_events_arrive_through_the_documented_config_unbatched_and_batched_by_default(
    server: sse_harness.LiveServer,
    http: httpx.AsyncClient,
    kubectl: Kubectl,
    namespace: str,
    redis: aioredis.Redis,
) -> None:
    uid = create_run(kubectl, namespace)
    op = await sse_harness.FakeOperator(redis, uid=uid, run=f"{namespace}/r1").start()
    path = events.stream_path(namespace, "r1")
    # NGINX's defaults (buffering, HTTP/1.0 upstream), told to ignore X-Accel-Buffering,
    # plus gzip for event streams, the usual way such a proxy ends up batching: without a
    # flush from an unbuffered upstream, gzip holds output until its buffers fill. (Plain
    # buffering alone hands small reads on at once often enough to make a flaky control.)
    defaults = {
        "proxy_buffering off;": "proxy_buffering on;\n"
        "            proxy_ignore_headers X-Accel-Buffering;\n"
        "            gzip on; gzip_proxied any; gzip_min_length 1;\n"
        "            gzip_types text/event-stream;",
        "proxy_http_version 1.1;": "",
        'proxy_set_header Connection "";': "",
        "keepalive 16;": "",
    }
    n, gap = 40, 0.02
    with (
        nginx(upstream=f"127.0.0.1:{server.port}") as documented,
        nginx(upstream=f"127.0.0.1:{server.port}", edits=defaults) as buffering,
    ):
        written, (direct, proxied, batched) = await latencies(
            http,
            live=[server.url + path, documented + path],
            held=buffering + path,
            op=op,
            n=n,
            gap=gap,
        )
    report = f"direct {ms(direct)}; documented {ms(proxied)}; buffering {ms(batched)}"
    print(report)
    # Through the documented config: each event on its own, as fast as direct.
    assert statistics.median(proxied) - statistics.median(direct) < 0.010, report
    assert all(p - d < 0.050 for p, d in zip(proxied, direct, strict=True)), report
    assert bursts(proxied, written=written) >= n * 3 // 4, report
    # The control: held back and handed over in a few batches.
    assert bursts(batched, written=written) <= n // 4, report
    assert statistics.median(batched) > 0.100, report


async def test_heartbeats_keep_an_idle_stream_open_past_the_proxy_read_timeout(
    cluster: ControlPlane,
    redis_server: RedisServer,
    http: httpx.AsyncClient,
    kubectl: Kubectl,
    namespace: str,
    redis: aioredis.Redis,
) -> None:
    uid = create_run(kubectl, namespace)
    op = await sse_harness.FakeOperator(redis, uid=uid, run=f"{namespace}/r1").start()
    path = events.stream_path(namespace, "r1") + "?replay=none"
    short = {"proxy_read_timeout 3600s;": "proxy_read_timeout 1s;"}
    beating = sse_harness.LiveServer(
        sse_settings(cluster, redis_server.url, heartbeat_seconds=0.25)
    )
    silent = sse_harness.LiveServer(sse_settings(cluster, redis_server.url, heartbeat_seconds=60))
    async with beating, silent:
        with (
            nginx(upstream=f"127.0.0.1:{beating.port}", edits=short) as with_beats,
            nginx(upstream=f"127.0.0.1:{silent.port}", edits=short) as without,
        ):
            # Before the streams open: NGINX's read timeout runs from the response headers,
            # which each tap has received by the time it is entered.
            opened = time.monotonic()
            async with (
                sse_harness.StreamTap(http, with_beats + path) as kept,
                sse_harness.StreamTap(http, without + path) as cut,
            ):
                # Without heartbeats NGINX ends the stream after its 1 s read timeout...
                assert await cut.until_closed(timeout=10, heartbeats=True) == []
                assert 0.9 < time.monotonic() - opened < 5
                # ...while the one with heartbeats lives on past it, idle but for them.
                beats = 0
                while time.monotonic() - opened < 2.5:
                    await kept.heartbeat(timeout=2)
                    beats += 1
                assert beats >= 5 and not kept.closed
                event_id = await op.emit("token", {"text": "still here", "node": "act"})
                msg = await kept.next()
                assert msg.id == event_id
