"""The run's event stream on a real Redis: the envelope, gap-free seq, the lease with its
fencing number (a second operator can neither take a live lease nor append after losing
it), restart re-acquisition by the same operator, and deleting every key of a run."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from redis import asyncio as aioredis

from agentrun_operator import events

from support import decoded, newest_only

pytestmark = newest_only("Redis only")


async def writer_for(
    redis: aioredis.Redis, uid: str, operator_id: str = "op-a"
) -> events.EventWriter:
    lease = await events.Lease.acquire(redis, uid=uid, operator_id=operator_id, ttl_seconds=5)
    assert lease is not None
    return events.EventWriter(redis, uid=uid, run="ns/run", lease=lease, maxlen=1000)


async def read_all(redis: aioredis.Redis, uid: str) -> list[dict[str, object]]:
    return decoded(await redis.xrange(events.events_key(uid)))


async def test_events_carry_the_envelope_and_a_gap_free_seq(redis: aioredis.Redis) -> None:
    uid = str(uuid.uuid4())
    writer = await writer_for(redis, uid)
    ids = [await writer.append("token", {"text": f"t{i}", "node": "act"}) for i in range(5)]
    await writer.append("end", {"phase": "Succeeded", "result": "ok", "stoppedBy": ""})
    stored = await read_all(redis, uid)
    assert [e["seq"] for e in stored] == [1, 2, 3, 4, 5, 6]
    assert [e["id"] for e in stored[:5]] == ids
    first = stored[0]
    assert first["v"] == 1 and first["run"] == "ns/run" and first["uid"] == uid
    assert first["type"] == "token" and first["data"] == {"text": "t0", "node": "act"}
    assert str(first["ts"]).endswith("Z")


async def test_a_second_operator_cannot_take_a_live_lease(redis: aioredis.Redis) -> None:
    uid = str(uuid.uuid4())
    await writer_for(redis, uid, "op-a")
    assert await events.Lease.acquire(redis, uid=uid, operator_id="op-b", ttl_seconds=5) is None


async def test_a_fenced_writer_cannot_append_after_a_takeover(redis: aioredis.Redis) -> None:
    uid = str(uuid.uuid4())
    old = await writer_for(redis, uid, "op-a")
    await old.append("workflow", {"state": "planning", "node": "plan", "step": 0})
    await redis.delete(events.owner_key(uid))  # the lease expired (op-a paused too long)
    new = await writer_for(redis, uid, "op-b")
    await new.append("workflow", {"state": "resumed", "node": "", "step": 0})
    with pytest.raises(events.Fenced):
        await old.append("token", {"text": "late", "node": "act"})
    with pytest.raises(events.Fenced):
        await old.record_call("c-000000000001", "{}")
    assert [e["seq"] for e in await read_all(redis, uid)] == [1, 2]


async def test_the_same_operator_takes_its_lease_back_after_a_restart(
    redis: aioredis.Redis,
) -> None:
    uid = str(uuid.uuid4())
    before = await writer_for(redis, uid, "op-a")
    after = await writer_for(redis, uid, "op-a")  # a new process with the same identity
    await after.append("workflow", {"state": "resumed", "node": "", "step": 0})
    with pytest.raises(events.Fenced):  # the old incarnation is fenced off all the same
        await before.append("token", {"text": "zombie", "node": "act"})


async def test_concurrent_appends_never_interleave_seq(redis: aioredis.Redis) -> None:
    uid = str(uuid.uuid4())
    writer = await writer_for(redis, uid)
    await asyncio.gather(*(writer.append("token", {"text": str(i)}) for i in range(200)))
    stored = await read_all(redis, uid)
    assert [e["seq"] for e in stored] == list(range(1, 201))


async def test_deleting_a_run_removes_only_its_keys(redis: aioredis.Redis) -> None:
    mine, other = str(uuid.uuid4()), str(uuid.uuid4())
    for uid in (mine, other):
        writer = await writer_for(redis, uid)
        await writer.append("token", {"text": "x"})
        await writer.record_call("c-000000000001", json.dumps({"state": "done"}))
    assert await events.delete_run_keys(redis, mine) >= 4
    assert await redis.keys(f"agentrun:{{{mine}}}:*") == []
    assert len(await redis.keys(f"agentrun:{{{other}}}:*")) >= 4


async def test_control_channel_names_round_trip() -> None:
    uid = str(uuid.uuid4())
    assert events.uid_from_control_channel(events.control_key(uid)) == uid
    assert events.uid_from_control_channel("agentrun:{x}:events") is None
