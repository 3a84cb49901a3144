"""The Redis checkpointer on a real redis-server: LangGraph's conformance suite passes in
full; a graph stopped at an ``interrupt()`` resumes on a new saver and a newly compiled
graph (an operator restart); every key of a thread carries its ``{thread_id}`` hash tag;
deleting a thread removes its keys and no other thread's; pruning keeps what a
DeltaChannel still replays; writes keep LangGraph's overwrite rules; the sync API refuses
clearly."""

from __future__ import annotations

import asyncio
import operator
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core import runnables
from langgraph import graph as lg_graph
from langgraph import types as lg_types
from langgraph.channels import delta
from langgraph.checkpoint import base as lg_base
from langgraph.checkpoint import conformance
from langgraph.checkpoint.conformance import capabilities, report
from langgraph.checkpoint.serde import types as serde_types
from redis import asyncio as aioredis

from agentrun_harness.redisserver import RedisServer
from agentrun_operator import checkpoint

from support import newest_only

pytestmark = newest_only("Redis only")


def fresh_prefix() -> str:
    return f"agentrun:t{uuid.uuid4().hex[:12]}"


def thread_config(thread_id: str) -> runnables.RunnableConfig:
    return {"configurable": {"thread_id": thread_id}}


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def keys_mentioning(redis: aioredis.Redis, text: str) -> set[str]:
    return {key.decode() async for key in redis.scan_iter(match=f"*{text}*")}


async def test_the_saver_passes_every_conformance_capability(redis: aioredis.Redis) -> None:
    @conformance.checkpointer_test(name="RedisCheckpointSaver")
    async def factory() -> AsyncIterator[checkpoint.RedisCheckpointSaver]:
        # A fresh prefix per capability suite: its fixed thread names never meet.
        yield checkpoint.RedisCheckpointSaver(redis, prefix=fresh_prefix())

    result = await conformance.validate(factory, progress=report.ProgressCallbacks.verbose())
    result.print_report()
    for name, outcome in sorted(result.results.items()):
        counts = (outcome.tests_passed, outcome.tests_failed, outcome.tests_skipped)
        print("{}: passed={} failed={} skipped={}".format(name, *counts))
    assert {c.value for c in capabilities.ALL_CAPABILITIES} == {
        name for name, outcome in result.results.items() if outcome.detected
    }
    failures = {n: o.failures for n, o in result.results.items() if o.failures}
    assert result.passed_all(), failures
    assert result.conformance_level() == "FULL"


class Approval(TypedDict, total=False):
    goal: str
    plan: str
    decision: str


def approval_graph(
    saver: checkpoint.RedisCheckpointSaver, planned: list[str]
) -> Any:  # a CompiledStateGraph; its generic parameters add nothing here
    def plan(state: Approval) -> Approval:
        planned.append(state["goal"])
        return {"plan": f"scale {state['goal']} to 3"}

    def gate(state: Approval) -> Approval:
        return {"decision": lg_types.interrupt({"approve": state["plan"]})}

    builder = lg_graph.StateGraph(Approval)
    builder.add_node("plan", plan)
    builder.add_node("gate", gate)
    builder.add_edge(lg_graph.START, "plan")
    builder.add_edge("plan", "gate")
    builder.add_edge("gate", lg_graph.END)
    return builder.compile(checkpointer=saver)


async def test_a_run_waiting_at_an_interrupt_resumes_after_a_restart(
    redis_server: RedisServer,
) -> None:
    config = thread_config(str(uuid.uuid4()))
    planned: list[str] = []
    first = aioredis.Redis.from_url(redis_server.url)
    graph = approval_graph(checkpoint.RedisCheckpointSaver(first), planned)
    paused = await graph.ainvoke({"goal": "web"}, config)
    assert paused["__interrupt__"][0].value == {"approve": "scale web to 3"}
    assert (await graph.aget_state(config)).next == ("gate",)
    await first.aclose()

    # The operator restarted: a new client, saver and graph; only Redis remembers.
    second = aioredis.Redis.from_url(redis_server.url)
    try:
        graph = approval_graph(checkpoint.RedisCheckpointSaver(second), planned)
        done = await graph.ainvoke(lg_types.Command(resume="approved"), config)
        assert done == {"goal": "web", "plan": "scale web to 3", "decision": "approved"}
        assert planned == ["web"], "the node before the interrupt ran again"
        assert (await graph.aget_state(config)).next == ()
    finally:
        await second.aclose()


