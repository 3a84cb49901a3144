"""The operator's Redis bookkeeping of runs, beside their event streams and checkpoints.

Owns every Redis command the run engine sends that is not an event append (``events``) or a
checkpoint (``checkpoint``): tool-call records, the run's meta hash (cluster stamp, time spent
waiting for people, a spec edit to report), reading back a run's last events, listening on
the control channels, and finding and deleting runs' keys. Keys come from ``events``.
Never: appends an event (only the fenced writer in ``events`` does), decides anything about
a run, or touches a key of another run than the one it is asked about.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from redis import asyncio as aioredis
from redis import exceptions as redis_errors

from agentrun_operator import events

log = logging.getLogger("agentrun.store")


# KEYS: a work stream. ARGV: group, consumer, "ack" or "hold", entry ids. Acknowledges (and
# deletes: the stream holds only work not yet done) or refreshes (XCLAIM JUSTID: idle time
# reset) only the entries still pending on this consumer: one another worker reclaimed (this
# one was frozen or cut off longer than a lease) is its now, and neither taken back nor
# acknowledged under its feet. Returns how many were.
_MINE = """
local mine = {}
for i = 4, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) > 0 then
    mine[#mine + 1] = ARGV[i]
  end
end
if #mine == 0 then return 0 end
if ARGV[3] == 'ack' then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(mine))
  return redis.call('XDEL', KEYS[1], unpack(mine))
