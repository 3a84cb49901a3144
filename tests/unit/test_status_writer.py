"""A run's status writes (``StatusWriter``): progress goes out at most every interval, and
only while the run's lease is surely held, so a process woken from a pause longer than
its lease says nothing about a run another process has taken over. Without I/O: the API
server is a record of patches, the lease a ``Lease`` whose clock the test sets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agentrun_operator import events
from agentrun_operator.engine.common import RunRef
from agentrun_operator.engine.emitter import StatusWriter

REF = RunRef(namespace="ns", name="r", uid="u-1", generation=1, created="2026-12-06T00:00:00Z")
INTERVAL = 0.02


class _Kube:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.sent = asyncio.Event()

    async def patch_agentrun_status(self, *, namespace: str, name: str, status: Any) -> None:
        self.patches.append(status)
        self.sent.set()


def _lease(valid_for: float) -> events.Lease:
    return events.Lease(
        redis=None,  # type: ignore[arg-type]  # never called here
        uid=REF.uid,
        token="7",
        ttl_ms=5000,
        valid_until=time.monotonic() + valid_for,
    )


def test_a_lease_is_held_until_its_ttl_from_the_last_renewal_runs_out() -> None:
    assert _lease(10).held()
    assert not _lease(-0.001).held()
    assert not _lease(0).held()


async def _writer(lease: events.Lease | None) -> tuple[StatusWriter, _Kube]:
    kube = _Kube()
    w = StatusWriter(kube, REF, current={}, interval=INTERVAL, lease=lease)  # type: ignore[arg-type]
    return w, kube


def test_progress_goes_out_after_the_interval_while_the_lease_holds() -> None:
    async def story() -> list[dict[str, Any]]:
        w, kube = await _writer(_lease(60))
        w.progress(lastEventId="1-0")
        w.progress(lastEventId="2-0", step=3)
        await asyncio.wait_for(kube.sent.wait(), 5)
        await w.close()
        return kube.patches

    # Coalesced into one patch, the later value winning.
    assert asyncio.run(story()) == [{"lastEventId": "2-0", "step": 3}]


def test_progress_waits_while_the_lease_is_not_surely_held_and_goes_once_renewed() -> None:
    async def story() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        lease = _lease(-1)  # woken from a pause: the last renewal is older than the TTL
        w, kube = await _writer(lease)
        w.progress(lastEventId="9-0")
        await asyncio.sleep(INTERVAL * 10)
        while_lapsed = list(kube.patches)
        lease.valid_until = time.monotonic() + 60  # renewed: the run is still ours
        await asyncio.wait_for(kube.sent.wait(), 5)
        await w.close()
        return while_lapsed, kube.patches

    while_lapsed, after = asyncio.run(story())
    assert while_lapsed == []
    assert after == [{"lastEventId": "9-0"}]


def test_progress_never_sent_when_the_run_is_lost_while_waiting() -> None:
    async def story() -> list[dict[str, Any]]:
        w, kube = await _writer(_lease(-1))
        w.progress(lastEventId="9-0")
        await asyncio.sleep(INTERVAL * 5)
        await w.close()  # the task ends: its fenced append failed
        await asyncio.sleep(INTERVAL * 3)
        return kube.patches

    assert asyncio.run(story()) == []


def test_without_a_lease_progress_goes_out_as_before() -> None:
    async def story() -> list[dict[str, Any]]:
        w, kube = await _writer(None)
        w.progress(step=1)
        await asyncio.wait_for(kube.sent.wait(), 5)
        await w.close()
        return kube.patches

    assert asyncio.run(story()) == [{"step": 1}]