# Writes big checkpoints and writes as fast as it can, until it is killed.
WRITER = """
import asyncio, sys
from langgraph.checkpoint.base import Checkpoint
from langgraph.checkpoint.base.id import uuid6
from redis import asyncio as aioredis
from agentrun_operator import checkpoint

async def main(url, prefix, thread_id):
    saver = checkpoint.RedisCheckpointSaver(aioredis.Redis.from_url(url), prefix=prefix)
    config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    version = None
    for step in range(1, 100000):
        version = saver.get_next_version(version, None)
        cp = Checkpoint(v=1, id=str(uuid6(clock_seq=step)), ts="", channel_values={
            "big": "x" * 300000 + f":{step}"}, channel_versions={"big": version},
            versions_seen={}, updated_channels=None)
        config = await saver.aput(config, cp, {"step": step}, {"big": version})
        writes = [(f"ch{i}", "y" * 200000 + f":{step}") for i in range(3)]
        await saver.aput_writes(config, writes, f"task-{step}")
        if step == 3:
            print("writing", flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_writer_killed_mid_write_leaves_only_whole_checkpoints(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    prefix, thread_id = fresh_prefix(), str(uuid.uuid4())
    command = [sys.executable, "-c", WRITER, redis_server.url, prefix, thread_id]
    with subprocess.Popen(command, stdout=subprocess.PIPE) as writer:
        try:
            assert writer.stdout is not None and writer.stdout.readline() == b"writing\n"
            await asyncio.sleep(0.5)
        finally:
            writer.kill()  # SIGKILL: no cleanup, possibly mid-transaction

    saver = checkpoint.RedisCheckpointSaver(redis, prefix=prefix)
    found = [c async for c in saver.alist(thread_config(thread_id))]
    assert len(found) > 3
    for tup in found:
        step = tup.metadata["step"]
        assert tup.checkpoint["channel_values"]["big"].endswith(f":{step}")
        writes = tup.pending_writes or []
        assert len(writes) in (0, 3), f"step {step} has {len(writes)} of its 3 writes"
        assert all(value.endswith(f":{step}") for _, _, value in writes)
    root = f"{prefix}:{{{thread_id}}}"
    registered = {m.decode() for m in await redis.smembers(f"{root}:keys") if isinstance(m, bytes)}
    present = await keys_mentioning(redis, thread_id)
    assert present - registered == {f"{root}:keys", f"{root}:ns"}
    indexed = {c.checkpoint["id"] for c in found}
    stored = {key.rsplit(":", 1)[1] for key in present if key.startswith(f"{root}:cp:")}
    assert stored == indexed


async def run_to_interrupt(redis: aioredis.Redis, thread_id: str) -> None:
    graph = approval_graph(checkpoint.RedisCheckpointSaver(redis), [])
    await graph.ainvoke({"goal": "api"}, thread_config(thread_id))


async def test_every_key_of_a_thread_carries_its_hash_tag(redis: aioredis.Redis) -> None:
    thread_id = str(uuid.uuid4())
    await run_to_interrupt(redis, thread_id)
    keys = await keys_mentioning(redis, thread_id)
    assert len(keys) >= 5  # namespaces, registry, index, blobs, checkpoints, writes
    assert all(key.startswith(f"agentrun:{{{thread_id}}}:") for key in keys), keys
    assert keys == {
        key.decode()
        async for key in redis.scan_iter(match=checkpoint.thread_keys_pattern(thread_id))
    }


async def test_adelete_thread_removes_its_checkpoints_and_nothing_else(
    redis: aioredis.Redis,
) -> None:
    doomed, kept = str(uuid.uuid4()), str(uuid.uuid4())
    await run_to_interrupt(redis, doomed)
    await run_to_interrupt(redis, kept)
    events = f"agentrun:{{{doomed}}}:events"  # the run's stream, owned by events.py
    await redis.xadd(events, {"data": "{}"})
    kept_before = await keys_mentioning(redis, kept)

    saver = checkpoint.RedisCheckpointSaver(redis)
    await saver.adelete_thread(doomed)

    assert await keys_mentioning(redis, doomed) == {events}
    assert await keys_mentioning(redis, kept) == kept_before
    assert await saver.aget_tuple(thread_config(doomed)) is None
    assert await saver.aget_tuple(thread_config(kept)) is not None


async def test_delete_thread_removes_every_key_of_a_run_and_nothing_else(
    redis: aioredis.Redis,
) -> None:
    doomed, kept = str(uuid.uuid4()), str(uuid.uuid4())
    await run_to_interrupt(redis, doomed)
    await run_to_interrupt(redis, kept)
    await redis.xadd(f"agentrun:{{{doomed}}}:events", {"data": "{}"})
    await redis.xadd(f"agentrun:{{{kept}}}:events", {"data": "{}"})
    doomed_before = await keys_mentioning(redis, doomed)
    kept_before = await keys_mentioning(redis, kept)

    removed = await checkpoint.delete_thread(redis, doomed)

    assert removed == len(doomed_before)
    assert await keys_mentioning(redis, doomed) == set()
    assert await keys_mentioning(redis, kept) == kept_before
    assert await checkpoint.delete_thread(redis, doomed) == 0  # idempotent


def append_all(state: list[int], writes: Sequence[list[int]]) -> list[int]:
    return state + [item for write in writes for item in write]


class Counting(TypedDict):
    items: Annotated[list[int], delta.DeltaChannel(append_all, snapshot_frequency=3)]
    steps: Annotated[int, operator.add]


def counting_graph(saver: checkpoint.RedisCheckpointSaver) -> Any:
    def count(state: Counting) -> dict[str, Any]:
        return {"items": [state["steps"]], "steps": 1}

    def wait(state: Counting) -> dict[str, Any]:
        return {"steps": lg_types.interrupt("halfway")}

    def again(state: Counting) -> str:
        if state["steps"] == 4:
            return "wait"
        return "count" if state["steps"] < 8 else lg_graph.END

    builder = lg_graph.StateGraph(Counting)
    builder.add_node("count", count)
    builder.add_node("wait", wait)
    builder.add_edge(lg_graph.START, "count")
    builder.add_conditional_edges("count", again)
    builder.add_edge("wait", "count")
    return builder.compile(checkpointer=saver)


async def test_prune_keep_latest_keeps_the_history_a_delta_channel_replays(
    redis: aioredis.Redis,
) -> None:
    saver = checkpoint.RedisCheckpointSaver(redis, prefix=fresh_prefix())
    config = thread_config(str(uuid.uuid4()))
    await counting_graph(saver).ainvoke({"items": [], "steps": 0}, config)
    before = [c async for c in saver.alist(config)]
    latest = before[0].metadata
    assert latest.get("counters_since_delta_snapshot"), "the newest is a snapshot: no test"

    await saver.aprune([config["configurable"]["thread_id"]], strategy="keep_latest")

    after = [c async for c in saver.alist(config)]
    assert 1 < len(after) < len(before)  # pruned, but not down to the newest alone
    graph = counting_graph(saver)
    assert (await graph.aget_state(config)).values == {"items": list(range(4)), "steps": 4}
    done = await graph.ainvoke(lg_types.Command(resume=1), config)
    assert done == {"items": [*range(4), *range(5, 8)], "steps": 8}


async def test_regular_writes_keep_the_first_and_special_writes_the_last(
    redis: aioredis.Redis,
) -> None:
    saver = checkpoint.RedisCheckpointSaver(redis, prefix=fresh_prefix())
    empty = lg_base.Checkpoint(
        v=1,
        id=str(uuid.uuid4()),
        ts="2026-01-01T00:00:00+00:00",
        channel_values={},
        channel_versions={},
        versions_seen={},
        updated_channels=None,
    )
    config = thread_config(str(uuid.uuid4()))
    stored = await saver.aput(config, empty, {"source": "loop", "step": 0}, {})
    for attempt in ("first", "second"):
        await saver.aput_writes(
            stored, [("out", attempt), (serde_types.ERROR, attempt)], "task-1", "a:b"
        )
    found = await saver.aget_tuple(stored)
    assert found is not None
    assert sorted(found.pending_writes or []) == [
        ("task-1", serde_types.ERROR, "second"),
        ("task-1", "out", "first"),
    ]


async def test_the_sync_api_refuses_and_names_the_async_method(redis: aioredis.Redis) -> None:
    saver = checkpoint.RedisCheckpointSaver(redis)
    with pytest.raises(NotImplementedError, match="aget_tuple"):
        saver.get_tuple(thread_config("t"))
    with pytest.raises(NotImplementedError, match="alist"):
        saver.list(None)


async def test_a_client_that_decodes_responses_is_refused(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses=False"):
            checkpoint.RedisCheckpointSaver(client)
    finally:
        await client.aclose()


def test_thread_ids_with_braces_are_refused() -> None:
    with pytest.raises(ValueError, match="thread_id"):
        checkpoint.thread_keys_pattern("a}b")
    assert checkpoint.thread_keys_pattern("a*b") == "agentrun:{a\\*b}:*"
