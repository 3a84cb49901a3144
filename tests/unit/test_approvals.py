"""The approval rules as pure functions: tallying votes, quorum, expiry, the mutations that
record identities, and the refusals, each with the message a person sees."""

from __future__ import annotations

import datetime as dt
from typing import Any

from agentrun_operator import approvals, contract, models

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
ALICE = approvals.User("alice", ("approvers",))
BOB = approvals.User("bob", ("approvers",))


def ta(votes: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"labels": {contract.RUN_LABEL: "r", contract.CALL_ID_LABEL: "c-1"}},
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
    """A run whose settings the operator fixed (status.effective), created by carol; its
    live spec and annotations say otherwise, and must not matter."""
    effective = models.effective_settings(
        models.AgentRunSpec.model_validate({"goal": "g", "approval": approval}), generation=1
    )
    return {
        "metadata": {"namespace": "ns", "annotations": {contract.CREATED_BY: "mallory"}},
        "spec": {"goal": "g", "approval": {"allowSelfApproval": True}},
        "status": {"effective": effective, "createdBy": "carol"},
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
    by_path = {op["path"]: op.get("value") for op in ops}
    assert by_path["/spec/decidedBy"] == {"username": "alice", "groups": ["approvers"]}
    votes = by_path["/spec/votes"]
    assert isinstance(votes, list) and len(votes) == 1
    assert votes[0]["username"] == "alice" and votes[0]["comment"] == "go"
    removed = {op["path"] for op in ops if op["op"] == "remove"}
    assert removed == {"/spec/decision", "/spec/comment"}, "the request is not stored"


def test_an_edit_without_a_decision_never_votes() -> None:
    old = ta([vote("alice", "Approved")])
    relabelled = ta([vote("alice", "Approved")])
    relabelled["metadata"]["labels"]["team"] = "x"
    ops = approvals.mutate_toolapproval(
        operation="UPDATE", user=BOB, obj=relabelled, old=old, operators=frozenset(), now=NOW
    )
    votes = next(op["value"] for op in ops if op["path"] == "/spec/votes")
    assert [v["username"] for v in votes] == ["alice"]
    # An object stored before decisions became write-only keeps its old request: an edit
    # that merely carries it along is no new vote.
    legacy_old = ta([vote("alice", "Approved")], decision="Approved")
    legacy_new = ta([vote("alice", "Approved")], decision="Approved")
    ops = approvals.mutate_toolapproval(
        operation="UPDATE", user=BOB, obj=legacy_new, old=legacy_old, operators=frozenset(), now=NOW
    )
    votes = next(op["value"] for op in ops if op["path"] == "/spec/votes")
    assert [v["username"] for v in votes] == ["alice"]


def test_a_vote_after_the_deadline_does_not_count() -> None:
    late = {**vote("alice", "Approved"), "at": "2026-11-24T13:00:01Z"}
    settled = approvals.settle(ta([late]), min_approvals=1, now=NOW + dt.timedelta(hours=2))
    assert settled is not None and settled.outcome == "expired"
    assert approvals.settle(ta([late]), min_approvals=1, now=NOW) is None


def test_refusals_name_the_rule() -> None:
    def check(
        user: approvals.User,
        old: dict[str, Any],
        new_votes: list[dict[str, Any]],
        the_run: dict[str, Any],
    ) -> str | None:
        new = ta(new_votes)
        new["status"] = old["status"]
        new["metadata"]["namespace"] = "ns"
        return approvals.validate_toolapproval(
            operation="UPDATE",
            user=user,
            obj=new,
            old=old,
            run=the_run,
            operators=frozenset({"agentrun-operator"}),
            now=NOW,
        )

    outsider = approvals.User("eve", ("devs",))
    msg = check(outsider, ta(), [vote("eve", "Approved")], run(approvers={"groups": ["approvers"]}))
    assert msg and "eve is not among the approvers of run r" in msg
    carol = approvals.User("carol", ("approvers",))
    msg = check(carol, ta(), [vote("carol", "Approved")], run())
    assert msg and "carol created run r and may not approve" in msg
    assert check(carol, ta(), [vote("carol", "Approved")], run(allowSelfApproval=True)) is None
    assert check(carol, ta(), [vote("carol", "Denied")], run()) is None, "denying is always safe"
    decided = ta([vote("alice", "Approved")])
    msg = check(BOB, decided, [vote("alice", "Approved"), vote("bob", "Denied")], run())
    assert msg == "already approved by alice"
    twice = ta([vote("alice", "Approved")])
    msg = check(
        ALICE, twice, [vote("alice", "Approved"), vote("alice", "Approved")], run(minApprovals=2)
    )
    assert msg and "one vote per person" in msg
    agent = approvals.User("system:serviceaccount:ns:default", ("system:serviceaccounts",))
    msg = check(agent, ta(), [vote(agent.username, "Approved")], run())
    assert msg and "an agent never decides its own tool calls" in msg
    unsettled = ta()
    unsettled["status"] = {}
    msg = check(ALICE, unsettled, [vote("alice", "Approved")], run())
    assert msg and "not open for decisions yet" in msg
    unfixed = run()
    del unfixed["status"]["effective"]
    msg = check(ALICE, ta(), [vote("alice", "Approved")], unfixed)
    assert msg and "no fixed settings yet" in msg


def test_a_comment_without_a_decision_is_refused() -> None:
    lone = ta(comment="looks fine")
    msg = approvals.validate_toolapproval(
        operation="UPDATE",
        user=ALICE,
        obj=lone,
        old=ta(),
        run=run(),
        operators=frozenset(),
        now=NOW,
    )
    assert msg and "send it together with spec.decision" in msg


def test_a_decision_after_the_deadline_is_refused() -> None:
    late = NOW + dt.timedelta(hours=2)
    old = ta()
    new = ta([vote("alice", "Approved")])
    msg = approvals.validate_toolapproval(
        operation="UPDATE", user=ALICE, obj=new, old=old, run=run(), operators=frozenset(), now=late
    )
    assert msg and "expired at 2026-11-24T13:00:00Z" in msg


def test_the_creator_and_stopper_annotations_come_from_the_request() -> None:
    forged = {"metadata": {"annotations": {contract.CREATED_BY: "boss"}}, "spec": {"goal": "g"}}
    ops = approvals.mutate_agentrun(operation="CREATE", user=ALICE, obj=forged, old=None)
    assert ops == [
        {"op": "add", "path": "/metadata/annotations", "value": {contract.CREATED_BY: "alice"}}
    ]
    old = {"metadata": {"annotations": {contract.CREATED_BY: "alice"}}, "spec": {"stop": False}}
    new = {"metadata": {"annotations": {contract.CREATED_BY: "bob"}}, "spec": {"stop": True}}
    ops = approvals.mutate_agentrun(operation="UPDATE", user=BOB, obj=new, old=old)
    assert ops[0]["value"] == {contract.CREATED_BY: "alice", contract.STOPPED_BY: "bob"}


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


def test_the_model_allow_list_compares_urls_not_strings() -> None:
    allowed = ["https://llm.example.com/v1"]
    assert approvals.base_url_allowed("https://llm.example.com/v1", allowed)
    assert approvals.base_url_allowed("HTTPS://LLM.example.com:443/v1/", allowed)
    assert approvals.base_url_allowed("https://llm.example.com/v1/chat", allowed)
    for bad in (
        "https://llm.example.com.evil.net/v1",
        "https://llm.example.com/v10",
        "https://llm.example.com/v1/../admin",
        "https://llm.example.com/v1/%2e%2e/admin",
        "https://llm.example.com@evil.net/v1",
        "https://user@llm.example.com/v1",
        "http://llm.example.com/v1",
        "https://llm.example.com:8443/v1",
        "https://llm.example.com:99999/v1",
    ):
        assert not approvals.base_url_allowed(bad, allowed), bad
