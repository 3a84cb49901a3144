"""Run events as SSE frames: the wire format and what one stream entry says.

Owns: parsing and comparing Redis stream ids, the phase an event tells of, encoding SSE
messages, and :class:`Delivery`, one stream entry decoded and encoded once for all viewers.
Pure: no I/O, no Redis, no Kubernetes.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Any

from agentrun_operator import events

StreamId = tuple[int, int]
ZERO_ID = "0-0"

_WORKFLOW_PHASE = {
    "pending": "Pending",
    "planning": "Running",
    "executing": "Running",
    "verifying": "Running",
    "resumed": "Running",
    "awaiting_approval": "AwaitingApproval",
    "succeeded": "Succeeded",
    "failed": "Failed",
    "stopped": "Stopped",
}


# ASCII digits only (a fullwidth "1" passes str.isdigit and int()), each part within Redis's
# 64 bits: a client's Last-Event-ID that passes here is one Redis accepts, never an error
# in the middle of a stream.
_STREAM_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
_ID_PART_MAX = 2**64 - 1


def parse_id(value: str) -> StreamId:
    """A Redis stream id ("ms-seq" or "ms") as a comparable pair; ValueError if malformed."""
    match = _STREAM_ID.fullmatch(value)
    if match is None:
        raise ValueError(f"not a stream id: {value[:40]!r}")
    ms, seq = int(match[1]), int(match[2] or 0)
    if ms > _ID_PART_MAX or seq > _ID_PART_MAX:
        raise ValueError(f"not a stream id (over 64 bits): {value[:40]!r}")
    return ms, seq


def implied_phase(event_type: str, data: Any) -> str | None:
    """The AgentRun phase an event tells of, or None if it tells of none."""
    if not isinstance(data, dict):
        return None
    if event_type == "workflow":
        return _WORKFLOW_PHASE.get(str(data.get("state")))
    if event_type == "end":
        phase = data.get("phase")
        return str(phase) if phase else None
    return None


def frame(*, event: str, data: str, id: str | None = None) -> bytes:
    """One SSE message. ``data`` is split on line breaks as the SSE format requires."""
    parts = [] if id is None else [f"id: {id}\n"]
    parts.append(f"event: {event}\n")
    parts.extend(f"data: {line}\n" for line in data.splitlines() or [""])
    parts.append("\n")
    return "".join(parts).encode()


def heartbeat_frame(phase: str) -> bytes:
    return frame(event="heartbeat", data=json.dumps({"ts": events.now_rfc3339(), "phase": phase}))


def _epoch(ts: Any) -> float | None:
    if not isinstance(ts, str):
        return None
    try:
        return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One run event, decoded and encoded once, shared by every viewer it goes to."""

    id: str
    key: StreamId
    type: str
    phase: str | None
    ts: float | None
    wire: bytes

    @classmethod
    def from_entry(cls, entry_id: bytes | str, fields: Any) -> Delivery:
        sid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        raw = fields.get(b"data", fields.get("data", b"{}"))
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            event = {}
        kind = str(event.get("type") or "message") if isinstance(event, dict) else "message"
        data = event.get("data") if isinstance(event, dict) else None
        return cls(
            id=sid,
            key=parse_id(sid),
            type=kind,
            phase=implied_phase(kind, data),
            ts=_epoch(event.get("ts")) if isinstance(event, dict) else None,
            wire=frame(id=sid, event=kind, data=text),
        )