end
local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], '0'}
for _, id in ipairs(mine) do claim[#claim + 1] = id end
claim[#claim + 1] = 'JUSTID'
return #redis.call(unpack(claim))
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _work(fields: Any) -> dict[str, str]:
    raw = fields.get(b"data") or fields.get("data") or b"{}"
    found = json.loads(raw)
    return {k: str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def unreachable(e: BaseException) -> bool:
    """Whether ``e`` means Redis could not be reached (past the client's own retries)."""
    return isinstance(e, events.UNAVAILABLE)


class RunStore:
    """One Redis client, as the run engine uses it."""

    def __init__(self, redis: aioredis.Redis, *, shards: int = 1) -> None:
        self.redis = redis
        self.shards = shards  # of the work queue
        self._next_shard = 0
        self._mine_script: Any = None

    @classmethod
    def connect(cls, url: str, *, cluster: bool = False) -> RunStore:
        shards = events.WORK_SHARDS_ON_CLUSTER if cluster else 1
        return cls(events.connect(url, cluster=cluster), shards=shards)

    async def close(self) -> None:
        await self.redis.aclose()

    # -- the run's lease and stream ----------------------------------------------------------
    async def lease(self, uid: str, *, operator_id: str, ttl_seconds: float) -> events.Lease | None:
        return await events.Lease.acquire(
            self.redis, uid=uid, operator_id=operator_id, ttl_seconds=ttl_seconds
        )

    def writer(self, uid: str, *, run: str, lease: events.Lease, maxlen: int) -> events.EventWriter:
        return events.EventWriter(self.redis, uid=uid, run=run, lease=lease, maxlen=maxlen)

    async def owned(self, uid: str) -> bool:
        """Whether some operator holds the run's lease now."""
        return await self.redis.get(events.owner_key(uid)) is not None

    async def has_history(self, uid: str) -> bool:
        return bool(await self.redis.exists(events.events_key(uid)))

    async def last_events(self, uid: str, count: int) -> list[dict[str, Any]]:
        """The run's last ``count`` events, newest first."""
        return events.decode_entries(
            await self.redis.xrevrange(events.events_key(uid), count=count)
        )

    async def first_event(self, uid: str) -> dict[str, Any] | None:
        found = events.decode_entries(await self.redis.xrange(events.events_key(uid), count=1))
        return found[0] if found else None

    async def read_events(
        self, uid: str, *, after: str, block_ms: int, count: int = 500
    ) -> list[dict[str, Any]]:
        """Events after ``after``, waiting up to ``block_ms`` for the first one."""
        reply: Any = await self.redis.xread(
            {events.events_key(uid): after}, block=block_ms, count=count
        )
        return [
            events.decode(event_id, fields)
            for _stream, entries in reply or []
            for event_id, fields in entries
        ]

    # -- tool calls (exactly-once) -----------------------------------------------------------
    async def call_record(self, uid: str, call_id: str) -> dict[str, Any]:
        """What is recorded of one tool call: {} (never started), state started or done."""
        raw = await self.redis.hget(events.calls_key(uid), call_id)
        record: dict[str, Any] = json.loads(raw) if raw else {}
        return record

    # -- the run's meta hash -----------------------------------------------------------------
    async def stamp_cluster(self, uid: str, cluster_id: str) -> None:
        """Mark the run's keys as this cluster's: only such keys are ever swept."""
        await self.redis.hset(events.meta_key(uid), "cluster", cluster_id)

    async def cluster_of(self, uid: str) -> str | None:
        stamp = await self.redis.hget(events.meta_key(uid), "cluster")
        return None if stamp is None else _text(stamp)

    async def note(self, uid: str, code: str, message: str) -> None:
        """A fault (an ignored spec edit, a policy applied) for the task that next runs the
        run to report in its stream."""
        await self.redis.hset(events.meta_key(uid), f"note:{code}", message)

    async def notes(self, uid: str) -> dict[str, str]:
        """The faults noted for the run (code -> message)."""
        found = await self.redis.hgetall(events.meta_key(uid))
        return {
            _text(k).removeprefix("note:"): _text(v)
            for k, v in found.items()
            if _text(k).startswith("note:")
        }

    async def forget_note(self, uid: str, code: str) -> None:
        """Once the run's stream says it (never before: the note would be lost)."""
        await self.redis.hdel(events.meta_key(uid), f"note:{code}")

    async def awaiting_people(self, uid: str) -> None:
        """The run starts waiting for people (the first time counts)."""
        await self.redis.hsetnx(events.meta_key(uid), "awaiting_since", str(time.time()))

    async def people_answered(self, uid: str) -> None:
        """The wait for people ended: add it to the time that does not count as running."""
        meta = events.meta_key(uid)
        since = await self.redis.hget(meta, "awaiting_since")
        if since is not None:
            await self.redis.hincrbyfloat(meta, "waited", max(0.0, time.time() - float(since)))
            await self.redis.hdel(meta, "awaiting_since")

    async def trace_of(self, uid: str, candidate: str) -> str:
        """The run's trace identity (``tracing.RunTrace``, serialised): ``candidate`` if
        the run has none yet, else the one it got when it first executed."""
        meta = events.meta_key(uid)
        await self.redis.hsetnx(meta, "trace", candidate)
        return _text(await self.redis.hget(meta, "trace") or candidate)

    async def waited_seconds(self, uid: str) -> float:
        """How long the run waited for people in total (not counted against its timeout)."""
        return float(await self.redis.hget(events.meta_key(uid), "waited") or 0)

    # -- control channel ---------------------------------------------------------------------
    async def publish_stop(self, uid: str, *, by: str) -> int:
        return await events.publish_stop(self.redis, uid, by=by)

    async def control_messages(self) -> AsyncIterator[events.Control]:
        """Control messages for every run, as they come (malformed ones are skipped)."""
        pubsub = self.redis.pubsub()
        try:
            await pubsub.psubscribe(events.CONTROL_PATTERN)
            async for msg in pubsub.listen():
                if msg.get("type") != "pmessage":
                    continue
                control = events.parse_control(msg["channel"], msg["data"])
                if control is None:
                    log.warning("ignoring a malformed control message on %s", msg["channel"])
                    continue
                yield control
        finally:
            await pubsub.aclose()

    # -- the work queue (controller -> workers) ----------------------------------------------
    # A work id is "<shard>/<stream entry id>": opaque to the worker.
    async def ensure_work_group(self) -> None:
        """The queues and their consumer group, created once (by whichever process is first)."""
        for shard in range(self.shards):
            try:
                await self.redis.xgroup_create(
                    events.work_key(shard), events.WORK_GROUP, id="0", mkstream=True
                )
            except redis_errors.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def enqueue_work(self, *, uid: str, namespace: str, name: str, why: str) -> str:
        """Ask some worker to look at the run (start, resume, a decision came)."""
        entry = {"uid": uid, "namespace": namespace, "name": name, "why": why}
        shard = events.work_shard(uid, self.shards)
        entry_id = await self.redis.xadd(events.work_key(shard), {"data": json.dumps(entry)})
        return f"{shard}/{_text(entry_id)}"

    async def claim_work(
        self, worker: str, *, count: int, block_ms: int
    ) -> list[tuple[str, dict[str, str]]]:
        """New entries for ``worker`` (pending on it until acknowledged). With shards: each
        one asked without blocking, from a rotating start; then a short block on one."""
        if self.shards == 1:
            return await self._claim(0, worker, count=count, block_ms=block_ms)
        self._next_shard = (self._next_shard + 1) % self.shards
        order = [(self._next_shard + i) % self.shards for i in range(self.shards)]
        found: list[tuple[str, dict[str, str]]] = []
        for shard in order:
            found += await self._claim(shard, worker, count=count - len(found), block_ms=None)
            if len(found) >= count:
                return found
        if found:
            return found
        return await self._claim(order[0], worker, count=count, block_ms=min(block_ms, 200))

    async def _claim(
        self, shard: int, worker: str, *, count: int, block_ms: int | None
    ) -> list[tuple[str, dict[str, str]]]:
        reply: Any = await self.redis.xreadgroup(
            events.WORK_GROUP,
            worker,
            {events.work_key(shard): ">"},
            count=count,
            block=block_ms,
        )
        return [(f"{shard}/{_text(i)}", _work(f)) for _, entries in reply or [] for i, f in entries]

    async def reclaim_work(
        self, worker: str, *, min_idle_ms: int, count: int
    ) -> list[tuple[str, dict[str, str]]]:
        """Entries pending on workers that stopped refreshing them (dead ones)."""
        found: list[tuple[str, dict[str, str]]] = []
        for shard in range(self.shards):
            reply: Any = await self.redis.xautoclaim(
                events.work_key(shard), events.WORK_GROUP, worker, min_idle_ms,
                start_id="0", count=count,
            )  # fmt: skip
            found += [(f"{shard}/{_text(i)}", _work(f)) for i, f in reply[1] if f]
        return found

    async def hold_work(self, worker: str, work_ids: list[str]) -> int:
        """Reset the idle time of entries ``worker`` still works on (XCLAIM JUSTID), so no
        other worker reclaims a long run from a live one; how many are still its own."""
        return await self._mine(worker, "hold", work_ids)

    async def ack_work(self, worker: str, work_ids: list[str]) -> int:
        """Acknowledge the entries still pending on ``worker``; how many were."""
        return await self._mine(worker, "ack", work_ids)

    async def _mine(self, worker: str, mode: str, work_ids: list[str]) -> int:
        by_shard: dict[int, list[str]] = {}
        for work_id in work_ids:
            number, _, entry_id = work_id.partition("/")
            by_shard.setdefault(int(number), []).append(entry_id)
        if self._mine_script is None:
            self._mine_script = self.redis.register_script(_MINE)
        done = 0
        for shard, ids in by_shard.items():
            done += int(
                await self._mine_script(
                    keys=[events.work_key(shard)], args=[events.WORK_GROUP, worker, mode, *ids]
                )
            )
        return done

    async def work_depth(self) -> int:
        """Entries not yet acknowledged (claimed or waiting), over all shards."""
        depth = 0
        for shard in range(self.shards):
            summary: Any = await self.redis.xpending(events.work_key(shard), events.WORK_GROUP)
            depth += int(summary.get("pending", 0) if isinstance(summary, dict) else 0)
        return depth

    async def work_age_seconds(self) -> float:
        """How long the oldest work not yet done (waiting or claimed) has been queued; 0 when
        there is none (done work is deleted, so the first entry of a stream is that one)."""
        oldest: float | None = None
        for shard in range(self.shards):
            first: Any = await self.redis.xrange(events.work_key(shard), count=1)
            if first:
                millis = int(_text(first[0][0]).split("-")[0])
                oldest = millis if oldest is None else min(oldest, millis)
        return 0.0 if oldest is None else max(0.0, time.time() - oldest / 1000)

    # -- finding and deleting runs' keys -----------------------------------------------------
    async def run_uids(self) -> AsyncIterator[str]:
        """The uid of every run with an event stream in this Redis (any cluster's)."""
        async for key in self.redis.scan_iter(match=events.EVENTS_PATTERN, count=500):
            uid = events.uid_from_events_key(key)
            if uid is not None:
                yield uid

    async def delete_run(self, uid: str) -> int:
        return await events.delete_run_keys(self.redis, uid)
