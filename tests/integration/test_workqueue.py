"""The work queue of the controller and its workers (``RunStore``) on a real Redis, in a
database of its own (the session's workers watch database 0): depth and the age of the
oldest entry, acknowledging and refreshing only one's own entries, done work deleted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agentrun_operator import events
from agentrun_operator.store import RunStore


@pytest.fixture
async def store(redis_server: Any) -> AsyncIterator[RunStore]:
    s = RunStore.connect(redis_server.url.rsplit("/", 1)[0] + "/7")
    await s.redis.flushdb()
    await s.ensure_work_group()
    yield s
    await s.redis.flushdb()
    await s.close()


async def test_the_queue_reports_depth_and_age_and_keeps_only_work_not_done(
    store: RunStore,
) -> None:
    assert await store.work_depth() == 0 and await store.work_age_seconds() == 0
    await store.enqueue_work(uid="u-1", namespace="ns", name="a", why="look")
    [(work_id, work)] = await store.claim_work("w1", count=5, block_ms=10)
    assert work == {"uid": "u-1", "namespace": "ns", "name": "a", "why": "look"}
    assert await store.work_depth() == 1
    first = await store.work_age_seconds()
    await asyncio.sleep(0.3)  # the quantity measured is time itself
    assert 0.3 <= await store.work_age_seconds() - first < 5
    # Another worker's entry is neither refreshed nor acknowledged by this one.
    assert await store.hold_work("w2", [work_id]) == 0
    assert await store.ack_work("w2", [work_id]) == 0
    assert await store.work_depth() == 1
    assert await store.hold_work("w1", [work_id]) == 1
    assert await store.ack_work("w1", [work_id]) == 1
    # Done: acknowledged and deleted.
    assert await store.work_depth() == 0 and await store.work_age_seconds() == 0
    assert await store.redis.xlen(events.WORK_KEY) == 0
