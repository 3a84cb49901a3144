"""Scenario 3 of the fault suite: Redis restarted (AOF on) mid-run, and Redis unreachable for a
while, under a real operator process, a real SSE server process and viewers.

Covers: after a restart the streams, checkpoints and call records are all there (a run
waiting for approval before the restart goes on from its checkpoint without asking the
model again), the operator and the SSE server reconnect by themselves (same processes), the
viewers get every event once. During an outage longer than the clients' own retries: the
operator stays up (same PID, healthy), runs wait and say why in their status, a run created
meanwhile starts once Redis is back, deleting a run is not wedged (and its keys are removed
once Redis is back); afterwards every run finishes with a clean stream.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import re
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis as redis_sync
from faults.conftest import Figures, count
from faults.fault_support import (
    Follower,
    SSEProcess,
    all_finished,
    append_call,
    approvals_of,
    create_target,
    decide,
    executions,
    fault_namespace,
    redis_ids,
    start_operator,
)

from agentrun_harness.controlplane import ControlPlane
from agentrun_harness.redisserver import RedisServer
from agentrun_operator import events

from support import (
    Kubectl,
    OperatorProcess,
    Script,
    assert_clean_stream,
    create_run,
    get_run,
    marker,
    stream,
    wait_event,
    wait_for,
    wait_phase,
)

SCENARIO = "Redis restart and outage"
# Longer than the clients' own retries (about 9 s), so the operator's handling is tested.
OUTAGE_SECONDS = count(30, 20)
CLEANUP_SECONDS = 5  # AGENTRUN_REDIS_CLEANUP_SECONDS: how long a deletion waits for Redis


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(workdir=tmp_path_factory.mktemp("redis-faults"), appendonly=True) as server:
        yield server


@pytest.fixture(scope="module")
def redis_operator(
    cluster: ControlPlane,
    rbac: None,
    webhooks: object,
    own_redis: RedisServer,
    script: Script,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    with start_operator(
        cluster,
        redis_url=own_redis.url,
        script=script,
        workdir=tmp_path_factory.mktemp("operator-redis"),
        namespaces="fredis-*",
        env={"AGENTRUN_REDIS_CLEANUP_SECONDS": str(CLEANUP_SECONDS)},
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def redis_sse(
    cluster: ControlPlane, own_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SSEProcess]:
    with SSEProcess(
        plane=cluster, redis_url=own_redis.url, workdir=tmp_path_factory.mktemp("sse-redis")
    ) as proc:
        yield proc


@pytest.fixture
def namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    yield from fault_namespace(kubectl, request, "fredis-")


@pytest.fixture
def r(own_redis: RedisServer) -> Iterator[redis_sync.Redis]:
    client = redis_sync.Redis.from_url(own_redis.url)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _logs_on_failure(
    request: pytest.FixtureRequest, redis_operator: OperatorProcess, redis_sse: SSEProcess
) -> Iterator[None]:
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"--- operator log ---\n{redis_operator.log_tail(150)}")
        print(f"--- sse log ---\n{redis_sse.log_tail(40)}")


def paced(text: str) -> dict[str, Any]:
    return {"text": text, "tokens_per_second": 12}


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{k}" for k in range(n))


def streaming_run(
    kubectl: Kubectl, namespace: str, script: Script, name: str, *, n: int = 30
) -> str:
    """Plan, one appending tool call, an answer: each reply streamed over a few seconds."""
    create_target(kubectl, namespace, name)
    goal = script.add(
        marker(name),
        [
            paced(words("p", n)),
            {**paced(words("a", n)), "tool_calls": [append_call(name, f"{name}-1")]},
            paced(words("f", n)),
        ],
    )
    return create_run(
        kubectl,
        namespace,
        name,
        goal=goal,
        serviceAccountName="agent",
        tools=["k8s_patch"],
        approval={"required": []},
    )


async def follow(sse: SSEProcess, namespace: str, name: str, token: str) -> Follower:
    follower = Follower(
        url=f"{sse.url}{events.stream_path(namespace, name)}",
        token=token,
        rng=random.Random(1),
    )
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as http:
        await follower.run(http, deadline=time.monotonic() + 300)
    return follower


def healthy(operator: OperatorProcess) -> bool:
    try:
        url = f"http://127.0.0.1:{operator.health_port}/healthz"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.mark.timeout(300)
async def test_a_redis_restart_mid_run_loses_nothing_and_everyone_reconnects(
    cluster: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    r: redis_sync.Redis,
    script: Script,
    own_redis: RedisServer,
    redis_operator: OperatorProcess,
    redis_sse: SSEProcess,
    figures: Figures,
) -> None:
    operator_pid, sse_pid = redis_operator.proc.pid, redis_sse.pid  # type: ignore[union-attr]
    starts = redis_operator.starts
    names = ["s1", "s2"]
    uids = {n: await asyncio.to_thread(streaming_run, kubectl, namespace, script, n) for n in names}
    create_target(kubectl, namespace, "a1")
    approve_goal = script.add(
        marker("a1"),
        [
            {"text": "plan: append"},
            {"text": "appending", "tool_calls": [append_call("a1", "a1-1")]},
            {"text": "done"},
        ],
    )
    uids["a1"] = create_run(
        kubectl, namespace, "a1", goal=approve_goal, serviceAccountName="agent", tools=["k8s_patch"]
    )
    token = cluster.token("admin")
    viewers = [asyncio.create_task(follow(redis_sse, namespace, n, token)) for n in names]
    await asyncio.to_thread(wait_phase, kubectl, namespace, "a1", "AwaitingApproval")
    for n in names:
        await asyncio.to_thread(
            wait_event, r, uids[n], f"{n} streaming tokens", lambda e: e["type"] == "token"
        )
    calls_before = script.calls_for(approve_goal)

    began, restarted_at = time.monotonic(), time.time()
    await asyncio.to_thread(own_redis.stop)  # SIGTERM: Redis writes its AOF out and exits
    await asyncio.to_thread(own_redis.start)  # same port, same directory: the AOF is loaded
    downtime = time.monotonic() - began

    [approval] = approvals_of(kubectl, namespace, "a1")
    decide(kubectl, namespace, approval["metadata"]["name"], "Approved")
    statuses = await asyncio.to_thread(
        all_finished, kubectl, namespace, [*names, "a1"], timeout=120
    )
    async with asyncio.timeout(60):
        followers = await asyncio.gather(*viewers)

    assert {n: s["phase"] for n, s in statuses.items()} == dict.fromkeys(
        [*names, "a1"], "Succeeded"
    )
    for n in [*names, "a1"]:
        evs = stream(r, uids[n])
        assert_clean_stream(evs)
        assert executions(kubectl, namespace, n).tags == [f"{n}-1"], f"{n}: executed once"
        if n in names:  # it was streaming when Redis went away, and went on after
            tokens = [
                dt.datetime.fromisoformat(e["ts"]).timestamp() for e in evs if e["type"] == "token"
            ]
            assert min(tokens) < restarted_at < max(tokens), f"{n} was not streaming"
    for n, f in zip(names, followers, strict=True):
        assert f.got == redis_ids(r, uids[n]), f"viewer of {n}: {f.faults(redis_ids(r, uids[n]))}"
    # The checkpoint of the waiting run survived: it went on without planning again.
    assert script.calls_for(approve_goal) - calls_before == 2  # the answer, then verify
    assert redis_operator.proc.pid == operator_pid and redis_operator.starts == starts  # type: ignore[union-attr]
    assert redis_sse.pid == sse_pid and redis_sse.proc.poll() is None  # type: ignore[union-attr]
    figures.record(SCENARIO, "Redis restart (AOF) downtime (s)", round(downtime, 2))
    figures.record(
        SCENARIO,
        "runs across the restart: finished / events lost or duplicated",
        f"{len(statuses)}/{len(statuses)} / 0",
        "all / 0",
    )
    figures.record(SCENARIO, "operator and SSE server restarts after a Redis restart", 0, "0")


@pytest.mark.timeout(count(420, 300))
async def test_redis_unreachable_for_a_while_runs_wait_nothing_crash_loops_deletion_goes_through(
    cluster: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    r: redis_sync.Redis,
    script: Script,
    own_redis: RedisServer,
    redis_operator: OperatorProcess,
    redis_sse: SSEProcess,
    figures: Figures,
) -> None:
    operator_pid, sse_pid = redis_operator.proc.pid, redis_sse.pid  # type: ignore[union-attr]
    starts = redis_operator.starts
    uids = {
        "long": await asyncio.to_thread(streaming_run, kubectl, namespace, script, "long", n=90),
        "gone": await asyncio.to_thread(streaming_run, kubectl, namespace, script, "gone", n=90),
    }
    token = cluster.token("admin")
    viewer = asyncio.create_task(follow(redis_sse, namespace, "long", token))
    for n in uids:
        await asyncio.to_thread(
            wait_event, r, uids[n], f"{n} streaming tokens", lambda e: e["type"] == "token"
        )

    down_at = time.monotonic()
    await asyncio.to_thread(own_redis.stop)
    try:
        late_goal = script.add(marker("late"), [{"text": "plan"}, {"text": "done"}])
        uids["late"] = create_run(kubectl, namespace, "late", goal=late_goal)

        def delete() -> float:
            began = time.monotonic()
            kubectl("delete", "agentrun", "gone", "-n", namespace, "--timeout=60s")
            return time.monotonic() - began

        deleting = asyncio.create_task(asyncio.to_thread(delete))

        def waiting_with_a_reason() -> str | None:
            st = get_run(kubectl, namespace, "long").get("status") or {}
            message = str(st.get("message"))
            return message if "redis" in message.lower() else None

        reason = await asyncio.to_thread(
            wait_for,
            "the running run to say in its status that it waits for Redis",
            waiting_with_a_reason,
            timeout=OUTAGE_SECONDS - (time.monotonic() - down_at) - 1,
        )
        deletion_took = await deleting
        assert healthy(redis_operator), "the operator's liveness failed during the outage"
        remaining = OUTAGE_SECONDS - (time.monotonic() - down_at)
        if remaining > 0:
            await asyncio.sleep(remaining)  # the outage lasts this long: the fault itself
        assert redis_operator.proc.pid == operator_pid  # type: ignore[union-attr]
        assert healthy(redis_operator)
    finally:
        await asyncio.to_thread(own_redis.start)
    outage = time.monotonic() - down_at

    statuses = await asyncio.to_thread(
        all_finished, kubectl, namespace, ["long", "late"], timeout=180
    )
    async with asyncio.timeout(60):
        follower = await viewer
    phases = {n: s["phase"] for n, s in statuses.items() if n in ("long", "late")}
    assert phases == {"long": "Succeeded", "late": "Succeeded"}, {
        n: (s.get("phase"), s.get("message")) for n, s in statuses.items()
    }
    for n in ("long", "late"):
        assert_clean_stream(stream(r, uids[n]))
    assert executions(kubectl, namespace, "long").tags == ["long-1"]
    assert follower.got == redis_ids(r, uids["long"])
    # The deleted run's keys: cleaned up once Redis is back.
    await asyncio.to_thread(
        wait_for,
        "the Redis keys of the run deleted during the outage to go",
        lambda: r.keys(events.run_keys_pattern(uids["gone"])) == [],
        timeout=60,
    )
    assert redis_operator.proc.pid == operator_pid and redis_operator.starts == starts  # type: ignore[union-attr]
    assert redis_sse.pid == sse_pid
    figures.record(SCENARIO, "Redis unreachable (s)", round(outage, 1), f">= {OUTAGE_SECONDS}")
    figures.record(SCENARIO, "operator restarts during the outage", 0, "0")
    # The message without the error's details: "Waiting: Redis is unreachable (…); …"
    figures.record(
        SCENARIO, "status message while waiting", re.sub(r" \(.*?\)\)?;", " (…);", str(reason))
    )
    figures.record(
        SCENARIO,
        "deleting a run during the outage took (s)",
        round(deletion_took, 1),
        f"<= {CLEANUP_SECONDS} + API time",
    )
    figures.record(
        SCENARIO, "runs finished after the outage (in flight + created during it)", "2/2", "2/2"
    )
