"""Fan-out: one Redis reader per watched run, its events handed to every viewer in this process.

Owns: the readers (``XREAD BLOCK`` from the position a run's first viewer found, resuming
from it after Redis restarts), the viewers' bounded queues, cutting off a viewer that falls
behind (the others go on unslowed, memory stays bounded), ending every viewer on shutdown,
and the replay queries of one stream (pages of history, the last entry, trimmed history).
Never: writes to Redis, talks to Kubernetes, authenticates anyone, or formats SSE beyond
what ``frames`` encodes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis import asyncio as aioredis
from redis import exceptions as redis_errors

from agentrun_operator import events
from agentrun_sse import frames
from agentrun_sse import metrics as metrics_mod

log = logging.getLogger(__name__)

Signal = Literal["lagged", "shutdown"]
# How long one XREAD waits; an idle reader notices it has no viewers within this time.
BLOCK_MS = 1000
REDIS_DOWN: tuple[type[Exception], ...] = (*events.UNAVAILABLE, OSError)


class Viewer:
    """One open stream's bounded queue of live events."""

    __slots__ = ("_items", "_wake", "limit", "signal", "uid")

    def __init__(self, *, uid: str, limit: int) -> None:
        self.uid = uid
        self.limit = limit
        self._items: collections.deque[frames.Delivery] = collections.deque()
        self._wake = asyncio.Event()
        self.signal: Signal | None = None

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, item: frames.Delivery) -> bool:
        """Queue an event; False (and nothing queued) when the queue is full."""
        if len(self._items) >= self.limit:
            return False
        self._items.append(item)
        self._wake.set()
        return True

    def end(self, signal: Signal) -> None:
        """Stop this viewer: what it had queued is dropped (it resumes by id)."""
        if self.signal is None:
            self.signal = signal
        self._items.clear()
        self._wake.set()

    async def take(self, *, timeout: float, most: int) -> list[frames.Delivery] | Signal | None:
        """Up to ``most`` queued events, a signal, or None when ``timeout`` passed first."""
        while not self._items:
            if self.signal is not None:
                return self.signal
            self._wake.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                return None
        if self.signal is not None:
            return self.signal
        batch = [self._items.popleft() for _ in range(min(most, len(self._items)))]
        return batch


@dataclass
class HubStats:
    """Counters tests and benchmarks read (the Prometheus metrics carry the same facts)."""

    readers_started: int = 0
    xread_calls: int = 0
    lagged_viewers: int = 0
    deepest_queue: int = 0


