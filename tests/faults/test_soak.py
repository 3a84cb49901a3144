"""Scenario 8 of the fault suite: a soak of many sequential runs, each watched to its end
through the SSE server and deleted by its ``ttlSecondsAfterFinished``.

Covers: every run succeeds with a clean stream seen whole by its viewer; the operator's and
the SSE server's resident memory, measured after a warm-up and again at the end, grow less
than a stated bound; once the TTLs have deleted every run, Redis holds no key of any of
them and its memory is back near where it started.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator

import httpx
import pytest
import redis as redis_sync
from faults.conftest import Figures, count
from faults.fault_support import Follower, SSEProcess, fault_namespace, rss_mib, start_operator

from agentrun_harness.controlplane import ControlPlane
from agentrun_harness.redisserver import RedisServer
from agentrun_operator import events

from support import Kubectl, OperatorProcess, Script, create_run, marker, newest_only, wait_for

pytestmark = newest_only(
    "the SSE server and Redis under load do not depend on the Kubernetes version"
)

SCENARIO = "Soak"
RUNS = count(500, 60)
WARMUP = count(50, 10)  # runs before the memory baseline: imports, caches, allocator pools
# Bounds on growth from the baseline to the end. Measured here: the operator grows about
# 3 MiB over 450 runs and then stays flat (allocator pools), the SSE server not at all. A
# leak of 10 KiB per run fails the full counts (a cache that kept every run's AgentRun
# body, some 25 KiB each, was caught this way).
OPERATOR_GROWTH_MIB = 10.0
SSE_GROWTH_MIB = 5.0
REDIS_GROWTH_KIB = 256.0


@pytest.fixture(scope="module")
def soak_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(workdir=tmp_path_factory.mktemp("redis-soak")) as server:
        yield server


@pytest.fixture(scope="module")
def soak_operator(
    cluster: ControlPlane,
    rbac: None,
    webhooks: object,
    soak_redis: RedisServer,
    script: Script,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    with start_operator(
        cluster,
        redis_url=soak_redis.url,
        script=script,
        workdir=tmp_path_factory.mktemp("operator-soak"),
        namespaces="fsoak-*",
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def soak_sse(
    cluster: ControlPlane, soak_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SSEProcess]:
    with SSEProcess(
        plane=cluster, redis_url=soak_redis.url, workdir=tmp_path_factory.mktemp("sse-soak")
    ) as proc:
        yield proc


@pytest.fixture
def namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    yield from fault_namespace(kubectl, request, "fsoak-")


def redis_memory(r: redis_sync.Redis) -> tuple[int, int]:
    """(used_memory in bytes, number of keys)."""
    return int(r.info("memory")["used_memory"]), int(r.dbsize())


def runs_left(kubectl: Kubectl, namespace: str) -> int:
    out = kubectl("get", "agentruns", "-n", namespace, "-o", "json")
    return len(json.loads(out.stdout)["items"])


def no_run_keys_left(kubectl: Kubectl, namespace: str, r: redis_sync.Redis, keys: int) -> None:
    wait_for(
        "every run to be deleted by its TTL",
        lambda: runs_left(kubectl, namespace) == 0,
        timeout=120,
        interval=0.5,
    )
    wait_for("Redis to hold no key of any run", lambda: redis_memory(r)[1] <= keys, timeout=60)


@pytest.mark.timeout(count(3600, 420))
async def test_many_sequential_runs_leave_no_growth_behind(
    cluster: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    script: Script,
    soak_redis: RedisServer,
    soak_operator: OperatorProcess,
    soak_sse: SSEProcess,
    figures: Figures,
) -> None:
    r = redis_sync.Redis.from_url(soak_redis.url)
    assert soak_operator.proc is not None
    operator_pid = soak_operator.proc.pid
    token = cluster.token("admin")
    goal = script.add(
        marker("soak"),
        [{"text": "plan: look at the namespace"}, {"text": "nothing to change " * 20}],
    )
    mem_start, keys_start = redis_memory(r)
    rss: dict[str, float] = {}
    lost = 0
    failed: list[str] = []
    began = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as http:
        for i in range(RUNS):
            if i == (WARMUP + RUNS) // 2:
                rss_mid = {"operator": rss_mib(operator_pid), "sse": rss_mib(soak_sse.pid)}
            if i == WARMUP:
                # The baseline: warm processes, and the warm-up runs gone by their TTLs
                # (Redis then holds its one-time costs: connections, the script cache).
                await asyncio.to_thread(no_run_keys_left, kubectl, namespace, r, keys_start)
                rss = {"operator": rss_mib(operator_pid), "sse": rss_mib(soak_sse.pid)}
                mem_warm = redis_memory(r)[0]
                warm_at = time.monotonic()
            name = f"soak-{i:04d}"
            uid = await asyncio.to_thread(
                create_run,
                kubectl,
                namespace,
                name,
                goal=f"{goal} run {i}",
                ttlSecondsAfterFinished=1,
            )
            viewer = Follower(
                url=f"{soak_sse.url}{events.stream_path(namespace, name)}",
                token=token,
                rng=random.Random(i),
            )
            await viewer.run(http, deadline=time.monotonic() + 60)
            if viewer.seqs != list(range(1, len(viewer.seqs) + 1)):
                lost += 1
            assert viewer.end is not None, f"{name}: no end"
            phase = viewer.end["data"]["phase"]
            if phase != "Succeeded":
                failed.append(f"{name}: {phase}")
                print(f"{name} ({uid}) ended {phase}")
    took = time.monotonic() - began
    per_run = (time.monotonic() - warm_at) / (RUNS - WARMUP)
    rss_end = {"operator": rss_mib(operator_pid), "sse": rss_mib(soak_sse.pid)}

    await asyncio.to_thread(no_run_keys_left, kubectl, namespace, r, keys_start)
    mem_end, keys_end = redis_memory(r)
    r.close()
    assert soak_operator.proc.pid == operator_pid and soak_operator.proc.poll() is None
    growth = {k: rss_end[k] - rss[k] for k in rss}
    figures.record(
        SCENARIO,
        "sequential runs (each streamed to its end, TTL 1 s) / of them warm-up",
        f"{RUNS} / {WARMUP}",
    )
    figures.record(SCENARIO, "runs not Succeeded", len(failed), "0")
    figures.record(SCENARIO, "runs whose viewer missed an event", lost, "0")
    figures.record(SCENARIO, "time per run (s)", round(per_run, 2))
    figures.record(
        SCENARIO,
        "operator RSS after the warm-up / halfway / at the end (MiB)",
        f"{rss['operator']:.0f} / {rss_mid['operator']:.0f} / {rss_end['operator']:.0f}",
        f"growth < {OPERATOR_GROWTH_MIB:.0f}",
    )
    figures.record(
        SCENARIO,
        "SSE server RSS after the warm-up / halfway / at the end (MiB)",
        f"{rss['sse']:.0f} / {rss_mid['sse']:.0f} / {rss_end['sse']:.0f}",
        f"growth < {SSE_GROWTH_MIB:.0f}",
    )
    figures.record(
        SCENARIO,
        "Redis used_memory empty / after the warm-up / at the end, runs deleted (KiB)",
        f"{mem_start / 1024:.0f} / {mem_warm / 1024:.0f} / {mem_end / 1024:.0f}",
        f"end - warm < {REDIS_GROWTH_KIB:.0f}",
    )
    figures.record(SCENARIO, "Redis keys before → after TTL", f"{keys_start} → {keys_end}", "same")
    figures.record(SCENARIO, "wall time (s)", round(took, 1))
    assert lost == 0 and not failed, failed
    assert growth["operator"] < OPERATOR_GROWTH_MIB, growth
    assert growth["sse"] < SSE_GROWTH_MIB, growth
    assert keys_end == keys_start
    assert mem_end - mem_warm < REDIS_GROWTH_KIB * 1024, (mem_start, mem_warm, mem_end)
