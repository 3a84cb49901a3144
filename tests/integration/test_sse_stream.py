"""The SSE server's event streams, end to end: real kube-apiserver (the caller's token opens
each stream), real Redis, real uvicorn on a socket, events appended by the operator's own
fenced writer.

Covers: replay from Last-Event-ID (header and ``lastEventId``), live tail, reconnects
mid-stream with no gap and no duplicate (by ``seq``), ``replay=none``, heartbeats carrying
the phase, closing after ``end`` (and 204 once nothing is left), ``trimmed`` after MAXLEN
trimming, one Redis reader shared by many viewers, a slow viewer disconnected with a reason
while the others keep up (bounded memory) and its resume, a Redis restart under open
streams, the metrics, and a clean shutdown on SIGTERM with streams open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from redis import asyncio as aioredis

from agentrun_harness import sse as sse_harness
from agentrun_harness.controlplane import ControlPlane, free_port
from agentrun_harness.redisserver import RedisServer
from agentrun_operator import events
from agentrun_operator import sseclient as client

from sse_support import StuckViewer, create_run, sse_settings
from support import Kubectl, decoded

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def http(cluster: ControlPlane) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {cluster.token('admin')}"}
    async with httpx.AsyncClient(headers=headers, timeout=30) as c:
        yield c


class Run:
    def __init__(self, namespace: str, name: str, uid: str, op: sse_harness.FakeOperator) -> None:
        self.namespace, self.name, self.uid, self.op = namespace, name, uid, op

    def url(self, server: sse_harness.LiveServer | str, query: str = "") -> str:
        base = server if isinstance(server, str) else server.url
        return f"{base}{events.stream_path(self.namespace, self.name)}{query}"


@pytest.fixture
async def run(kubectl: Kubectl, namespace: str, redis: aioredis.Redis) -> Run:
    uid = create_run(kubectl, namespace)
    op = await sse_harness.FakeOperator(redis, uid=uid, run=f"{namespace}/r1").start()
    return Run(namespace, "r1", uid, op)


def seqs(messages: list[client.Message]) -> list[int]:
    return [m.json()["seq"] for m in messages if m.id is not None]


async def test_replay_from_the_last_event_id_header_then_close_after_end(
    server: sse_harness.LiveServer, http: httpx.AsyncClient, run: Run
) -> None:
    ids = await run.op.tokens(5)
    async with sse_harness.StreamTap(
        http, run.url(server), headers={"Last-Event-ID": ids[1]}
    ) as tap:
        assert tap.status == 200
        assert tap.headers["cache-control"] == "no-cache"
        assert tap.headers["x-accel-buffering"] == "no"
        assert tap.headers["content-type"].startswith("text/event-stream")
        got = await tap.take(3)
        assert [m.id for m in got] == ids[2:]
        assert [m.event for m in got] == ["token"] * 3
        assert seqs(got) == [3, 4, 5]
        assert got[0].json()["data"] == {"text": "t2 ", "node": "act"}
        end_id = await run.op.end()
        rest = await tap.until_closed()
        assert [(m.id, m.event) for m in rest] == [(end_id, "end")]


async def test_replay_from_the_last_event_id_query_parameter(
    server: sse_harness.LiveServer, http: httpx.AsyncClient, run: Run
) -> None:
    ids = await run.op.tokens(4)
    await run.op.end()
    async with sse_harness.StreamTap(http, run.url(server, f"?lastEventId={ids[2]}")) as tap:
        got = await tap.until_closed()
    assert seqs(got) == [4, 5]
    assert [m.event for m in got] == ["token", "end"]


async def test_full_replay_then_the_live_tail_with_heartbeats_carrying_the_phase(
    server: sse_harness.LiveServer, http: httpx.AsyncClient, run: Run
) -> None:
    await run.op.emit("workflow", {"state": "planning", "node": "plan", "step": 1})
    await run.op.tokens(2)
    async with sse_harness.StreamTap(http, run.url(server)) as tap:
        assert seqs(await tap.take(3)) == [1, 2, 3]
        beat = await tap.heartbeat()  # live now: heartbeats come only from the live tail
        assert beat.id is None
        assert beat.json()["phase"] == "Running"
        assert beat.json()["ts"].endswith("Z")
        await run.op.emit("workflow", {"state": "awaiting_approval", "node": "gate", "step": 1})
        assert (await tap.next()).json()["seq"] == 4
        assert (await tap.heartbeat()).json()["phase"] == "AwaitingApproval"
        await run.op.tokens(2, start=2)
        await run.op.end("Stopped")
        rest = await tap.until_closed()
        assert seqs(rest) == [5, 6, 7]
        assert rest[-1].json()["data"]["phase"] == "Stopped"


async def test_a_new_run_without_status_heartbeats_pending(
    server: sse_harness.LiveServer, http: httpx.AsyncClient, run: Run
) -> None:
    async with sse_harness.StreamTap(http, run.url(server)) as tap:
        assert (await tap.heartbeat()).json()["phase"] == "Pending"


async def test_replay_none_sends_only_live_events(
    server: sse_harness.LiveServer, http: httpx.AsyncClient, run: Run
) -> None:
    await run.op.tokens(3)
    async with sse_harness.StreamTap(http, run.url(server, "?replay=none")) as tap:
        await tap.heartbeat()
        await run.op.tokens(2, start=3)
        await run.op.end()
        assert seqs(await tap.until_closed()) == [4, 5, 6]


async def test_reconnects_mid_stream_lose_nothing_and_repeat_nothing(
    server: sse_harness.LiveServer, http: httpx.AsyncClient, run: Run
) -> None:
    total = 300

    async def produce() -> None:
        for i in range(total):
            await run.op.emit("token", {"text": f"x{i}", "node": "act"})
            if i % 10 == 0:
                await asyncio.sleep(0.002)  # spread over time, so drops land mid-flow
        await run.op.end()

    producer = asyncio.create_task(produce())
    seen: list[int] = []
    last: str | None = None
    reconnects = 0
    while True:
        headers = {"Last-Event-ID": last} if last else {}
        async with sse_harness.StreamTap(http, run.url(server), headers=headers) as tap:
            try:
                for _ in range(37):  # then drop the connection, mid-stream
                    msg = await tap.next()
                    seen.append(msg.json()["seq"])
                    last = msg.id
                    if msg.event == "end":
                        break
            except sse_harness.StreamClosed:
                break
        if msg.event == "end":
            break
        reconnects += 1
    await producer
    assert reconnects >= 5
    assert seen == list(range(1, total + 2)), "a gap or a duplicate across reconnects"


async def test_reconnecting_after_the_end_gets_204(
    server: sse_harness.LiveServer, http: httpx.AsyncClient, run: Run
) -> None:
    await run.op.tokens(1)
    end_id = await run.op.end()
    r = await http.get(run.url(server), headers={"Last-Event-ID": end_id})
    assert r.status_code == 204
    r = await http.get(run.url(server, "?replay=none"))
    assert r.status_code == 204


async def test_a_replay_from_before_trimmed_history_begins_with_trimmed(
    server: sse_harness.LiveServer,
    http: httpx.AsyncClient,
    kubectl: Kubectl,
    namespace: str,
    redis: aioredis.Redis,
) -> None:
    uid = create_run(kubectl, namespace)
    # MAXLEN ~ 10: Redis trims whole nodes of 100 entries, so 250 events lose some.
    op = await sse_harness.FakeOperator(redis, uid=uid, run=f"{namespace}/r1", maxlen=10).start()
    run = Run(namespace, "r1", uid, op)
    ids = await run.op.tokens(250)
    [first] = decoded(await redis.xrange(events.events_key(run.uid), count=1))
    first_id = first["id"]
    assert first_id != ids[0], "MAXLEN trimmed nothing; the test needs trimmed history"
    first_seq = ids.index(first_id) + 1
    await run.op.end()
    async with sse_harness.StreamTap(
        http, run.url(server), headers={"Last-Event-ID": ids[0]}
    ) as tap:
        got = await tap.until_closed()
    assert got[0].event == "trimmed" and got[0].id is None
    assert got[0].json() == {"firstId": first_id}
    assert seqs(got[1:]) == list(range(first_seq, 252))
    # From an id still in the stream: no trimmed event.
    async with sse_harness.StreamTap(
        http, run.url(server), headers={"Last-Event-ID": ids[-2]}
    ) as tap:
        got = await tap.until_closed()
    assert [m.event for m in got] == ["token", "end"]


async def test_many_viewers_of_one_run_share_one_redis_reader(
    server: sse_harness.LiveServer, http: httpx.AsyncClient, run: Run, redis: aioredis.Redis
) -> None:
    hub = server.ctx.hub
    started, xreads = hub.stats.readers_started, hub.stats.xread_calls
    viewers = 25
    async with contextlib.AsyncExitStack() as stack:
        taps = [
            await stack.enter_async_context(sse_harness.StreamTap(http, run.url(server)))
            for _ in range(viewers)
        ]
        await asyncio.gather(*(t.heartbeat() for t in taps))  # all live
        assert hub.readers_of(run.uid) == 1
        assert hub.stats.readers_started - started == 1
        clients = await redis.client_list()
        # Connections blocked in XREAD right now (flag b): this run's reader, and at most
        # the lingering readers of earlier tests' runs.
        blocked = [c for c in clients if c.get("cmd") == "xread" and "b" in c.get("flags", "")]
        assert 1 <= len(blocked) <= hub.active_readers, blocked
        await run.op.tokens(40)
        await run.op.end()
        results = await asyncio.gather(*(t.until_closed() for t in taps))
    assert all(seqs(r) == list(range(1, 42)) for r in results)
    # One reader's XREADs, not one per viewer (it may read the 41 events in a few batches).
    assert hub.stats.xread_calls - xreads <= 45


async def test_metrics_count_streams_events_and_latency(
    server: sse_harness.LiveServer, http: httpx.AsyncClient, run: Run
) -> None:
    async with sse_harness.StreamTap(http, run.url(server)) as tap:
        await tap.heartbeat()
        text = (await http.get(f"{server.url}/metrics")).text
        assert "agentrun_sse_open_streams 1.0" in text or "agentrun_sse_open_streams" in text
        await run.op.tokens(3)
        await run.op.end()
        await tap.until_closed()
    text = (await http.get(f"{server.url}/metrics")).text
    for name in (
        "agentrun_sse_events_sent_total",
        "agentrun_sse_replay_events_bucket",
        "agentrun_sse_delivery_latency_seconds_bucket",
        "agentrun_sse_redis_readers",
    ):
        assert name in text, name
    sent = next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("agentrun_sse_events_sent_total")
    )
    assert sent >= 4


# -- a slow viewer ---------------------------------------------------------------------
async def test_a_slow_viewer_is_cut_off_with_a_reason_while_the_others_keep_up(
    cluster: ControlPlane,
    redis_server: RedisServer,
    http: httpx.AsyncClient,
    run: Run,
) -> None:
    queue = 32
    conf = sse_settings(cluster, redis_server.url, viewer_queue=queue, read_count=16)
    async with sse_harness.LiveServer(conf) as small:
        hub = small.ctx.hub
        slow = StuckViewer(
            small.port, events.stream_path(run.namespace, run.name), cluster.token("admin")
        )
        await slow.open()
        async with contextlib.AsyncExitStack() as stack:
            fast = [
                await stack.enter_async_context(sse_harness.StreamTap(http, run.url(small)))
                for _ in range(3)
            ]
            await asyncio.gather(*(t.heartbeat() for t in fast))
            # Big events, paced by the fast viewers: they never fall behind, while the slow
            # one's socket buffers fill and then its queue.
            total, text = 400, "y" * 8000
            received = [0, 0, 0]
            for start in range(0, total, 8):
                for i in range(start, start + 8):
                    await run.op.emit("token", {"text": text, "node": "act", "i": i})
                for k, tap in enumerate(fast):
                    while received[k] < start + 8:
                        received[k] = (await tap.next()).json()["seq"]
            assert hub.stats.lagged_viewers == 1, "the slow viewer was never cut off"
            assert hub.stats.deepest_queue <= queue
            assert hub.viewers_of(run.uid) == 3  # the slow one is gone, its queue freed
            await run.op.end()
            for tap in fast:
                assert seqs(await tap.until_closed()) == [total + 1]
        got, _ = await slow.read_all()
        assert got[-1].event == "lagged"
        reason = got[-1].json()
        assert "fell behind" in reason["reason"]
        sent = [m for m in got if m.id is not None]
        assert seqs(sent) == list(range(1, len(sent) + 1))
        assert reason["lastId"] == sent[-1].id
        # It resumes by id and misses nothing.
        async with sse_harness.StreamTap(
            http, run.url(small), headers={"Last-Event-ID": reason["lastId"]}
        ) as tap:
            rest = await tap.until_closed()
        assert seqs(rest) == list(range(len(sent) + 1, total + 2))


async def test_streams_survive_a_redis_restart(
    cluster: ControlPlane, kubectl: Kubectl, namespace: str, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    own = RedisServer(workdir=tmp_path / "redis")
    own.start()
    redis = events.connect(own.url)
    try:
        uid = create_run(kubectl, namespace)
        op = await sse_harness.FakeOperator(redis, uid=uid, run=f"{namespace}/r1").start()
        async with sse_harness.LiveServer(sse_settings(cluster, own.url)) as srv:
            url = f"{srv.url}{events.stream_path(namespace, 'r1')}"
            await op.tokens(2)
            async with sse_harness.StreamTap(http, url) as tap:
                assert seqs(await tap.take(2)) == [1, 2]
                await tap.heartbeat()
                own.stop()
                assert (await http.get(f"{srv.url}/readyz")).status_code == 503
                own.start()  # same port, same AOF: the stream and the lease are back
                await op.tokens(2, start=2)
                await op.end()
                assert seqs(await tap.until_closed(timeout=20)) == [3, 4, 5]
            assert (await http.get(f"{srv.url}/readyz")).status_code == 200
    finally:
        await redis.aclose()
        own.stop()


async def test_sigterm_ends_open_streams_cleanly_and_exits(
    cluster: ControlPlane, redis_server: RedisServer, run: Run, http: httpx.AsyncClient
) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AGENTRUN_")},
        "KUBECONFIG": str(cluster.kubeconfig("admin")),
        "AGENTRUN_REDIS_URL": redis_server.url,
        "AGENTRUN_SSE_HOST": "127.0.0.1",
        "AGENTRUN_SSE_PORT": str(port),
        "AGENTRUN_HEARTBEAT_SECONDS": "0.2",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentrun_sse"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        async with asyncio.timeout(20):
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"{base}/healthz")).status_code == 200:
                        break
                assert proc.poll() is None, "the server exited at start"
                await asyncio.sleep(0.05)  # a child process: polling /healthz is its signal
        await run.op.tokens(1)
        async with sse_harness.StreamTap(http, run.url(base)) as tap:
            await tap.take(1)
            await tap.heartbeat()
            proc.send_signal(signal.SIGTERM)
            await tap.until_closed(timeout=10, heartbeats=True)
            assert tap.error is None, f"the stream broke instead of ending: {tap.error!r}"
        out, _ = await asyncio.to_thread(proc.communicate, None, 15)
        output = out.decode()
        # uvicorn re-raises the signal it handled once it has shut down, as a process
        # stopped by SIGTERM conventionally ends.
        assert proc.returncode in (0, -signal.SIGTERM), output
        assert "Finished server process" in output
        assert "Cancel" not in output, "uvicorn had to cancel a stream at its timeout"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


async def test_agentrun_watch_reads_the_stream_through_the_server_as_the_person(
    server: sse_harness.LiveServer, run: Run, cluster: ControlPlane
) -> None:
    await run.op.emit("workflow", {"state": "planning", "node": "plan", "step": 1})
    await run.op.tokens(3)
    await run.op.end()

    async def watch(user: str) -> subprocess.CompletedProcess[str]:
        args = ["watch", f"{run.namespace}/{run.name}", "--server", server.url]
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig(user))}
        env.pop("AGENTRUN_REDIS_URL", None)  # nothing but the server is asked
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentrun_operator.cli",
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())

    watched = await watch("admin")
    assert watched.returncode == 0, watched.stderr
    assert "── planning (node plan, step 1)" in watched.stdout
    assert "t0 t1 t2" in watched.stdout and "■ Succeeded" in watched.stdout
    # The server opens the stream only for people the API server lets read the run.
    refused = await watch("nobody")
    assert refused.returncode == 1
    assert f"you may not read AgentRun {run.namespace}/{run.name} (403" in refused.stderr
    assert "t0" not in refused.stdout
