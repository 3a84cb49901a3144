"""Scenario 1 of the fault suite: the operator killed with -9 at random points across many
concurrent runs.

Covers: kills chosen by events (mid-token, mid-tool, while runs await approval), decisions
made while the operator is down, a stop that arrives after many restarts; then every run
reaches its right end phase, every side-effecting tool call was executed exactly once as
counted on the cluster (appended env entries and ``metadata.generation`` of its Deployment),
each call is reported once, and no stream has a gap, a duplicate or a second ``end``.
Also: a tool outcome and its call record are written in one fenced step; and decisions
that race a run's approval gate are never lost (without the fix that made this hold, the
race test hits the window in about half of its runs).
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import redis as redis_sync
from faults.conftest import Figures, count
from faults.fault_support import (
    FINISHED,
    Tail,
    all_finished,
    append_call,
    create_target,
    decide,
    executions,
    fault_namespace,
    start_operator,
)

from agentrun_harness.controlplane import ControlPlane
from agentrun_harness.redisserver import RedisServer
from agentrun_operator import events

from support import Kubectl, OperatorProcess, Script, create_run, marker, stream, wait_for

SCENARIO = "Operator crash"
KILLS = count(20, 5)
RUNS = count(20, 8)
SEED = 20260107
# Words per streamed reply and their pace: a reply takes about 2 s, so runs are mid-token
# most of the time, and each run makes progress between kills.
WORDS, TPS = 30, 15
# Tool calls of a streaming run: enough that runs still work while the last kills land.
STREAM_CALLS = count(6, 2)
RACES = 10  # runs whose two approvals are decided at the same moment


@dataclass(frozen=True)
class Plan:
    """One run of the scenario and what must come of it."""

    name: str
    kind: str  # stream | approve | deny | stop
    calls: int  # tool calls the model asks for
    phase: str  # the end phase it must reach

    @property
    def executed(self) -> int:
        return self.calls if self.kind in ("stream", "approve") else 0

    def tags(self) -> list[str]:
        return [f"{self.name}-{k}" for k in range(1, self.executed + 1)]


def plans(n: int) -> list[Plan]:
    kinds = ["stream", "approve", "stream", "deny", "stop"]
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        calls = {"stream": STREAM_CALLS + i % 2, "approve": 1, "deny": 1, "stop": 0}[kind]
        phase = "Stopped" if kind == "stop" else "Succeeded"
        out.append(Plan(f"r{i:02d}-{kind}", kind, calls, phase))
    return out


def words(tag: str) -> str:
    return " ".join(f"{tag}{k}" for k in range(WORDS))


def script_for(script: Script, plan: Plan) -> str:
    paced = {"tokens_per_second": TPS}
    replies: list[dict[str, Any]] = [{"text": "plan: " + words("p"), **paced}]
    if plan.kind == "stop":
        replies.append({"hang": True})  # waits on the model until stopped
    else:
        for k in range(1, plan.calls + 1):
            replies.append(
                {
                    "text": words(f"a{k}-"),
                    "tool_calls": [append_call(plan.name, f"{plan.name}-{k}")],
                    **paced,
                }
            )
        replies.append({"text": "done: " + words("f"), **paced})
    return script.add(marker(plan.name), replies)


@pytest.fixture(scope="module")
def crash_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(workdir=tmp_path_factory.mktemp("redis-crash")) as server:
        yield server


@pytest.fixture(scope="module")
def crashing_operator(
    cluster: ControlPlane,
    rbac: None,
    webhooks: object,
    crash_redis: RedisServer,
    script: Script,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    with start_operator(
        cluster,
        redis_url=crash_redis.url,
        script=script,
        workdir=tmp_path_factory.mktemp("operator-crash"),
        namespaces="fcrash-*",
    ) as proc:
        yield proc


@pytest.fixture
def namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    yield from fault_namespace(kubectl, request, "fcrash-")


@pytest.fixture
def r(crash_redis: RedisServer) -> Iterator[redis_sync.Redis]:
    client = redis_sync.Redis.from_url(crash_redis.url)
    yield client
    client.close()


def pending_approvals(
    kubectl: Kubectl, namespace: str, *, run: str | None = None
) -> list[tuple[str, str]]:
    """(approval name, run name) of every ToolApproval nobody has decided yet."""
    out = kubectl("get", "toolapprovals", "-n", namespace, "-o", "json")
    return [
        (ta["metadata"]["name"], ta["spec"]["runName"])
        for ta in json.loads(out.stdout)["items"]
        if (ta.get("status") or {}).get("state") == "Pending"
        and not ta["spec"].get("votes")
        and run in (None, ta["spec"]["runName"])
    ]


def situation(kubectl: Kubectl, namespace: str) -> str:
    """Runs and approvals as they are: for the message of a failed wait."""
    runs = json.loads(kubectl("get", "agentruns", "-n", namespace, "-o", "json").stdout)
    tas = json.loads(kubectl("get", "toolapprovals", "-n", namespace, "-o", "json").stdout)
    lines = [
        f"run {i['metadata']['name']}: {(i.get('status') or {}).get('phase')} "
        f"{(i.get('status') or {}).get('message')!r}"
        for i in runs["items"]
    ]
    lines += [
        f"approval {t['metadata']['name']}: decision {t['spec'].get('decision')}, "
        f"state {(t.get('status') or {}).get('state')}"
        for t in tas["items"]
    ]
    return "\n".join(lines)


def decide_one(
    kubectl: Kubectl, namespace: str, by_name: dict[str, Plan], rng: random.Random
) -> bool:
    pending = pending_approvals(kubectl, namespace)
    if not pending:
        return False
    approval, run = rng.choice(pending)
    decide(kubectl, namespace, approval, "Approved" if by_name[run].kind == "approve" else "Denied")
    return True


@pytest.mark.timeout(count(1800, 420))
def test_kill_9_at_random_points_loses_nothing_and_repeats_nothing(
    kubectl: Kubectl,
    namespace: str,
    r: redis_sync.Redis,
    script: Script,
    crashing_operator: OperatorProcess,
    figures: Figures,
) -> None:
    operator = crashing_operator
    rng = random.Random(SEED)
    runs = plans(RUNS)
    by_name = {p.name: p for p in runs}
    uids: dict[str, str] = {}
    began = time.monotonic()
    for plan in runs:
        goal = script_for(script, plan)
        spec: dict[str, Any] = {"goal": goal}
        if plan.kind != "stop":
            create_target(kubectl, namespace, plan.name)
            spec |= {"serviceAccountName": "agent", "tools": ["k8s_patch"]}
        if plan.kind == "stream":
            spec["approval"] = {"required": []}
        uids[plan.name] = create_run(kubectl, namespace, plan.name, **spec)
    tail = Tail(r, uids)

    points: Counter[str] = Counter()
    triggers: dict[str, Callable[[dict[str, Any]], bool]] = {
        "mid-token": lambda e: e["type"] == "token",
        "mid-tool": lambda e: e["type"] == "tool" and e["data"]["status"] == "started",
        "awaiting approval": lambda e: (
            e["type"] == "workflow" and e["data"]["state"] == "awaiting_approval"
        ),
    }
    decided_while_down = 0
    try:
        # Each kind of kill point in turn, in a seeded random order.
        order = [sorted(triggers)[k % len(triggers)] for k in range(KILLS)]
        rng.shuffle(order)
        for n, point in enumerate(order, 1):
            tail.skip_to_now()
            waiting = tail.awaiting() if point == "awaiting approval" else []
            if waiting:
                hit: tuple[str, dict[str, Any]] | None = (waiting[0], {})  # it waits now
            else:
                hit = tail.wait(point, triggers[point], timeout=10)
            if hit is None:  # none of that kind any more: the next event of any kind
                hit = tail.wait(
                    "any kill point", lambda e: any(t(e) for t in triggers.values()), timeout=10
                )
                point = (
                    "other" if hit is None else next(k for k, t in triggers.items() if t(hit[1]))
                )
            if point == "mid-token":
                time.sleep(rng.uniform(0, 0.5))  # somewhere inside the streamed reply
            points[point] += 1
            at = time.monotonic() - began
            print(f"kill {n} at {at:.1f}s: {point} ({hit[0] if hit else 'no event'})")
            operator.kill()
            if rng.random() < 0.5 and decide_one(kubectl, namespace, by_name, rng):
                decided_while_down += 1
            operator.start()
        kills_took = time.monotonic() - began
        for plan in runs:
            if plan.kind == "stop":
                kubectl(
                    "patch",
                    "agentrun",
                    plan.name,
                    "-n",
                    namespace,
                    "--type=merge",
                    "-p",
                    '{"spec":{"stop":true}}',
                )

        def settled() -> bool:
            decide_one(kubectl, namespace, by_name, rng)  # approvals as they come
            out = json.loads(kubectl("get", "agentruns", "-n", namespace, "-o", "json").stdout)
            return all((i.get("status") or {}).get("phase") in FINISHED for i in out["items"])

        try:
            wait_for("every run to finish", settled, timeout=count(600, 240), interval=0.5)
        except AssertionError as timeout:
            raise AssertionError(f"{timeout}\n{situation(kubectl, namespace)}") from None
        statuses = all_finished(kubectl, namespace, list(uids), timeout=5)
    except BaseException:
        print(f"--- operator log ---\n{operator.log_tail(150)}")
        raise

    # -- what the cluster and the streams say ------------------------------------------
    wrong: dict[str, str] = {}  # run name -> what is wrong with its status
    unclean, misreported = [], []
    twice = lost = cut_calls = 0
    for plan in runs:
        st = statuses[plan.name]
        if st.get("phase") != plan.phase:
            wrong[plan.name] = f"{st.get('phase')} ({st.get('message')})"
        evs = stream(r, uids[plan.name])
        seqs = [e["seq"] for e in evs]
        ends = sum(1 for e in evs if e["type"] == "end")
        if seqs != list(range(1, len(evs) + 1)) or ends != 1 or evs[-1]["type"] != "end":
            unclean.append(f"{plan.name}: seqs {seqs[:5]}...{seqs[-5:]}, {ends} end events")
        ids = [tuple(int(p) for p in e["id"].split("-")) for e in evs]
        assert ids == sorted(set(ids)), f"{plan.name}: ids not strictly increasing"
        if st.get("lastEventId") != evs[-1]["id"]:
            wrong[plan.name] = "status.lastEventId is not the stream's last id"
        # Reported once: one outcome per call, and never "unknown" (the stamp tells).
        outcomes: dict[str, list[str]] = {}
        open_calls: set[str] = set()
        for e in evs:
            if e["type"] == "tool" and e["data"]["status"] == "started":
                open_calls.add(e["data"]["callId"])
            elif e["type"] == "tool":
                open_calls.discard(e["data"]["callId"])
            elif e["type"] == "workflow" and e["data"]["state"] == "resumed":
                cut_calls += len(open_calls)  # a kill landed between a call's start and outcome
                open_calls.clear()
            if e["type"] == "tool" and e["data"]["status"] != "started":
                outcomes.setdefault(e["data"]["callId"], []).append(e["data"]["status"])
        want = {"stream": "succeeded", "approve": "succeeded", "deny": "denied"}.get(plan.kind)
        reported = sorted(s for v in outcomes.values() for s in v)
        if reported != ([want] * plan.calls if want else []):
            misreported.append(f"{plan.name}: {outcomes}")
        if plan.kind == "stop":
            continue
        done = executions(kubectl, namespace, plan.name)
        for tag in plan.tags():
            n = done.count(tag)
            twice += max(0, n - 1)
            lost += 1 if n == 0 else 0
        extra = [t for t in done.tags if t not in plan.tags()]
        assert not extra, f"{plan.name}: calls that should never have run: {extra}"
        assert done.generation == 1 + len(done.tags), f"{plan.name}: {done}"

    total_calls = sum(p.executed for p in runs)
    figures.record(SCENARIO, "kill -9 of the operator", KILLS, f"over {RUNS} concurrent runs")
    figures.record(
        SCENARIO,
        "kill points (mid-token/mid-tool/awaiting approval/other)",
        "/".join(str(points[k]) for k in ("mid-token", "mid-tool", "awaiting approval", "other")),
    )
    figures.record(SCENARIO, "decisions made while the operator was down", decided_while_down)
    figures.record(SCENARIO, "tool calls cut between their start and outcome", cut_calls)
    figures.record(
        SCENARIO,
        "runs at their right end phase",
        f"{RUNS - len(wrong)}/{RUNS}",
        f"{RUNS}/{RUNS}",
    )
    figures.record(SCENARIO, "side-effecting tool calls executed twice", twice, "0")
    figures.record(
        SCENARIO,
        "side-effecting tool calls lost",
        f"{lost} of {total_calls}",
        f"0 of {total_calls}",
    )
    figures.record(SCENARIO, "streams with a gap, duplicate or second end", len(unclean), "0")
    figures.record(SCENARIO, "wall time of the kills (s)", round(kills_took, 1))
    assert not wrong, wrong
    assert twice == 0 and lost == 0, (twice, lost)
    assert not unclean, unclean
    assert not misreported, misreported
    assert points["mid-token"] + points["mid-tool"] + points["awaiting approval"] >= KILLS // 2, (
        f"most kills should land inside runs: {points}"
    )


async def test_a_tool_outcome_and_its_call_record_are_one_fenced_write(
    crash_redis: RedisServer,
) -> None:
    """The kill that once made a resumed run report a call twice landed between two writes:
    the outcome event, then the record that the call is done. They are one step now."""
    redis = events.connect(crash_redis.url)
    uid = f"atomic-{uuid.uuid4().hex}"
    try:
        lease = await events.Lease.acquire(redis, uid=uid, operator_id="a", ttl_seconds=30)
        assert lease is not None
        writer = events.EventWriter(redis, uid=uid, run="ns/atomic", lease=lease, maxlen=1000)
        done = '{"state": "done", "content": "{}"}'
        await writer.append("tool", {"callId": "c-1", "status": "succeeded"}, call=("c-1", done))
        assert await redis.hget(events.calls_key(uid), "c-1") == done.encode()
        assert await redis.xlen(events.events_key(uid)) == 1
        # Another operator took the run over: the stale writer writes neither.
        await lease.release()
        assert await events.Lease.acquire(redis, uid=uid, operator_id="b", ttl_seconds=30)
        with pytest.raises(events.Fenced):
            await writer.append("tool", {"callId": "c-2", "status": "started"}, call=("c-2", "{}"))
        assert await redis.hget(events.calls_key(uid), "c-2") is None
        assert await redis.xlen(events.events_key(uid)) == 1
    finally:
        await events.delete_run_keys(redis, uid)
        await redis.aclose()


def test_decisions_racing_the_approval_gate_are_never_lost(
    kubectl: Kubectl,
    namespace: str,
    script: Script,
    crashing_operator: OperatorProcess,
) -> None:
    """Two calls in one turn, decided at once: the first vote starts the run's task, which
    reads the approvals; the second vote lands while that task is on its way back to
    waiting. The second vote must not be lost (the run would wait forever)."""
    names = [f"race-{i}" for i in range(RACES)]
    for name in names:
        # Two objects: two calls on one object in one turn would bind to a version the
        # first call changes (the second would then be Stale, by design).
        create_target(kubectl, namespace, name)
        create_target(kubectl, namespace, f"{name}-b")
        calls = [append_call(name, f"{name}-1"), append_call(f"{name}-b", f"{name}-2")]
        goal = script.add(
            marker(name),
            [{"text": "plan"}, {"text": "go", "tool_calls": calls}, {"text": "done"}],
        )
        create_run(
            kubectl, namespace, name, goal=goal, serviceAccountName="agent", tools=["k8s_patch"]
        )
    for name in names:

        def both_pending(name: str = name) -> bool:
            return len(pending_approvals(kubectl, namespace, run=name)) == 2

        wait_for(f"{name} to wait for two decisions", both_pending)
    for name in names:
        first, second = (a for a, _ in pending_approvals(kubectl, namespace, run=name))
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda a: decide(kubectl, namespace, a, "Approved"), (first, second)))
    statuses = all_finished(kubectl, namespace, names, timeout=60)
    assert {n: s["phase"] for n, s in statuses.items()} == dict.fromkeys(names, "Succeeded")
    for name in names:
        assert executions(kubectl, namespace, name).tags == [f"{name}-1"]
        assert executions(kubectl, namespace, f"{name}-b").tags == [f"{name}-2"]
