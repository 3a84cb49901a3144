"""Stop, in one place: the state machine every operator-side stop goes through (the kopf
``spec.stop`` handler, the Redis control channel, a deletion), and the asyncio mechanics of
turning a cancellation into a clean ``Stopped`` finish.

A run's task moves ``running -> stopping -> finishing``: a stop request cancels the task once
(a second request, e.g. the control message that follows a UI's ``spec.stop`` patch, only
fills in who stopped it if nobody was named yet); the task, catching the cancellation,
enters ``finishing`` and writes the ``Stopped`` end; until then an enforcer cancels again,
because a cancellation can be swallowed inside client libraries.
Pure except for ``uncancel`` and ``StopControl.enforce`` (asyncio only). The control message
format is ``events``' (``publish_stop`` / ``parse_control``).
Never: writes status or events (the task does, when it finishes).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("agentrun.stop")


class StopState(enum.Enum):
    RUNNING = "running"
    STOPPING = "stopping"  # cancelled; the task has not caught it yet
    FINISHING = "finishing"  # the task caught it and writes the Stopped end


@dataclass
class StopControl:
    """The stop state of one run's task (a ``_Slot`` in the registry holds one)."""

    state: StopState = StopState.RUNNING
    by: str | None = None  # who asked (None: nobody yet; "": a stop request naming nobody)
    deleted: bool = False  # the stop is a deletion: the run goes away, nothing resumes it
    requested_ns: int | None = None  # when the first stop request came (time.time_ns())

    def request(self, by: str | None) -> bool:
        """A stop request; True when the task must be cancelled now (the first request)."""
        if self.by is None or (not self.by and by):
            self.by = by or ""
        if self.requested_ns is None:
            self.requested_ns = time.time_ns()
        if self.state is not StopState.RUNNING:
            # A stop arrives twice from the UI or API (spec.stop and the control channel):
            # cancelling again could cut the finishing of the first.
            return False
        self.state = StopState.STOPPING
        return True

    def delete(self) -> bool:
        """The run is being deleted: stop it (as ``deletion`` unless someone stopped it)."""
        self.deleted = True
        return self.request(self.by or "deletion")

    @property
    def requested(self) -> bool:
        return self.state is not StopState.RUNNING

    def finishing(self) -> bool:
        """The task caught a cancellation: True when it is a stop (finish as Stopped), False
        when it is not (operator shutdown, a lost lease: let it propagate)."""
        if self.state is StopState.RUNNING:
            return False
        self.state = StopState.FINISHING
        return True

    def must_recancel(self) -> bool:
        """Whether the enforcer should cancel the task again (not finishing yet)."""
        return self.state is StopState.STOPPING

    @property
    def message(self) -> str:
        return f"stopped by {self.by or 'a stop request'}"

    async def enforce(self, task: asyncio.Task[None], *, every: float = 0.2) -> None:
        """Cancel ``task`` again until it finishes: Python 3.11's asyncio.wait_for (used in
        client libraries) can swallow a cancellation that races with its inner future, and
        a stop must never be lost."""
        for _ in range(150):
            await asyncio.sleep(every)
            if task.done() or not self.must_recancel():
                return
            log.warning("task %s did not stop yet; cancelling again", task.get_name())
            task.cancel()


def uncancel() -> None:
    """We handle this cancellation (a stop) and go on to finish the run cleanly."""
    task = asyncio.current_task()
    while task is not None and task.cancelling():
        task.uncancel()
