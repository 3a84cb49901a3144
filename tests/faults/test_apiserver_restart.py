"""Scenario 4 of the fault suite: kube-apiserver restarted while runs are in flight.

Covers: the operator process survives (same PID), its watches come back (a decision made
after the restart is seen; a run created after it is picked up), and its status writes
recover: a run streaming across the restart, a run that finished while the API server was
down (its final status write had nowhere to go) and a run waiting for approval all end
Succeeded, with status (phase, result, lastEventId, usage) matching their streams, one
`end` each, and each side-effecting call executed once on the cluster.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_sync
from faults.conftest import Figures
from faults.fault_support import (
    all_finished,
    append_call,
    approvals_of,
    create_target,
    decide,
    executions,
    fault_namespace,
    start_operator,
)

from agentrun_harness.controlplane import ControlPlane
from agentrun_harness.redisserver import RedisServer
from agentrun_operator import events

from support import (
    Kubectl,
    OperatorProcess,
    Script,
    assert_clean_stream,
    create_run,
    marker,
    stream,
    wait_event,
    wait_for,
    wait_phase,
)

SCENARIO = "API server restart"


@pytest.fixture(scope="module")
def api_operator(
    cluster: ControlPlane,
    rbac: None,
    webhooks: object,
    redis_server: RedisServer,
    script: Script,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    with start_operator(
        cluster,
        redis_url=redis_server.url,
        script=script,
        workdir=tmp_path_factory.mktemp("operator-api"),
        namespaces="fapi-*",
    ) as proc:
        yield proc


@pytest.fixture
def namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    yield from fault_namespace(kubectl, request, "fapi-")


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{k}" for k in range(n))


def start(
    kubectl: Kubectl,
    namespace: str,
    script: Script,
    name: str,
    replies: list[dict[str, Any]],
    **spec: Any,
) -> str:
    create_target(kubectl, namespace, name)
    goal = script.add(marker(name), replies)
    return create_run(
        kubectl, namespace, name, goal=goal, serviceAccountName="agent", tools=["k8s_patch"], **spec
    )


@pytest.mark.timeout(300)
def test_the_operator_recovers_its_watches_and_status_writes_after_an_apiserver_restart(
    cluster: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    r: redis_sync.Redis,
    script: Script,
    api_operator: OperatorProcess,
    figures: Figures,
) -> None:
    operator_pid, starts = api_operator.proc.pid, api_operator.starts  # type: ignore[union-attr]
    no_approval: dict[str, Any] = {"approval": {"required": []}}
    uids = {
        # Makes its call, then streams its answer for many seconds: the restart falls in
        # the middle (a call made while the API server is down would just fail).
        "across": start(
            kubectl,
            namespace,
            script,
            "across",
            [
                {"text": "plan"},
                {"text": "append", "tool_calls": [append_call("across", "across-1")]},
                {"text": words("f", 60), "tokens_per_second": 8},
            ],
            **no_approval,
        ),
        # Waits for a decision made after the restart (the ToolApproval watch must be back).
        "waiting": start(
            kubectl,
            namespace,
            script,
            "waiting",
            [
                {"text": "plan"},
                {"text": "append", "tool_calls": [append_call("waiting", "waiting-1")]},
                {"text": "done"},
            ],
        ),
    }
    # Finishes while the API server is down: its final status write has nowhere to go.
    uids["finishing"] = start(
        kubectl,
        namespace,
        script,
        "finishing",
        [
            {"text": "plan"},
            {"text": "append", "tool_calls": [append_call("finishing", "finishing-1")]},
            {"text": words("f", 12), "tokens_per_second": 6},
        ],
        **no_approval,
    )
    wait_phase(kubectl, namespace, "waiting", "AwaitingApproval")
    wait_event(
        r,
        uids["finishing"],
        "the last answer of the run that finishes during the restart",
        lambda e: e["type"] == "token" and e["data"]["node"] == "act" and "f0" in e["data"]["text"],
    )
    wait_event(
        r,
        uids["across"],
        "the answer of the long run",
        lambda e: e["type"] == "token" and "f0" in e["data"]["text"],
    )

    began, down_at = time.monotonic(), time.time()
    try:
        cluster.restart_apiserver()
    except BaseException:
        print(f"--- kube-apiserver log ---\n{cluster.log_tail('kube-apiserver', 60)}")
        raise
    restart_took = time.monotonic() - began
    ready, up_at = time.monotonic(), time.time()

    [approval] = approvals_of(kubectl, namespace, "waiting")
    decide(kubectl, namespace, approval["metadata"]["name"], "Approved")
    uids["after"] = start(
        kubectl,
        namespace,
        script,
        "after",
        [
            {"text": "plan"},
            {"text": "append", "tool_calls": [append_call("after", "after-1")]},
            {"text": "done"},
        ],
        **no_approval,
    )
    try:
        wait_for(
            "the run created after the restart to start",
            lambda: r.exists(events.events_key(uids["after"])),
            timeout=60,
        )
    except AssertionError:
        # Seen once on 1.20 (its watch of AgentRuns not back in time): the log says why.
        print(f"--- operator log ---\n{api_operator.log_tail(150, quiet=True)}")
        raise
    picked_up = time.monotonic() - ready
    try:
        statuses = all_finished(kubectl, namespace, list(uids), timeout=120)
    except AssertionError:
        print(f"--- operator log ---\n{api_operator.log_tail(150)}")
        raise

    ended = dt.datetime.fromisoformat(stream(r, uids["finishing"])[-1]["ts"]).timestamp()
    assert down_at < ended < up_at, "the run meant to finish during the restart did not"
    wrong = []
    for name, uid in uids.items():
        st = statuses[name]
        evs = stream(r, uid)
        assert_clean_stream(evs)
        end = evs[-1]["data"]
        if (st.get("phase"), st.get("result"), st.get("lastEventId")) != (
            "Succeeded",
            end["result"],
            evs[-1]["id"],
        ):
            wrong.append(f"{name}: {st.get('phase')} {st.get('message')!r}")
        if (st.get("usage") or {}).get("toolCalls") != 1:
            wrong.append(f"{name}: usage {st.get('usage')}")
        assert executions(kubectl, namespace, name).tags == [f"{name}-1"], name
    assert api_operator.proc.pid == operator_pid and api_operator.starts == starts  # type: ignore[union-attr]
    assert api_operator.proc.poll() is None  # type: ignore[union-attr]
    figures.record(SCENARIO, "kube-apiserver restart took (s)", round(restart_took, 1))
    figures.record(
        SCENARIO,
        "runs with the right final status (across, finished during, waiting, after)",
        f"{len(uids) - len(wrong)}/{len(uids)}",
        f"{len(uids)}/{len(uids)}",
    )
    figures.record(SCENARIO, "API server ready → new run started (s)", round(picked_up, 1))
    figures.record(SCENARIO, "operator restarts", 0, "0")
    assert not wrong, wrong
