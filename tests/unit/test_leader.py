"""The controller's Lease (``leader.Elector``) against an in-memory Lease API that keeps
``resourceVersion`` as the API server does (a write with a stale one is a 409): one holder
at a time, a standby takes over only after the record stopped changing for a whole lease,
a holder that cannot renew gives up before that, a release hands over at once. The real
API server and a SIGKILLed controller: tests/integration/test_workers.py."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import pytest

from agentrun_operator import kube, leader

LEASE = "agentrun-system/agentrun-controller"


class LeaseAPI:
    """GET, POST and PUT of Lease objects, with optimistic concurrency."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.down = False

    async def request(self, method: str, path: str, *, body: Any = None, **_: Any) -> Any:
        if self.down:
            raise kube.KubeError(0, "Unreachable", f"{method} {path}: connection refused")
        if method == "GET":
            if path not in self.objects:
                raise kube.KubeError(404, "NotFound", "leases not found")
            return copy.deepcopy(self.objects[path])
        if method == "POST":
            path = f"{path}/{body['metadata']['name']}"
            if path in self.objects:
                raise kube.KubeError(409, "AlreadyExists", "already exists")
        elif method == "PUT":
            current = self.objects[path]["metadata"]["resourceVersion"]
            if body["metadata"].get("resourceVersion") != current:
                raise kube.KubeError(409, "Conflict", "the object has been modified")
        self.version += 1
        stored = copy.deepcopy(body)
        stored["metadata"]["resourceVersion"] = str(self.version)
        self.objects[path] = stored
        return copy.deepcopy(stored)

    def holder(self) -> str | None:
        (lease,) = self.objects.values()
        holder: str | None = lease["spec"].get("holderIdentity")
        return holder


def elector(api: LeaseAPI, identity: str, seconds: float = 3.0) -> leader.Elector:
    return leader.Elector(api, lease=LEASE, identity=identity, lease_seconds=seconds)  # type: ignore[arg-type]


async def test_one_candidate_holds_and_the_other_stands_by_until_it_lapses() -> None:
    api = LeaseAPI()
    a, b = elector(api, "a"), elector(api, "b")
    await asyncio.wait_for(a.acquire(), 5)
    assert api.holder() == "a" and a.holding
    waiting = asyncio.create_task(b.acquire())
    await asyncio.sleep(1.5)
    assert not waiting.done(), "b took a Lease that a still holds"
    # a dies (stops renewing): b takes over once the record has not changed for 3 s.
    started = time.monotonic()
    await asyncio.wait_for(waiting, 10)
    assert api.holder() == "b"
    assert 1.0 <= time.monotonic() - started <= 3.0 + b.retry_seconds + 0.5
    (lease,) = api.objects.values()
    assert lease["spec"]["leaseTransitions"] == 1


async def test_a_renewing_holder_keeps_the_lease() -> None:
    api = LeaseAPI()
    a, b = elector(api, "a"), elector(api, "b")
    await a.acquire()
    holding = asyncio.create_task(a.hold())
    waiting = asyncio.create_task(b.acquire())
    await asyncio.sleep(5)  # longer than the lease: only renewals keep it
    assert not waiting.done() and not holding.done()
    assert api.holder() == "a"
    holding.cancel()
    waiting.cancel()


async def test_a_holder_that_cannot_renew_gives_up_before_a_standby_may_take_over() -> None:
    api = LeaseAPI()
    a = elector(api, "a")
    await a.acquire()
    holding = asyncio.create_task(a.hold())
    api.down = True
    started = time.monotonic()
    with pytest.raises(leader.LostLeadership, match="could not be renewed"):
        await asyncio.wait_for(holding, 10)
    # Given up within the renew deadline (2 s) plus one try: before the 3 s lease ends.
    assert time.monotonic() - started < 3.0
    assert not a.holding


async def test_a_holder_whose_lease_was_taken_stops_at_its_next_renewal() -> None:
    api = LeaseAPI()
    a = elector(api, "a")
    await a.acquire()
    holding = asyncio.create_task(a.hold())
    (path,) = api.objects
    taken = copy.deepcopy(api.objects[path])
    taken["spec"]["holderIdentity"] = "intruder"
    await api.request("PUT", path, body=taken)
    with pytest.raises(leader.LostLeadership, match="taken by intruder"):
        await asyncio.wait_for(holding, 5)


async def test_a_release_hands_over_at_once_and_two_racers_get_one_lease() -> None:
    api = LeaseAPI()
    a, b, c = elector(api, "a"), elector(api, "b"), elector(api, "c")
    await a.acquire()
    b_waits, c_waits = asyncio.create_task(b.acquire()), asyncio.create_task(c.acquire())
    await asyncio.sleep(0.2)
    await a.release()
    started = time.monotonic()
    done, pending = await asyncio.wait(
        {b_waits, c_waits}, timeout=5, return_when=asyncio.FIRST_COMPLETED
    )
    assert len(done) == 1, "nobody, or both, took the released Lease"
    assert time.monotonic() - started <= b.retry_seconds + 0.3
    winner = "b" if b_waits in done else "c"
    assert api.holder() == winner
    await asyncio.sleep(1.5)
    assert all(not t.done() for t in pending), "the loser took the Lease too"
    for t in pending:
        t.cancel()
