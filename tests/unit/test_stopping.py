"""The stop state machine every operator-side stop goes through, without I/O."""

from __future__ import annotations

import asyncio

import pytest

from agentrun_operator import events
from agentrun_operator.engine.stopping import StopControl, StopState, uncancel


def test_the_first_request_cancels_and_later_ones_only_name_who_stopped() -> None:
    stop = StopControl()
    assert not stop.requested
    assert stop.request(None) is True
    assert stop.state is StopState.STOPPING and stop.by == ""
    # The control message that follows a UI's spec.stop patch: no second cancellation,
    # but now we know who it was.
    assert stop.request("alice") is False
    assert stop.by == "alice"
    # The first name stands.
    assert stop.request("bob") is False
    assert stop.by == "alice"
    assert stop.message == "stopped by alice"


def test_a_cancellation_is_a_stop_only_after_a_request() -> None:
    stop = StopControl()
    # Operator shutdown or a lost lease: not a stop, the cancellation propagates.
    assert stop.finishing() is False
    assert stop.state is StopState.RUNNING
    stop.request("alice")
    assert stop.must_recancel() is True
    assert stop.finishing() is True
    assert stop.state.value == "finishing"
    # Finishing is never cut by a re-cancel, and a late request changes nothing.
    assert stop.must_recancel() is False
    assert stop.request("bob") is False
    assert stop.finishing() is True


def test_deletion_stops_as_deletion_unless_someone_stopped_first() -> None:
    deleted = StopControl()
    assert deleted.delete() is True
    assert deleted.deleted and deleted.by == "deletion"
    stopped = StopControl()
    stopped.request("alice")
    assert stopped.delete() is False  # already cancelled once
    assert stopped.deleted and stopped.by == "alice"
    assert StopControl().message == "stopped by a stop request"


async def test_the_enforcer_cancels_again_until_the_task_finishes() -> None:
    swallowed = asyncio.Event()
    seen: list[str] = []

    async def stubborn() -> None:
        # Swallows the first cancellation, as asyncio.wait_for can in a client library.
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("first")
            uncancel()
            swallowed.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("second")
            raise

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    stop = StopControl()
    assert stop.request("alice")
    task.cancel()
    await asyncio.wait_for(swallowed.wait(), 5)
    await asyncio.wait_for(stop.enforce(task, every=0.01), 5)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["first", "second"]


async def test_the_enforcer_leaves_a_finishing_task_alone() -> None:
    finished = asyncio.Event()

    async def finishing() -> None:
        await finished.wait()

    task = asyncio.create_task(finishing())
    stop = StopControl()
    stop.request("alice")
    assert stop.finishing()
    await asyncio.wait_for(stop.enforce(task, every=0.01), 5)
    assert not task.done(), "a finishing task is never cancelled again"
    finished.set()
    await task


def test_the_control_message_format_is_defined_once() -> None:
    channel = events.control_key("u-1")
    control = events.parse_control(channel.encode(), events.stop_message("alice"))
    assert control == events.Control(uid="u-1", action="stop", by="alice")
    assert events.parse_control(channel, '{"action": "stop"}') == events.Control(
        uid="u-1", action="stop", by=""
    )
    # Ignored, never fatal: malformed JSON, another action, a foreign channel.
    assert events.parse_control(channel, "{nope") is None
    assert events.parse_control(channel, '{"action": "pause"}') is None
    assert events.parse_control(channel, "[1]") is None
    assert events.parse_control("agentrun:{u-1}:events", events.stop_message("a")) is None
