"""The run engine and the SSE server on a real Redis Cluster (three masters with one replica
each, from ``redis-server --cluster-enabled yes`` and ``redis-cli --cluster create``), with
``AGENTRUN_REDIS_CLUSTER=true`` (redis-py's cluster client).

Covers: a run with an approval runs to the end with a clean stream (every key of a run in
one hash slot: the fenced appends, call records, WATCH/MULTI checkpoints and the lease all
work unchanged); the SSE server streams a run from the cluster and replays from
Last-Event-ID; a master failing over (``CLUSTER FAILOVER`` on its replica) while runs stream
leaves every run finished with no gap and no duplicate; an operator told nothing about the
cluster refuses to start, naming the setting. Version-independent: newest Kubernetes only.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis as redis_sync
from langgraph.checkpoint import conformance
from redis.cluster import RedisCluster as SyncRedisCluster

from agentrun_harness import sse as sse_harness
from agentrun_harness.controlplane import ControlPlane
from agentrun_harness.rediscluster import RedisCluster
from agentrun_operator import checkpoint, events
from agentrun_operator import sseclient as sse_client

from sse_support import sse_settings
from support import (
    Kubectl,
    OperatorProcess,
    Script,
    all_running,
    approved_scale,
    assert_clean_stream,
    create_run,
    decoded,
    judged_namespace,
    marker,
    newest_only,
    own_operator,
    wait_for,
    wait_phase,
)

pytestmark = newest_only("Redis Cluster support does not depend on the Kubernetes version")


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with RedisCluster(workdir=tmp_path_factory.mktemp("redis-cluster")) as c:
        yield c


@pytest.fixture(scope="module")
def rc(redis_cluster: RedisCluster) -> Iterator[redis_sync.Redis]:
    client = SyncRedisCluster.from_url(redis_cluster.url)
    yield client  # type: ignore[misc]  # the cluster client answers the same commands
    client.close()


@pytest.fixture(scope="module")
def on_cluster(
    cluster: ControlPlane,
    rbac: None,
    webhooks: Any,
    redis_cluster: RedisCluster,
    script: Script,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    proc = own_operator(
        cluster, redis_url=redis_cluster.url, script=script, workdir=tmp_path_factory.mktemp("rc"),
        namespaces="rc-*", ident="op-rc", env={"AGENTRUN_REDIS_CLUSTER": "true"},
    )  # fmt: skip
    with proc:
        yield proc


@pytest.fixture
def namespace(
    kubectl: Kubectl, request: pytest.FixtureRequest, on_cluster: OperatorProcess
) -> Iterator[str]:
    yield from judged_namespace(kubectl, request, "rc-", ("operator (Redis Cluster)", on_cluster))


def stream_of(rc: redis_sync.Redis, uid: str) -> list[dict[str, Any]]:
    return decoded(rc.xrange(events.events_key(uid)))


def test_a_run_with_an_approval_runs_on_a_redis_cluster(
    kubectl: Kubectl, namespace: str, script: Script, rc: redis_sync.Redis
) -> None:
    uid, _, st = approved_scale(kubectl, namespace, script, "story")
    assert st["phase"] == "Succeeded", st
    evs = stream_of(rc, uid)
    assert_clean_stream(evs)
    tools = [(e["data"]["name"], e["data"]["status"]) for e in evs if e["type"] == "tool"]
    assert tools == [("k8s_scale", "started"), ("k8s_scale", "succeeded")]
    # All of the run's keys live in one slot (the hash tag), on one master.
    keys = [k.decode() for k in rc.scan_iter(match=events.run_keys_pattern(uid))]
    assert {events.events_key(uid), events.calls_key(uid)} <= set(keys), keys
    assert len({rc.keyslot(k) for k in keys}) == 1  # type: ignore[attr-defined]


async def _read(url: str, token: str, last_id: str | None = None) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=60)) as http:
        async for msg in sse_client.follow(
            http, url, headers=headers, last_id=last_id, max_reconnects=5, retry_delay=0.2
        ):
            if msg.event != "heartbeat":
                seen.append({**msg.json(), "id": msg.id})
    return seen


def test_the_sse_server_streams_and_replays_a_run_from_a_redis_cluster(
    cluster: ControlPlane,
    redis_cluster: RedisCluster,
    kubectl: Kubectl,
    namespace: str,
    script: Script,
    rc: redis_sync.Redis,
) -> None:
    words = " ".join(f"w{i}" for i in range(40))
    goal = script.add(
        marker("rc-sse"), [{"text": f"Plan {words}", "tokens_per_second": 200}, {"text": "ok"}]
    )

    async def story() -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
        conf = sse_settings(cluster, redis_cluster.url, redis_cluster=True)
        async with sse_harness.LiveServer(conf) as server:
            uid = create_run(kubectl, namespace, "watched", goal=goal)
            url = f"{server.url}/api/v1/runs/{namespace}/watched/events"
            live = await _read(url, cluster.token("admin"))
            middle = live[len(live) // 2]["id"]
            rest = await _read(url, cluster.token("admin"), last_id=middle)
            return live, rest, uid

    live, rest, uid = asyncio.run(asyncio.wait_for(story(), 90))
    assert_clean_stream(live)
    assert [e["id"] for e in live] == [e["id"] for e in stream_of(rc, uid)]
    assert [e["id"] for e in rest] == [e["id"] for e in live[len(live) // 2 + 1 :]]


def test_a_master_failover_while_runs_stream_loses_and_repeats_nothing(
    kubectl: Kubectl,
    namespace: str,
    script: Script,
    rc: redis_sync.Redis,
    redis_cluster: RedisCluster,
) -> None:
    words = " ".join(f"w{i}" for i in range(150))
    goal = script.add(
        marker("rc-failover"),
        [{"text": f"Plan {words}", "tokens_per_second": 60}, {"text": "done"}],
    )
    runs = [f"run-{i}" for i in range(6)]
    uids = {name: create_run(kubectl, namespace, name, goal=goal) for name in runs}

    def streaming() -> bool:
        return all(any(e["type"] == "token" for e in stream_of(rc, uid)) for uid in uids.values())

    wait_for("every run to stream tokens", streaming, timeout=60)
    # Fail over every master in turn: each run's slot moves once while its tokens flow.
    for port, role in sorted(redis_cluster.roles().items()):
        if role == "master":
            redis_cluster.failover(port)
    for name, uid in uids.items():
        st = wait_phase(kubectl, namespace, name, "Succeeded", "Failed", timeout=120)
        assert st["phase"] == "Succeeded", (name, st)
        assert_clean_stream(stream_of(rc, uid))


def test_a_stop_reaches_the_run_through_the_clusters_pub_sub(
    kubectl: Kubectl, namespace: str, script: Script, rc: redis_sync.Redis
) -> None:
    goal = script.add(
        marker("rc-stop"), [{"text": " ".join(["w"] * 3000), "tokens_per_second": 30}]
    )
    uid = create_run(kubectl, namespace, "stopped", goal=goal)
    wait_for("tokens", lambda: any(e["type"] == "token" for e in stream_of(rc, uid)), timeout=60)
    # The control channel, as the SSE server and the CLI send it: published on one node,
    # heard by the operator subscribed on another.
    assert rc.publish(events.control_key(uid), events.stop_message("rc-tester")) >= 0
    st = wait_phase(kubectl, namespace, "stopped", "Stopped", timeout=10)
    assert st["stoppedBy"] == "rc-tester", st
    assert_clean_stream(stream_of(rc, uid))


async def test_the_checkpointer_passes_langgraphs_conformance_suite_on_the_cluster(
    redis_cluster: RedisCluster,
) -> None:
    client = events.connect(redis_cluster.url, cluster=True)
    try:

        @conformance.checkpointer_test(name="RedisCheckpointSaver on a Redis Cluster")
        async def factory() -> AsyncIterator[checkpoint.RedisCheckpointSaver]:
            yield checkpoint.RedisCheckpointSaver(client, prefix=f"c{uuid.uuid4().hex[:8]}")

        result = await conformance.validate(factory)
        failures = {n: o.failures for n, o in result.results.items() if o.failures}
        assert result.passed_all(), failures
        assert result.conformance_level() == "FULL"
    finally:
        await client.aclose()


def test_an_operator_not_told_about_the_cluster_refuses_to_start_naming_the_setting(
    cluster: ControlPlane,
    rbac: None,
    redis_cluster: RedisCluster,
    script: Script,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    proc = own_operator(
        cluster, redis_url=redis_cluster.url, script=script,
        workdir=tmp_path_factory.mktemp("rc-plain"), namespaces="rc-none-*", ident="op-rc-none",
    )  # fmt: skip
    with pytest.raises(AssertionError, match="AGENTRUN_REDIS_CLUSTER=true"):
        with proc:
            pass


def test_a_controller_and_workers_share_runs_over_the_sharded_queue_of_the_cluster(
    cluster: ControlPlane,
    rbac: None,
    webhooks: Any,
    redis_cluster: RedisCluster,
    rc: redis_sync.Redis,
    kubectl: Kubectl,
    request: pytest.FixtureRequest,
    script: Script,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Scale-out on the cluster: the work queue is 8 streams, each its own hash tag, so its
    load spreads over the masters; the workers claim from all of them."""
    env = {"AGENTRUN_REDIS_CLUSTER": "true"}
    roles = [
        ("rc-controller", "agentrun_operator", {"AGENTRUN_ROLE": "controller"}),
        ("rc-worker-0", "agentrun_operator.worker", {}),
        ("rc-worker-1", "agentrun_operator.worker", {}),
    ]
    procs = {
        ident: own_operator(
            cluster,
            redis_url=redis_cluster.url,
            script=script,
            workdir=tmp_path_factory.mktemp(ident),
            namespaces="rcw-*",
            ident=ident,
            module=module,
            env={**env, **extra},
        )
        for ident, module, extra in roles
    }
    with all_running(procs):
        for ns in judged_namespace(kubectl, request, "rcw-", *procs.items()):
            goal = script.add(marker("rc-workers"), [{"text": "Plan w1 w2 w3"}, {"text": "ok"}])
            names = [f"run-{i}" for i in range(8)]
            uids = {n: create_run(kubectl, ns, n, goal=goal) for n in names}
            for n in names:
                st = wait_phase(kubectl, ns, n, "Succeeded", "Failed", timeout=90)
                assert st["phase"] == "Succeeded", (n, st)
                assert st["worker"] in ("rc-worker-0", "rc-worker-1"), st
                assert_clean_stream(stream_of(rc, uids[n]))
            shards = [events.work_key(i) for i in range(events.WORK_SHARDS_ON_CLUSTER)]
            used = [k for k in shards if rc.xinfo_groups(k)[0]["entries-read"]]
            assert len(used) > 1, f"every run went through one shard: {used}"
            nodes = {rc.get_node_from_key(k).name for k in shards}  # type: ignore[attr-defined]
            assert len(nodes) > 1, f"the shards live on one master: {nodes}"
            # Done work is acknowledged and deleted: nothing pending, nothing left.
            assert sum(rc.xlen(k) for k in shards) == 0
