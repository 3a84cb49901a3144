"""Redis → SSE for one viewer: replay from an id, then the live tail, until the run's end.

Owns the order of one stream: a prelude (chat's ``run`` event), ``trimmed`` when MAXLEN took
history the replay needed, the replay in pages, attaching to the run's shared reader with
no gap and no duplicate, heartbeats carrying the phase, ``lagged`` when the viewer fell
behind, and ending cleanly on shutdown or when Redis is gone.
Never: writes to Redis, talks to Kubernetes, or authenticates anyone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from agentrun_sse import fanout, frames

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamRequest:
    uid: str
    after: str | None  # replay from after this id; None with live_only, or from the start
    live_only: bool
    phase: str  # the run's phase when the stream opened (from the AgentRun)
    heartbeat_seconds: float
    prelude: tuple[bytes, ...] = ()


async def run_stream(hub: fanout.Hub, req: StreamRequest) -> AsyncIterator[bytes]:
    """The SSE body of one viewer: prelude, replay, live tail; ends after `end`."""
    metrics = hub.metrics
    metrics.open_streams.inc()
    viewer: fanout.Viewer | None = None
    phase = req.phase
    try:
        for opening in req.prelude:
            yield opening
        last: frames.StreamId | None = None
        if not req.live_only:
            after = req.after or frames.ZERO_ID
            first = await hub.missing_history(req.uid, after=after)
            if first is not None:
                yield frames.frame(event="trimmed", data=json.dumps({"firstId": first}))
            replayed = 0
            cursor = after
            attached = False
            # Page through history; once a page comes back short we are near the end: then
            # attach to the live reader and page once more, so the history that arrived
            # meanwhile is not missed, and drop live events we already sent (no duplicate).
            while True:
                page = await hub.page(req.uid, after=cursor, count=hub.read_count)
                chunk, ended = _until_end(page)
                if chunk:
                    replayed += len(chunk)
                    cursor = chunk[-1].id
                    phase = _phase_of(chunk, phase)
                    metrics.events_sent.inc(len(chunk))
                    yield b"".join(d.wire for d in chunk)
                if ended:
                    metrics.replay_events.observe(replayed)
                    return
                if len(page) < hub.read_count:
                    if attached:
                        break
                    viewer = await hub.attach(req.uid)
                    attached = True
            metrics.replay_events.observe(replayed)
            last = frames.parse_id(cursor)
        else:
            viewer = await hub.attach(req.uid)
        assert viewer is not None
        loop = asyncio.get_running_loop()
        beat_at = loop.time() + req.heartbeat_seconds
        while True:
            got = await viewer.take(timeout=max(0.0, beat_at - loop.time()), most=256)
            if got is None:
                metrics.heartbeats_sent.inc()
                yield frames.heartbeat_frame(phase)
                beat_at += req.heartbeat_seconds
                if beat_at < loop.time():  # a slow send: count from now, no burst of beats
                    beat_at = loop.time() + req.heartbeat_seconds
                continue
            if got == "lagged":
                yield frames.frame(
                    event="lagged",
                    data=json.dumps(
                        {
                            "reason": f"fell behind by more than {viewer.limit} events; "
                            "reconnect with Last-Event-ID to resume",
                            "lastId": _format_id(last),
                        }
                    ),
                )
                return
            if got == "shutdown":
                # No event: the client reconnects (to any replica) with its Last-Event-ID.
                yield b": server shutting down, reconnect with Last-Event-ID\nretry: 500\n\n"
                return
            assert isinstance(got, list)
            if last is not None:
                got = [d for d in got if d.key > last]
                if not got:
                    continue
            chunk, ended = _until_end(got)
            now = time.time()
            for d in chunk:
                if d.ts is not None:
                    metrics.delivery_latency.observe(max(0.0, now - d.ts))
            phase = _phase_of(chunk, phase)
            last = chunk[-1].key
            metrics.events_sent.inc(len(chunk))
            yield b"".join(d.wire for d in chunk)
            if ended:
                return
    except fanout.STREAM_CUT as e:
        # Redis went away (beyond the client's own retries) or we are shutting down: end
        # the stream; the client comes back with its Last-Event-ID.
        log.warning("stream of run %s ended early: %s", req.uid, e)
        yield b": redis unavailable, reconnect with Last-Event-ID\nretry: 2000\n\n"
    finally:
        if viewer is not None:
            hub.detach(viewer)
        metrics.open_streams.dec()


def _until_end(items: Sequence[frames.Delivery]) -> tuple[Sequence[frames.Delivery], bool]:
    for i, d in enumerate(items):
        if d.type == "end":
            return items[: i + 1], True
    return items, False


def _phase_of(items: Sequence[frames.Delivery], phase: str) -> str:
    for d in items:
        if d.phase is not None:
            phase = d.phase
    return phase


def _format_id(key: frames.StreamId | None) -> str | None:
    return None if key is None else f"{key[0]}-{key[1]}"
