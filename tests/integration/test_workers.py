"""Scale-out: a controller (``AGENTRUN_ROLE=controller``) admits runs and queues them on a
Redis Stream; three worker processes (``python -m agentrun_operator.worker``) claim and
execute them. All real processes, on the session's Redis and control plane.

Covers: runs spread over the workers and finish with clean streams; a worker SIGKILLed
mid-run: every run it held is reclaimed by another (``XAUTOCLAIM``) and resumed from its
checkpoint, each stream with contiguous ``seq`` and no duplicate, each tool call once, and
``status.worker`` names the new holder (the hand-over time is printed); a worker stopped with
SIGTERM hands its runs over at once; a run waiting for people resumes on some worker when
the approval comes; a stop reaches the worker that holds the run; two controller replicas
elect one through a ``coordination.k8s.io`` Lease, and when the active one is SIGKILLed the
standby takes over: runs in flight finish, new runs are admitted, the Lease names the new
holder. Version-independent: on the newest Kubernetes only.

CI runs 12 runs in the SIGKILL test; ``AGENTRUN_TEST_WORKER_RUNS=60`` runs the full count.
"""

from __future__ import annotations

import json
import os
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
    all_running,
    approved_scale,
    assert_clean_stream,
    create_run,
    get_run,
    judged_namespace,
    marker,
    metrics,
    newest_only,
    own_operator,
    stream,
    wait_for,
    wait_phase,
)

pytestmark = newest_only("scale-out does not depend on the Kubernetes version")
WORKERS = 3
RUNS = int(os.environ.get("AGENTRUN_TEST_WORKER_RUNS", "12"))


LEASE_NAMESPACE = "agentrun-system-wk"
LEASE = f"{LEASE_NAMESPACE}/agentrun-controller"
LEASE_SECONDS = 4


@pytest.fixture(scope="module")
def lease_rights(kubectl: Kubectl, rbac: None) -> Iterator[None]:
    """The controller's Lease lives in the operator's own namespace, where the chart grants
    the operator identity a Role on leases; the same here."""
    kubectl("create", "namespace", LEASE_NAMESPACE)
    kubectl(
        "create", "role", "agentrun-leader", "-n", LEASE_NAMESPACE,
        "--verb=get,create,update", "--resource=leases.coordination.k8s.io",
    )  # fmt: skip
    kubectl(
        "create", "rolebinding", "agentrun-leader", "-n", LEASE_NAMESPACE,
        "--role=agentrun-leader", "--user=agentrun-operator",
    )  # fmt: skip
    yield
    kubectl("delete", "namespace", LEASE_NAMESPACE, "--wait=false")


@pytest.fixture(scope="module")
def controllers(
    cluster: ControlPlane,
    lease_rights: None,
    webhooks: Any,
    redis_server: Any,
    script: Script,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, OperatorProcess]]:
    """Two controller replicas, as the chart runs them: one active, one standing by."""
    procs = {
        ident: own_operator(
            cluster,
            redis_url=redis_server.url,
            script=script,
            workdir=tmp_path_factory.mktemp(ident),
            namespaces="wk-*",
            ident=ident,
            env={
                "AGENTRUN_ROLE": "controller",
                "AGENTRUN_LEADER_LEASE": LEASE,
                "AGENTRUN_LEADER_LEASE_SECONDS": str(LEASE_SECONDS),
            },
        )
        for ident in ("controller-a", "controller-b")
    }
    with all_running(procs):
        yield procs


