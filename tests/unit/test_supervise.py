"""What a run's task does when executing it raises: Redis or the API server out of reach
(a Redis Cluster failing over included) is waited out and the run resumes; anything else
is the operator's own fault, and the run ends ``Failed`` saying so instead of staying
``Running`` with no task. Without I/O: the engine's collaborators are replaced by records."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis import exceptions as redis_errors

from agentrun_operator import store
from agentrun_operator.engine.common import WAITING, RunRef
from agentrun_operator.engine.execution import Runner, Slot

REF = RunRef(namespace="ns", name="r", uid="u-1", generation=1, created="2026-12-06T00:00:00Z")


@pytest.mark.parametrize(
    "error",
    [
        redis_errors.ConnectionError("Connection refused"),
        redis_errors.TimeoutError("Timeout reading from socket"),
        redis_errors.BusyLoadingError("Redis is loading the dataset in memory"),
        redis_errors.ClusterDownError("CLUSTERDOWN The cluster is down"),
        redis_errors.MasterDownError("MASTERDOWN Link with MASTER is down"),
        redis_errors.TryAgainError("TRYAGAIN Multiple keys request during rehashing"),
        redis_errors.MovedError("3999 127.0.0.1:6381"),
        redis_errors.AskError("3999 127.0.0.1:6381"),
        redis_errors.SlotNotCoveredError("Slot 3999 is not covered by the cluster"),
        redis_errors.ReadOnlyError("READONLY You can't write against a read only replica."),
    ],
    ids=lambda e: type(e).__name__,
)
def test_redis_out_of_reach_or_a_cluster_in_flux_is_unreachable(error: Exception) -> None:
    assert store.unreachable(error)


@pytest.mark.parametrize(
    "error",
    [
        redis_errors.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
        redis_errors.ResponseError("FENCED run owned by another operator"),
        KeyError("phase"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_answer_or_a_bug_is_not_unreachable(error: Exception) -> None:
    assert not store.unreachable(error)


class _Kube:
    def __init__(self) -> None:
        self.status_patches: list[dict[str, Any]] = []

    async def get_agentrun(self, *, namespace: str, name: str) -> dict[str, Any]:
        return {"metadata": {"uid": REF.uid, "name": name}, "status": {"phase": "Running"}}

    async def patch_agentrun_status(self, *, namespace: str, name: str, status: Any) -> None:
        self.status_patches.append(status)


class _Ends:
    def __init__(self) -> None:
        self.ended: list[dict[str, Any]] = []

    async def without_task(self, ref: RunRef, st: dict[str, Any], **how: Any) -> None:
        self.ended.append({"ref": ref, "status": st, **how})


class _Services:
    def __init__(self) -> None:
        self.k8s = _Kube()


def _runner(outcomes: list[BaseException | bool]) -> tuple[Runner, _Services, _Ends]:
    services, ends = _Services(), _Ends()
    slots: dict[str, Slot] = {}
    runner = Runner(
        services,  # type: ignore[arg-type]
        gate=None,  # type: ignore[arg-type]
        ends=ends,  # type: ignore[arg-type]
        sweeps=None,  # type: ignore[arg-type]
        slot_of=slots.get,
        closing=lambda: False,
    )

    async def run(ref: RunRef) -> bool:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    runner._run = run  # type: ignore[method-assign]
    slots[REF.uid] = Slot(ref=REF, task=None)  # type: ignore[arg-type]
    return runner, services, ends


async def test_a_failover_is_waited_out_and_the_run_resumes() -> None:
    outcomes: list[BaseException | bool] = [
        redis_errors.ClusterDownError("CLUSTERDOWN The cluster is down"),
        False,  # the retry: the run went on to its end
    ]
    runner, services, ends = _runner(outcomes)
    await asyncio.wait_for(runner.supervise(REF), 10)
    assert outcomes == [], "the run was not tried again"
    assert ends.ended == [], "a failover is not the run's fault"
    [waiting] = services.k8s.status_patches
    assert waiting["message"].startswith(WAITING) and "Redis is unreachable" in waiting["message"]


async def test_a_bug_in_the_operator_fails_the_run_instead_of_orphaning_it() -> None:
    runner, services, ends = _runner([KeyError("phase")])
    await asyncio.wait_for(runner.supervise(REF), 10)
    [ended] = ends.ended
    assert ended["phase"] == "Failed" and ended["reason"] == "OperatorError", ended
    assert "KeyError" in ended["message"] and "'phase'" in ended["message"], ended
    assert ended["status"] == {"phase": "Running"}
    assert services.k8s.status_patches == []
