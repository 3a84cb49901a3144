"""Scale-out: a controller (``AGENTRUN_ROLE=controller``) admits runs and queues them on a
Redis Stream; three worker processes (``python -m agentrun_operator.worker``) claim and
execute them. All real processes, on the session's Redis and control plane.

Covers: runs spread over the workers and finish with clean streams; a worker SIGKILLed
mid-run: every run it held is reclaimed by another (``XAUTOCLAIM``) and resumed from its
checkpoint, each stream with contiguous ``seq`` and no duplicate, each tool call once, and
``status.worker`` names the new holder (the hand-over time is printed); a worker stopped with
SIGTERM hands its runs over at once; a run waiting for people resumes on some worker when
the approval comes; a stop reaches the worker that holds the run. Version-independent: on
the newest Kubernetes only.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_sync

from agentrun_harness.controlplane import ControlPlane

from support import (
    Kubectl,
    OperatorProcess,
    Script,
    approved_scale,
    assert_clean_stream,
    create_run,
    get_run,
    judged_namespace,
    marker,
    newest_only,
    own_operator,
    stream,
    wait_for,
    wait_phase,
)

pytestmark = newest_only("scale-out does not depend on the Kubernetes version")
WORKERS = 3


@pytest.fixture(scope="module")
def controller(
    cluster: ControlPlane,
    rbac: None,
    webhooks: Any,
    redis_server: Any,
    script: Script,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    proc = own_operator(
        cluster, redis_url=redis_server.url, script=script, workdir=tmp_path_factory.mktemp("ctl"),
        namespaces="wk-*", ident="controller", env={"AGENTRUN_ROLE": "controller"},
    )  # fmt: skip
    with proc:
        yield proc


@pytest.fixture(scope="module")
def workers(
    cluster: ControlPlane,
    redis_server: Any,
    script: Script,
    controller: OperatorProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, OperatorProcess]]:
    procs = {
        f"worker-{i}": own_operator(
            cluster,
            redis_url=redis_server.url,
            script=script,
            workdir=tmp_path_factory.mktemp(f"worker-{i}"),
            namespaces="wk-*",
            ident=f"worker-{i}",
            module="agentrun_operator.worker",
        )
        for i in range(WORKERS)
    }
    for proc in procs.values():
        proc.start()
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture
def namespace(
    kubectl: Kubectl,
    request: pytest.FixtureRequest,
    controller: OperatorProcess,
    workers: dict[str, OperatorProcess],
) -> Iterator[str]:
    yield from judged_namespace(
        kubectl, request, "wk-", ("controller", controller), *workers.items()
    )


def talking(script: Script, name: str, *, words: int, tps: float) -> str:
    text = " ".join(f"w{i}" for i in range(words))
    calls = [{"name": "k8s_list", "arguments": {"kind": "pods"}}]
    return script.add(
        marker(name),
        [
            {"text": f"Plan {text}", "tokens_per_second": tps},
            {"tool_calls": calls},
            {"text": "done"},
        ],
    )


def assert_each_call_once(evs: list[dict[str, Any]]) -> None:
    ends = Counter(
        e["data"]["callId"]
        for e in evs
        if e["type"] == "tool" and e["data"]["status"] not in ("started", "progress")
    )
    assert ends and all(n == 1 for n in ends.values()), ends


def test_runs_spread_over_the_workers_and_a_killed_worker_hands_its_runs_over(
    kubectl: Kubectl,
    namespace: str,
    script: Script,
    r: redis_sync.Redis,
    workers: dict[str, OperatorProcess],
) -> None:
    goal = talking(script, "wk-kill", words=120, tps=30)
    names = [f"run-{i}" for i in range(12)]
    uids = {n: create_run(kubectl, namespace, n, goal=goal) for n in names}

    def holders() -> dict[str, str] | None:
        found = {
            n: (get_run(kubectl, namespace, n).get("status") or {}).get("worker") for n in names
        }
        return found if all(found.values()) else None  # type: ignore[return-value]

    held = wait_for("every run to be held by a worker", holders, timeout=60)
    assert isinstance(held, dict)
    assert set(held.values()) <= set(workers)
    assert len(set(held.values())) > 1, f"one worker took everything: {held}"
    victim = Counter(held.values()).most_common(1)[0][0]
    orphans = [n for n, w in held.items() if w == victim]
    workers[victim].kill()
    killed_at = time.monotonic()

    def taken_over() -> bool:
        return all(
            (get_run(kubectl, namespace, n).get("status") or {}).get("worker") not in (None, victim)
            or (get_run(kubectl, namespace, n).get("status") or {}).get("phase") == "Succeeded"
            for n in orphans
        )

    wait_for("the victim's runs to be taken over", taken_over, timeout=60, interval=0.2)
    print(f"[figure] worker SIGKILL -> its {len(orphans)} runs resumed elsewhere: "
          f"{time.monotonic() - killed_at:.1f}s")  # fmt: skip
    for n in names:
        st = wait_phase(kubectl, namespace, n, "Succeeded", "Failed", timeout=120)
        assert st["phase"] == "Succeeded", (n, st)
        evs = stream(r, uids[n])
        assert_clean_stream(evs)
        assert_each_call_once(evs)
    for n in orphans:
        assert get_run(kubectl, namespace, n)["status"]["worker"] != victim
    workers[victim].start()  # back for the next tests


def test_a_worker_stopped_with_sigterm_hands_its_runs_over_at_once(
    kubectl: Kubectl,
    namespace: str,
    script: Script,
    r: redis_sync.Redis,
    workers: dict[str, OperatorProcess],
) -> None:
    goal = talking(script, "wk-drain", words=600, tps=30)  # 20 s: drained mid-run
    names = [f"drain-{i}" for i in range(6)]
    uids = {n: create_run(kubectl, namespace, n, goal=goal) for n in names}

    def holder(n: str) -> str | None:
        return (get_run(kubectl, namespace, n).get("status") or {}).get("worker")

    wait_for("the runs to be held", lambda: all(holder(n) for n in names), timeout=60)
    leaving = holder(names[0])
    assert leaving is not None
    handed = [n for n in names if holder(n) == leaving]
    workers[leaving].terminate()
    asked = time.monotonic()
    wait_for(
        "the drained worker's runs to move",
        lambda: all(holder(n) != leaving for n in handed),
        timeout=30,
        interval=0.2,
    )
    moved = time.monotonic() - asked
    print(f"[figure] worker SIGTERM -> its {len(handed)} runs resumed elsewhere: {moved:.1f}s")
    assert moved < 15, f"a drain took {moved:.1f}s; the lease is not released on SIGTERM?"
    for n in names:
        assert wait_phase(kubectl, namespace, n, "Succeeded", "Failed")["phase"] == "Succeeded"
        assert_clean_stream(stream(r, uids[n]))
    workers[leaving].stop()
    workers[leaving].start()


def test_an_approval_and_a_stop_reach_the_workers(
    kubectl: Kubectl, namespace: str, script: Script, r: redis_sync.Redis
) -> None:
    _, _, st = approved_scale(kubectl, namespace, script, "gated")
    assert st["phase"] == "Succeeded", st

    long = script.add(
        marker("wk-stop"), [{"text": " ".join(["w"] * 3000), "tokens_per_second": 30}]
    )
    uid = create_run(kubectl, namespace, "stopped", goal=long)
    wait_for("tokens", lambda: any(e["type"] == "token" for e in stream(r, uid)), timeout=60)
    kubectl(
        "patch", "agentrun", "stopped", "-n", namespace, "--type=merge",
        "-p", '{"spec":{"stop":true}}',
    )  # fmt: skip
    asked = time.monotonic()
    st = wait_phase(kubectl, namespace, "stopped", "Stopped", timeout=30)
    assert time.monotonic() - asked < 5, "the stop did not reach the worker at once"
    assert st["stoppedBy"] == "admin"
    assert_clean_stream(stream(r, uid))


def test_an_approval_nobody_decides_expires_on_the_controllers_clock(
    kubectl: Kubectl, namespace: str, script: Script, r: redis_sync.Redis
) -> None:
    # Nobody decides: the controller's clock (workers run none) wakes the run at the deadline.
    uid, approval, st = approved_scale(
        kubectl, namespace, script, "expiring", decide=None,
        approval={"timeout": "3s", "onTimeout": "deny"},
    )  # fmt: skip
    assert st["phase"] == "Succeeded", st
    ta = kubectl("get", "ta", approval, "-n", namespace, "-o", "jsonpath={.status.state}")
    assert ta.stdout == "Expired"
    tool = next(e["data"] for e in stream(r, uid) if e["type"] == "tool")
    assert tool["status"] == "denied" and "expired" in tool["result"]["error"], tool