@pytest.fixture(scope="module")
def workers(
    cluster: ControlPlane,
    redis_server: Any,
    script: Script,
    controllers: dict[str, OperatorProcess],
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
    with all_running(procs):
        yield procs


@pytest.fixture
def namespace(
    kubectl: Kubectl,
    request: pytest.FixtureRequest,
    controllers: dict[str, OperatorProcess],
    workers: dict[str, OperatorProcess],
) -> Iterator[str]:
    yield from judged_namespace(kubectl, request, "wk-", *controllers.items(), *workers.items())


def lease_holder(kubectl: Kubectl) -> str:
    name = LEASE.split("/")[1]
    out = kubectl(
        "get", "lease", name, "-n", LEASE_NAMESPACE, "-o", "jsonpath={.spec.holderIdentity}",
        check=False,
    )  # fmt: skip
    return out.stdout.strip() if out.returncode == 0 else ""


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
    names = [f"run-{i}" for i in range(RUNS)]
    uids = {n: create_run(kubectl, namespace, n, goal=goal) for n in names}

    def statuses() -> dict[str, dict[str, Any]]:
        """Each run's status, from one list (polls stay quick at any count)."""
        items = json.loads(kubectl("get", "agentruns", "-n", namespace, "-o", "json").stdout)
        return {i["metadata"]["name"]: i.get("status") or {} for i in items["items"]}

    def holders() -> dict[str, str] | None:
        found = {n: str(st.get("worker") or "") for n, st in statuses().items() if n in uids}
        return found if len(found) == len(names) and all(found.values()) else None

    held = wait_for("every run to be held by a worker", holders, timeout=60)
    assert isinstance(held, dict)
    assert set(held.values()) <= set(workers)
    assert len(set(held.values())) > 1, f"one worker took everything: {held}"

    # Each worker exports the runs it executes (the HPA's optional runs-per-worker metric).
    def exported() -> dict[str, float] | None:
        running = Counter(
            st.get("worker") for st in statuses().values() if st.get("phase") == "Running"
        )
        found = {
            w: metrics(p.metrics_port)("agentrun_runs_active", state="running")
            for w, p in workers.items()
        }
        return (
            found
            if found == {w: float(running[w]) for w in workers} and any(found.values())
            else None
        )

    wait_for("each worker's agentrun_runs_active to count the runs it holds", exported, timeout=20)
    victim = Counter(held.values()).most_common(1)[0][0]
    orphans = [n for n, w in held.items() if w == victim]
    killed_ms = int(time.time() * 1000)  # Redis stream ids count ms on the same clock
    workers[victim].kill()
    killed_at = time.monotonic()

    def taken_over() -> bool:
        now = statuses()
        return all(
            now[n].get("worker") not in (None, victim) or now[n].get("phase") == "Succeeded"
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
    # Every run the victim had not ended when it died was ended by another worker (at larger
    # counts some end on the victim while the test looks).
    unfinished = [n for n in orphans if int(stream(r, uids[n])[-1]["id"].split("-")[0]) > killed_ms]
    assert unfinished, "the victim ended all its runs before it was killed"
    for n in unfinished:
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


def test_the_standby_controller_takes_over_when_the_active_one_is_killed(
    kubectl: Kubectl,
    namespace: str,
    script: Script,
    r: redis_sync.Redis,
    controllers: dict[str, OperatorProcess],
) -> None:
    active = wait_for("a controller to hold the Lease", lambda: lease_holder(kubectl), timeout=30)
    assert active in controllers, active
    standby = next(c for c in controllers if c != active)
    assert "standing by: the controller lease" in controllers[standby].log_tail(400)
    goal = talking(script, "wk-ctl", words=150, tps=30)  # ~5 s of tokens
    before = [f"before-{i}" for i in range(4)]
    uids = {n: create_run(kubectl, namespace, n, goal=goal) for n in before}
    wait_for(
        "the runs to be held by workers",
        lambda: all((get_run(kubectl, namespace, n).get("status") or {}).get("worker")
                    for n in before),
        timeout=60,
    )  # fmt: skip
    controllers[active].kill()
    killed = time.monotonic()
    wait_for(
        f"{standby} to take the Lease",
        lambda: lease_holder(kubectl) == standby,
        timeout=LEASE_SECONDS * 3 + 10,
        interval=0.2,
    )
    print(f"[figure] controller SIGKILL -> standby holds the Lease: "
          f"{time.monotonic() - killed:.1f}s (lease {LEASE_SECONDS}s)")  # fmt: skip
    # Admitted by the new controller only: the killed one is gone.
    after = [f"after-{i}" for i in range(3)]
    uids |= {n: create_run(kubectl, namespace, n, goal=goal) for n in after}
    for n in before + after:
        st = wait_phase(kubectl, namespace, n, "Succeeded", "Failed", timeout=120)
        assert st["phase"] == "Succeeded", (n, st)
        evs = stream(r, uids[n])
        assert_clean_stream(evs)
        assert_each_call_once(evs)
    # Back as a replica: it stands by, the Lease stays where it is.
    controllers[active].start()
    wait_for(
        f"{active} to stand by",
        lambda: "standing by: the controller lease" in controllers[active].log_tail(50),
        timeout=30,
    )
    assert lease_holder(kubectl) == standby


def test_a_controller_stopped_with_sigterm_hands_the_lease_over_at_once(
    kubectl: Kubectl,
    namespace: str,
    script: Script,
    controllers: dict[str, OperatorProcess],
) -> None:
    active = wait_for("a controller to hold the Lease", lambda: lease_holder(kubectl), timeout=30)
    assert isinstance(active, str) and active in controllers
    standby = next(c for c in controllers if c != active)
    controllers[active].terminate()
    asked = time.monotonic()
    wait_for(
        f"{standby} to take the released Lease",
        lambda: lease_holder(kubectl) == standby,
        timeout=LEASE_SECONDS * 3,
        interval=0.1,
    )
    took = time.monotonic() - asked
    print(f"[figure] controller SIGTERM -> standby holds the Lease: {took:.1f}s")
    assert took < LEASE_SECONDS - 1, f"{took:.1f}s: the Lease was not released on SIGTERM?"
    controllers[active].stop()
    # The new one acts: a run is admitted and finishes.
    done = script.add(marker("wk-after-term"), [{"text": "done"}])
    create_run(kubectl, namespace, "after-term", goal=done)
    assert wait_phase(kubectl, namespace, "after-term", "Succeeded", "Failed")["phase"] == (
        "Succeeded"
    )
    controllers[active].start()


def test_a_worker_cut_off_longer_than_its_lease_is_fenced_and_takes_nothing_back(
    kubectl: Kubectl,
    namespace: str,
    script: Script,
    r: redis_sync.Redis,
    workers: dict[str, OperatorProcess],
) -> None:
    goal = talking(script, "wk-freeze", words=600, tps=30)  # ~20 s of tokens
    uid = create_run(kubectl, namespace, "frozen", goal=goal)

    def holder() -> str | None:
        return (get_run(kubectl, namespace, "frozen").get("status") or {}).get("worker")

    first = wait_for("a worker to hold the run", holder, timeout=60)
    assert isinstance(first, str)
    wait_for("tokens", lambda: any(e["type"] == "token" for e in stream(r, uid)), timeout=60)
    # SIGSTOP: the worker is cut off from Redis and the API server alike, past its lease.
    workers[first].freeze()
    try:
        second = wait_for(
            "another worker to take the run over",
            lambda: (h := holder()) not in (None, first) and h,
            timeout=60,
            interval=0.2,
        )
    finally:
        workers[first].thaw()
    # Awake again, the old worker's late appends are refused (the fenced lease) and it lets
    # go: it neither takes the work entry back nor acknowledges it under the new holder.
    wait_for(
        f"{first} to find itself fenced",
        lambda: (
            "lost the lease of run" in workers[first].log_tail(4000)
            or f"run {namespace}/frozen: lease lost" in workers[first].log_tail(4000)
        ),
        timeout=30,
    )
    time.sleep(LEASE_SECONDS)  # a lapse of time, not a wait: the old worker's rounds run
    pending = {
        bytes(e["consumer"]).decode()  # type: ignore[arg-type]
        for e in r.xpending_range("agentrun:work:{0}", "workers", "-", "+", 1000)
    }
    assert get_run(kubectl, namespace, "frozen")["status"]["phase"] == "Running"
    # Still running on the new holder, whose entry is still pending on it: were it to die
    # now, a third worker would reclaim the run.
    assert pending == {second}, f"the entry should be pending on {second} only: {pending}"
    st = wait_phase(kubectl, namespace, "frozen", "Succeeded", "Failed", timeout=120)
    assert st["phase"] == "Succeeded", st
    assert st["worker"] == second, st
    evs = stream(r, uid)
    assert_clean_stream(evs)
    assert_each_call_once(evs)
    wait_for(
        "the entry to be acknowledged by the worker that finished the run",
        lambda: not r.xpending_range("agentrun:work:{0}", "workers", "-", "+", 1000),
        timeout=15,
    )


@pytest.fixture(scope="module")
def limited_controller(
    cluster: ControlPlane,
    rbac: None,
    webhooks: Any,
    redis_server: Any,
    script: Script,
    workers: dict[str, OperatorProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    """A controller of its own namespaces (wq-*) allowing 2 runs at once on all workers
    together (the module's workers, 3 of them, could run 50 each)."""
    proc = own_operator(
        cluster, redis_url=redis_server.url, script=script,
        workdir=tmp_path_factory.mktemp("limited"), namespaces="wq-*", ident="ctl-limited",
        env={"AGENTRUN_ROLE": "controller", "AGENTRUN_MAX_CONCURRENT_RUNS": "2"},
    )  # fmt: skip
    with proc:
        yield proc


@pytest.fixture
def limited_namespace(
    kubectl: Kubectl,
    request: pytest.FixtureRequest,
    limited_controller: OperatorProcess,
    workers: dict[str, OperatorProcess],
) -> Iterator[str]:
    yield from judged_namespace(
        kubectl, request, "wq-", ("controller", limited_controller), *workers.items()
    )


def test_the_controller_limits_concurrent_runs_across_all_workers(
    kubectl: Kubectl, limited_namespace: str, script: Script, r: redis_sync.Redis
) -> None:
    ns = limited_namespace
    goal = talking(script, "wq-limit", words=60, tps=30)  # ~2 s each
    names = [f"limited-{i}" for i in range(5)]
    uids = {n: create_run(kubectl, ns, n, goal=goal) for n in names}
    most, queued_seen = 0, dict[str, str]()

    def all_done() -> bool:
        nonlocal most
        items = json.loads(kubectl("get", "agentruns", "-n", ns, "-o", "json").stdout)["items"]
        phases = {i["metadata"]["name"]: i.get("status") or {} for i in items}
        most = max(most, sum(1 for st in phases.values() if st.get("phase") == "Running"))
        for n, st in phases.items():
            if st.get("phase") == "Pending":  # queued
                queued_seen[n] = st.get("message") or ""
        return all(st.get("phase") in ("Succeeded", "Failed") for st in phases.values())

    wait_for("the limited runs to finish", all_done, timeout=120, interval=0.1)
    assert most <= 2, f"{most} runs executed at once with AGENTRUN_MAX_CONCURRENT_RUNS=2"
    assert most == 2, "the limit was never reached: the test proves nothing"
    assert len(queued_seen) >= 3, f"runs beyond the limit should wait, Queued: {queued_seen}"
    for n in names:
        st = get_run(kubectl, ns, n)["status"]
        assert st["phase"] == "Succeeded", (n, st)
        assert_clean_stream(stream(r, uids[n]))
    assert all("on the workers (AGENTRUN_MAX_CONCURRENT_RUNS=2)" in m for m in queued_seen.values())