class _Reader:
    """The one Redis reader of one run; lives while the run has viewers in this process."""

    def __init__(self, hub: Hub, uid: str) -> None:
        self.hub = hub
        self.uid = uid
        self.key = events.events_key(uid)
        self.viewers: set[Viewer] = set()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._run(), name=f"agentrun-sse-reader-{uid}")

    async def _start_cursor(self) -> str | None:
        """The stream's last id now: the reader delivers everything after it."""
        backoff = 0.05
        while self.viewers:
            try:
                last: Any = await self.hub.redis.xrevrange(self.key, count=1)
                return _text(last[0][0]) if last else frames.ZERO_ID
            except REDIS_DOWN as e:
                log.warning("reader of run %s: Redis unavailable (%s); retrying", self.uid, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        return None

    async def _run(self) -> None:
        self.hub.stats.readers_started += 1
        self.hub.metrics.readers.inc()
        try:
            cursor = await self._start_cursor()
            if cursor is None:
                return
            self.ready.set_result(None)
            backoff = 0.05
            while True:
                if not self.viewers:
                    return  # nobody left to read for; checked and dropped without an await
                try:
                    reply = await self.hub.reader_redis.xread(
                        {self.key: cursor}, count=self.hub.read_count, block=BLOCK_MS
                    )
                    backoff = 0.05
                except REDIS_DOWN as e:
                    # The client reconnects by itself; we resume from our cursor, so a Redis
                    # restart (with its AOF) loses nothing for the viewers.
                    log.warning("reader of run %s: Redis unavailable (%s); retrying", self.uid, e)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                self.hub.stats.xread_calls += 1
                self.hub.metrics.xreads.inc()
                for entries in _xread_entries(reply):
                    batch = [frames.Delivery.from_entry(i, f) for i, f in entries]
                    if batch:
                        cursor = batch[-1].id
                        self._fan_out(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reader of run %s failed; its viewers reconnect", self.uid)
        finally:
            self.hub.metrics.readers.dec()
            self.hub._forget(self)
            if not self.ready.done():
                self.ready.set_exception(ConnectionError("Redis unavailable"))
                self.ready.exception()  # retrieved: nobody may be waiting any more

    def _fan_out(self, batch: Sequence[frames.Delivery]) -> None:
        stats = self.hub.stats
        for viewer in list(self.viewers):
            for item in batch:
                if not viewer.offer(item):
                    # Fallen behind: drop it (bounded memory); the others go on unslowed.
                    self.viewers.discard(viewer)
                    viewer.end("lagged")
                    stats.lagged_viewers += 1
                    self.hub.metrics.lagged.inc()
                    break
            else:
                stats.deepest_queue = max(stats.deepest_queue, len(viewer))


def _xread_entries(reply: Any) -> list[list[tuple[Any, Any]]]:
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {key: [entries]}
        return [v[0] if v and isinstance(v[0], list) else v for v in reply.values()]
    return [entries for _key, entries in reply]


def _seq_of(fields: Any) -> int | None:
    raw = fields.get(b"data", fields.get("data")) if isinstance(fields, dict) else None
    try:
        seq = json.loads(raw).get("seq") if raw is not None else None
    except (ValueError, AttributeError):
        return None
    return seq if isinstance(seq, int) else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Unavailable(RuntimeError):
    """Redis could not be reached in time to open a stream."""


# What ends a viewer's stream early (the client comes back with its Last-Event-ID).
STREAM_CUT: tuple[type[Exception], ...] = (Unavailable, *REDIS_DOWN)


class Hub:
    """All run readers of this process, and the replay queries of every stream."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        reader_redis: aioredis.Redis,
        metrics: metrics_mod.Metrics,
        viewer_queue: int,
        read_count: int,
    ) -> None:
        self.redis = redis  # short commands: replay pages, XINFO
        self.reader_redis = reader_redis  # one blocked connection per run reader
        self.metrics = metrics
        self.viewer_queue = viewer_queue
        self.read_count = read_count
        self.stats = HubStats()
        self._readers: dict[str, _Reader] = {}
        self._viewers: set[Viewer] = set()
        self.closing = False

    @property
    def active_readers(self) -> int:
        return len(self._readers)

    def readers_of(self, uid: str) -> int:
        return 1 if uid in self._readers else 0

    def viewers_of(self, uid: str) -> int:
        reader = self._readers.get(uid)
        return 0 if reader is None else len(reader.viewers)

    def _forget(self, reader: _Reader) -> None:
        if self._readers.get(reader.uid) is reader:
            del self._readers[reader.uid]
        for viewer in reader.viewers:
            viewer.end("shutdown")

    async def attach(self, uid: str, *, timeout: float = 10.0) -> Viewer:
        """A new viewer of the run's live events, from its reader's current position on."""
        if self.closing:
            raise Unavailable("the server is shutting down")
        viewer = Viewer(uid=uid, limit=self.viewer_queue)
        reader = self._readers.get(uid)
        if reader is None or reader.task.done():
            reader = _Reader(self, uid)
            self._readers[uid] = reader
        reader.viewers.add(viewer)  # before `ready`: nothing after the cursor is missed
        self._viewers.add(viewer)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(reader.ready)
        except (TimeoutError, ConnectionError) as e:
            self.detach(viewer)
            raise Unavailable("Redis unavailable") from e
        except BaseException:
            self.detach(viewer)
            raise
        return viewer

    def detach(self, viewer: Viewer) -> None:
        self._viewers.discard(viewer)
        reader = self._readers.get(viewer.uid)
        if reader is not None:
            reader.viewers.discard(viewer)

    async def close(self) -> None:
        """End every open stream (they finish their current send) and stop the readers."""
        self.closing = True
        for viewer in list(self._viewers):
            viewer.end("shutdown")
        readers = list(self._readers.values())
        for reader in readers:
            reader.viewers.clear()
            reader.task.cancel()
        for reader in readers:
            with contextlib.suppress(asyncio.CancelledError):
                await reader.task

    # -- queries for one stream ----------------------------------------------------------
    async def page(self, uid: str, *, after: str, count: int) -> list[frames.Delivery]:
        entries: Any = await self.redis.xrange(events.events_key(uid), min=f"({after}", count=count)
        return [frames.Delivery.from_entry(i, f) for i, f in entries]

    async def last(self, uid: str) -> frames.Delivery | None:
        entries: Any = await self.redis.xrevrange(events.events_key(uid), count=1)
        return frames.Delivery.from_entry(*entries[0]) if entries else None

    async def missing_history(self, uid: str, *, after: str) -> str | None:
        """The first id left if MAXLEN trimmed events a replay from ``after`` would need."""
        try:
            info = await self.redis.xinfo_stream(events.events_key(uid))
        except redis_errors.ResponseError:
            return None  # no stream yet
        first = info.get("first-entry")
        if not first or first[0] is None:
            return None
        first_id = _text(first[0])
        if frames.parse_id(after) >= frames.parse_id(first_id):
            return None
        # Whether anything came before the first entry: its seq says (1 = nothing). Redis's
        # own max-deleted-entry-id is no help: MAXLEN trimming leaves it at 0-0. Should the
        # client hold exactly the entry before the first one, this claims a loss that is
        # not there: harmless, the client only learns history may be incomplete.
        seq = _seq_of(first[1])
        return first_id if seq is not None and seq > 1 else None
