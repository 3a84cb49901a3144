"""agentrun_sse.frames and agentrun_sse.client, and a fanout viewer's queue, without I/O:
stream ids, the phase an event tells of, SSE frames and their parsing (a frame the server
writes is the message the client reads), one decode per stream entry, a bounded queue."""

from __future__ import annotations

import asyncio
import json

import pytest

from agentrun_operator import sseclient as client
from agentrun_sse import fanout, frames


def test_stream_ids_compare_as_numbers_not_text() -> None:
    assert frames.parse_id("1700000000000-10") > frames.parse_id("1700000000000-9")
    assert frames.parse_id("5") == (5, 0)
    assert frames.parse_id(f"{2**64 - 1}-{2**64 - 1}") == (2**64 - 1, 2**64 - 1)
    # Unicode digits pass str.isdigit() and int(), and Redis refuses ids over 64 bits.
    for bad in ("", "x-1", "1-x", "-1", "1-2-3", "\uff11-\uff10", "\u00b2", f"{2**64}-0", "1-0\n"):
        with pytest.raises(ValueError):
            frames.parse_id(bad)


@pytest.mark.parametrize(
    ("kind", "data", "phase"),
    [
        ("workflow", {"state": "planning"}, "Running"),
        ("workflow", {"state": "resumed"}, "Running"),
        ("workflow", {"state": "awaiting_approval"}, "AwaitingApproval"),
        ("workflow", {"state": "stopped"}, "Stopped"),
        ("end", {"phase": "Failed"}, "Failed"),
        ("token", {"text": "x"}, None),
        ("workflow", "not an object", None),
    ],
)
def test_events_tell_the_phase_they_imply(kind: str, data: object, phase: str | None) -> None:
    assert frames.implied_phase(kind, data) == phase


def test_a_frame_parses_back_into_the_same_message() -> None:
    parser = client.Parser()
    wire = frames.frame(id="1-2", event="token", data='{"a": "line1\\nline2"}')
    wire += frames.frame(event="multi", data="one\ntwo")
    out = [m for line in wire.decode().split("\n") if (m := parser.feed(line))]
    assert out == [
        client.Message("token", '{"a": "line1\\nline2"}', "1-2"),
        client.Message("multi", "one\ntwo", None),
    ]
    assert parser.last_id == "1-2"


def test_the_parser_ignores_comments_and_keeps_the_last_id() -> None:
    parser = client.Parser()
    lines = [": keepalive", "retry: 500", "", "id: 7-0", "data: x", ""]
    got = [m for line in lines if (m := parser.feed(line))]
    assert got == [client.Message("message", "x", "7-0")]


def test_an_entry_is_decoded_once_with_its_type_phase_and_time() -> None:
    raw = json.dumps(
        {
            "v": 1,
            "seq": 3,
            "type": "workflow",
            "ts": "2025-01-01T00:00:00.250Z",
            "data": {"state": "verifying"},
        }
    )
    d = frames.Delivery.from_entry(b"10-1", {b"data": raw.encode()})
    assert (d.id, d.key, d.type, d.phase) == ("10-1", (10, 1), "workflow", "Running")
    assert d.ts == pytest.approx(1735689600.25)
    assert d.wire == f"id: 10-1\nevent: workflow\ndata: {raw}\n\n".encode()


def test_heartbeats_carry_ts_and_phase_and_no_id() -> None:
    msg = client.Parser()
    out = [
        m
        for line in frames.heartbeat_frame("Running").decode().split("\n")
        if (m := msg.feed(line))
    ]
    assert out[0].event == "heartbeat" and out[0].id is None
    assert out[0].json()["phase"] == "Running" and out[0].json()["ts"].endswith("Z")


async def test_a_full_viewer_refuses_more_and_ending_it_frees_its_queue() -> None:
    viewer = fanout.Viewer(uid="u", limit=2)
    d = frames.Delivery.from_entry("1-0", {"data": '{"type":"token"}'})
    assert viewer.offer(d) and viewer.offer(d)
    assert not viewer.offer(d)
    assert await viewer.take(timeout=0.1, most=10) == [d, d]
    assert await viewer.take(timeout=0.01, most=10) is None  # nothing: the heartbeat's cue
    viewer.offer(d)
    viewer.end("lagged")
    assert len(viewer) == 0
    assert await viewer.take(timeout=1, most=10) == "lagged"


async def test_a_waiting_viewer_wakes_when_an_event_arrives() -> None:
    viewer = fanout.Viewer(uid="u", limit=4)
    d = frames.Delivery.from_entry("1-0", {"data": '{"type":"token"}'})
    waiter = asyncio.create_task(viewer.take(timeout=5, most=1))
    await asyncio.sleep(0)
    viewer.offer(d)
    assert await asyncio.wait_for(waiter, 1) == [d]
