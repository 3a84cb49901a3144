"""The approval rules as pure functions: tallying votes, quorum, expiry, the mutations that
record identities, and the refusals, each with the message a person sees."""

from __future__ import annotations

import datetime as dt
from typing import Any

from agentrun_operator import approvals

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
ALICE = approvals.User("alice", ("approvers",))
BOB = approvals.User("bob", ("approvers",))


def ta(votes: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"labels": {approvals.RUN_LABEL: "r", approvals.CALL_LABEL: "c-1"}},
        "spec": {
            "runName": "r",
            "callId": "c-1",
            "tool": "k8s_scale",
            "arguments": {},
            "votes": votes or [],
            **spec,
        },
        "status": {"state": "Pending", "expiresAt": "2026-11-24T13:00:00Z"},
    }


def run(**approval: Any) -> dict[str, Any]:
    return {
        "metadata": {"annotations": {approvals.CREATED_BY: "carol"}},
        "spec": {"goal": "g", "approval": approval},
    }


def vote(user: str, decision: str) -> dict[str, Any]:
    return {"username": user, "groups": [], "decision": decision, "at": "2026-11-24T12:00:00Z"}


def test_one_approval_settles_by_default_and_any_denial_denies() -> None:
    settled = approvals.settle(ta([vote("alice", "Approved")]), min_approvals=1, now=NOW)
    assert settled is not None and settled.outcome == "approved"
    two = ta([vote("alice", "Approved"), vote("bob", "Denied")])
    settled = approvals.settle(two, min_approvals=2, now=NOW)
    assert settled is not None and settled.outcome == "denied" and settled.by == "bob"


def test_a_quorum_needs_distinct_people() -> None:
    same = ta([vote("alice", "Approved"), vote("alice", "Approved")])
    assert approvals.settle(same, min_approvals=2, now=NOW) is None
    both = ta([vote("alice", "Approved"), vote("bob", "Approved")])
    settled = approvals.settle(both, min_approvals=2, now=NOW)
    assert settled is not None and settled.by == "alice, bob"


def test_an_undecided_approval_expires_at_its_time() -> None:
    assert approvals.settle(ta(), min_approvals=1, now=NOW) is None
    later = NOW + dt.timedelta(hours=2)
    settled = approvals.settle(ta(), min_approvals=1, now=later)
    assert settled is not None and settled.outcome == "expired"


def test_a_decision_becomes_a_vote_with_the_requesters_identity() -> None:
    old = ta()
    new = ta(
        decision="Approved",
        comment="go",
        decidedBy={"username": "mallory"},
        votes=[vote("mallory", "Approved")],
    )
    ops = approvals.mutate_toolapproval(
        operation="UPDATE", user=ALICE, obj=new, old=old, operators=frozenset(), now=NOW
    )
    by_path = {op["path"]: op["value"] for op in ops}
    assert by_path["/spec/decidedBy"] == {"username": "alice", "groups": ["approvers"]}
    [recorded] = by_path["/spec/votes"]
    assert recorded["username"] == "alice" and recorded["comment"] == "go"


def test_refusals_name_the_rule() -> None:
    def check(
        user: approvals.User,
        old: dict[str, Any],
        new_votes: list[dict[str, Any]],
        the_run: dict[str, Any],
    ) -> str | None:
        new = ta(new_votes, decision=new_votes[-1]["decision"])
        new["status"] = old["status"]
        return approvals.validate_toolapproval(
            operation="UPDATE", user=user, obj=new, old=old, run=the_run, operators=frozenset()
        )

    outsider = approvals.User("eve", ("devs",))
    msg = check(outsider, ta(), [vote("eve", "Approved")], run(approvers={"groups": ["approvers"]}))
    assert msg and "eve is not among the approvers of run r" in msg
    carol = approvals.User("carol", ("approvers",))
    msg = check(carol, ta(), [vote("carol", "Approved")], run())
    assert msg and "carol created run r and may not approve" in msg
    assert check(carol, ta(), [vote("carol", "Approved")], run(allowSelfApproval=True)) is None
    assert check(carol, ta(), [vote("carol", "Denied")], run()) is None, "denying is always safe"
    decided = ta([vote("alice", "Approved")], decision="Approved")
    msg = check(BOB, decided, [vote("alice", "Approved"), vote("bob", "Denied")], run())
    assert msg == "already approved by alice"
    twice = ta([vote("alice", "Approved")], decision="Approved")
    msg = check(
        ALICE, twice, [vote("alice", "Approved"), vote("alice", "Approved")], run(minApprovals=2)
    )
    assert msg and "one vote per person" in msg


def test_the_creator_and_stopper_annotations_come_from_the_request() -> None:
    forged = {"metadata": {"annotations": {approvals.CREATED_BY: "boss"}}, "spec": {"goal": "g"}}
    ops = approvals.mutate_agentrun(operation="CREATE", user=ALICE, obj=forged, old=None)
    assert ops == [
        {"op": "add", "path": "/metadata/annotations", "value": {approvals.CREATED_BY: "alice"}}
    ]
    old = {"metadata": {"annotations": {approvals.CREATED_BY: "alice"}}, "spec": {"stop": False}}
    new = {"metadata": {"annotations": {approvals.CREATED_BY: "bob"}}, "spec": {"stop": True}}
    ops = approvals.mutate_agentrun(operation="UPDATE", user=BOB, obj=new, old=old)
    assert ops[0]["value"] == {approvals.CREATED_BY: "alice", approvals.STOPPED_BY: "bob"}


def test_only_stop_may_change_in_a_runs_spec() -> None:
    old = {"metadata": {"name": "r"}, "spec": {"goal": "a", "stop": False}}
    assert (
        approvals.validate_agentrun(
            operation="UPDATE",
            obj={"spec": {"goal": "a", "stop": True}},
            old=old,
            allowed_base_urls=[],
        )
        is None
    )
    msg = approvals.validate_agentrun(
        operation="UPDATE",
        obj={"spec": {"goal": "b", "stop": False}},
        old=old,
        allowed_base_urls=[],
    )
    assert msg and msg.startswith("spec.goal: an AgentRun's spec cannot change")
