"""Approvals on real parts: the operator process creates ToolApprovals, people decide them
with kubectl as themselves, and the admission webhook server (called by kube-apiserver over
HTTPS on loopback: real admission calls) records who decided and refuses what is not theirs.

Covers: approve → the tool runs exactly once; deny → the agent is told; the viewer's patch
→ 403 from RBAC; a decider outside `approvers`; the creator approving their own run; a
forged decidedBy; a second decision; operator-written fields; timeout with `deny` and with
`stop`; stop while waiting (approvals Cancelled); the operator killed while waiting with the
decision made while it is down; two calls needing approval in one run; who created and
who stopped a run; spec immutability; a call with bad arguments fails as a tool error
without asking anyone.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis as redis_sync

from agentrun_operator import approvals

from support import (
    Kubectl,
    OperatorProcess,
    Script,
    bind_roles,
    create_run,
    get_run,
    marker,
    stream,
    wait_event,
    wait_for,
    wait_phase,
)


@pytest.fixture
def namespace(op_namespace: str, kubectl: Kubectl) -> str:
    """An operator-watched namespace where the test users have their agentrun roles."""
    bind_roles(
        kubectl,
        op_namespace,
        [
            ("approver", "agentrun-approver"),
            ("approver2", "agentrun-approver"),
            ("viewer", "agentrun-viewer"),
            ("creator", "agentrun-editor"),
            ("creator", "agentrun-approver"),
            ("creator", "agentrun-sa-user"),  # the runs act as agent_sa
        ],
    )
    return op_namespace


pytestmark = pytest.mark.usefixtures("operator_log_on_failure")


def scale_script(
    script: Script, name: str, *, replicas: int = 3, calls: int = 1, targets: int = 1
) -> str:
    """Calls scaling web (or web, web-1, web-2... with ``targets``), all in one turn."""
    tool_calls = [
        {
            "name": "k8s_scale",
            "arguments": {
                "kind": "Deployment",
                "name": "web" if i % targets == 0 else f"web-{i % targets}",
                "replicas": replicas + i,
            },
        }
        for i in range(calls)
    ]
    return script.add(
        marker(name),
        [
            {"text": "plan: scale web"},
            {"tool_calls": tool_calls},
            {"text": "done"},
        ],
    )


def start_scaling_run(
    kubectl: Kubectl, namespace: str, agent_sa: str, goal: str, name: str = "scale", **spec: Any
) -> str:
    kubectl("create", "deployment", "web", "--image=nginx", "-n", namespace)
    approval = {"approvers": {"groups": ["approvers"]}, **spec.pop("approval", {})}
    return create_run(
        kubectl,
        namespace,
        name,
        goal=goal,
        serviceAccountName=agent_sa,
        tools=["k8s_scale", "k8s_get"],
        approval=approval,
        **spec,
    )


def approvals_of(kubectl: Kubectl, namespace: str, run: str) -> list[dict[str, Any]]:
    out = kubectl(
        "get", "toolapprovals", "-n", namespace, "-l", f"agentrun.dev/run={run}", "-o", "json"
    )
    return list(json.loads(out.stdout)["items"])


def wait_awaiting(kubectl: Kubectl, namespace: str, run: str, count: int = 1) -> list[str]:
    st = wait_phase(kubectl, namespace, run, "AwaitingApproval", "Failed", "Succeeded")
    assert st["phase"] == "AwaitingApproval", st
    wait_for(
        f"{count} pending approvals", lambda: len(approvals_of(kubectl, namespace, run)) == count
    )
    st = get_run(kubectl, namespace, run)["status"]
    assert st["pendingApprovalCount"] == count
    return list(st["pendingApprovals"])


def decide(
    kubectl: Kubectl, namespace: str, name: str, user: str, decision: str, **extra: Any
) -> Any:
    body = {"spec": {"decision": decision, **extra}}
    return kubectl.as_user(user)(
        "patch",
        "toolapproval",
        name,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps(body),
        check=False,
    )


def replicas(kubectl: Kubectl, namespace: str) -> dict[str, Any]:
    return dict(json.loads(kubectl("get", "deploy", "web", "-n", namespace, "-o", "json").stdout))


def test_an_approved_call_runs_exactly_once_and_says_who_approved(
    kubectl: Kubectl, namespace: str, agent_sa: str, r: redis_sync.Redis, script: Script
) -> None:
    uid = start_scaling_run(kubectl, namespace, agent_sa, scale_script(script, "approve"))
    [name] = wait_awaiting(kubectl, namespace, "scale")
    ta = approvals_of(kubectl, namespace, "scale")[0]
    assert ta["spec"]["tool"] == "k8s_scale" and ta["spec"]["arguments"]["replicas"] == 3
    assert ta["status"]["state"] == "Pending" and ta["status"]["expiresAt"]
    assert ta["metadata"]["ownerReferences"][0]["uid"] == uid
    assert ta["metadata"]["labels"]["agentrun.dev/call-id"] == ta["spec"]["callId"]
    assert replicas(kubectl, namespace)["spec"]["replicas"] == 1, "nothing runs before a decision"
    columns = kubectl("get", "ta", "-n", namespace).stdout
    assert "k8s_scale" in columns and "Pending" in columns
    # What it would change, from a dry run as the run's account, before anyone decides.
    preview = ta["status"]["preview"]
    assert preview["summary"] == "spec.replicas 1→3" and preview["operation"] == "update"
    assert preview["target"]["uid"] == replicas(kubectl, namespace)["metadata"]["uid"]
    wide = kubectl("get", "ta", "-n", namespace, "-o", "wide").stdout
    assert "CHANGE" in wide and "spec.replicas 1→3" in wide
    pending = wait_event(r, uid, "the pending approval", lambda e: e["type"] == "approval")
    assert pending["data"]["preview"]["changes"] == [
        {"path": "spec.replicas", "before": "1", "after": "3"}
    ]

    proc = decide(
        kubectl,
        namespace,
        name,
        "approver",
        "Approved",
        comment="go",
        decidedBy={"username": "admin", "groups": ["system:masters"]},
    )
    assert proc.returncode == 0, proc.stderr
    st = wait_phase(kubectl, namespace, "scale", "Succeeded", "Failed")
    assert st["phase"] == "Succeeded"
    ta = approvals_of(kubectl, namespace, "scale")[0]
    assert ta["spec"]["decidedBy"]["username"] == "approver", "a forged decidedBy is overwritten"
    assert ta["spec"]["votes"][0]["username"] == "approver"
    assert ta["spec"]["votes"][0]["groups"] and "approvers" in ta["spec"]["votes"][0]["groups"]
    assert ta["status"]["state"] == "Approved"
    assert ta["status"]["decidedBy"]["username"] == "approver"
    deploy = replicas(kubectl, namespace)
    assert deploy["spec"]["replicas"] == 3 and deploy["metadata"]["generation"] == 2
    evs = stream(r, uid)
    approval_states = [e["data"]["state"] for e in evs if e["type"] == "approval"]
    assert approval_states == ["pending", "approved"]
    approved = next(
        e["data"] for e in evs if e["type"] == "approval" and e["data"]["state"] == "approved"
    )
    assert approved["decidedBy"] == "approver" and approved["approval"] == name
    tool = [(e["data"]["name"], e["data"]["status"]) for e in evs if e["type"] == "tool"]
    assert tool == [("k8s_scale", "started"), ("k8s_scale", "succeeded")]
    states = [e["data"]["state"] for e in evs if e["type"] == "workflow"]
    assert "awaiting_approval" in states and "resumed" in states

    # A second decision, by anyone, is refused: the approval is settled.
    late = decide(kubectl, namespace, name, "approver2", "Denied")
    assert late.returncode != 0 and "already" in late.stderr, late.stderr


def test_a_denied_call_is_not_run_and_the_agent_is_told_why(
    kubectl: Kubectl, namespace: str, agent_sa: str, r: redis_sync.Redis, script: Script
) -> None:
    uid = start_scaling_run(kubectl, namespace, agent_sa, scale_script(script, "deny"))
    [name] = wait_awaiting(kubectl, namespace, "scale")
    assert decide(kubectl, namespace, name, "approver", "Denied", comment="not now").returncode == 0
    assert wait_phase(kubectl, namespace, "scale", "Succeeded", "Failed")["phase"] == "Succeeded"
    assert replicas(kubectl, namespace)["spec"]["replicas"] == 1
    tool = next(e["data"] for e in stream(r, uid) if e["type"] == "tool")
    assert tool["status"] == "denied" and tool["result"]["comment"] == "not now"
    assert "denied by approver" in tool["result"]["error"]
    prompts = [
        c
        for c in script.llm.calls
        if any("not now" in str(m.get("content")) for m in c["messages"])
    ]
    assert prompts, "the agent saw the denial and its comment"


def test_a_call_with_bad_arguments_fails_as_a_tool_error_without_asking_anyone(
    kubectl: Kubectl, namespace: str, agent_sa: str, r: redis_sync.Redis, script: Script
) -> None:
    # Two calls needing approval whose arguments can never run: one misses 'replicas', one
    # is nested deeper than a ToolApproval may hold (the webhook would refuse it).
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(70):
        deep = {"x": deep}
    goal = script.add(
        marker("bad-args"),
        [
            {"text": "plan: scale web"},
            {
                "tool_calls": [
                    {"name": "k8s_scale", "arguments": {"kind": "Deployment", "name": "web"}},
                    {
                        "name": "k8s_scale",
                        "arguments": {"kind": "Deployment", "name": "web", "replicas": deep},
                    },
                ]
            },
            {"text": "done"},
        ],
    )
    uid = start_scaling_run(kubectl, namespace, agent_sa, goal)
    st = wait_phase(kubectl, namespace, "scale", "Succeeded", "Failed", "AwaitingApproval")
    assert st["phase"] == "Succeeded", st
    assert approvals_of(kubectl, namespace, "scale") == [], "nobody is asked about them"
    evs = stream(r, uid)
    assert [e for e in evs if e["type"] == "approval"] == []
    failed = [e["data"] for e in evs if e["type"] == "tool" and e["data"]["status"] == "failed"]
    errors = sorted(f["result"]["error"] for f in failed)
    assert len(errors) == 2, errors
    assert "argument 'replicas' is required" in errors[0]
    assert "argument 'replicas': nested deeper than 58 levels" in errors[1]
    assert replicas(kubectl, namespace)["spec"]["replicas"] == 1


def nested(levels: int) -> dict[str, Any]:
    """An object whose innermost value sits ``levels`` keys down."""
    value: Any = "x"
    for _ in range(levels):
        value = {"a": value}
    return dict(value)


def test_arguments_nested_to_the_limit_pass_every_check_of_ours_and_one_more_level_does_not(
    kubectl: Kubectl, namespace: str, agent_sa: str, r: redis_sync.Redis, script: Script
) -> None:
    # The API server mirrors spec.arguments into managedFields six levels deeper; the
    # webhook must still take the deepest arguments the tools accept.
    limit = approvals.MAX_ARGUMENT_NESTING
    call = {"kind": "Deployment", "name": "web", "patch": nested(limit - 1)}
    too_deep = {"kind": "Deployment", "name": "web", "patch": nested(limit)}
    goal = script.add(
        marker("nesting"),
        [
            {"text": "plan: patch web"},
            {
                "tool_calls": [
                    {"name": "k8s_patch", "arguments": call},
                    {"name": "k8s_patch", "arguments": too_deep},
                ]
            },
            {"text": "done"},
        ],
    )
    kubectl("create", "deployment", "web", "--image=nginx", "-n", namespace)
    uid = create_run(
        kubectl, namespace, "deep", goal=goal, serviceAccountName=agent_sa, tools=["k8s_patch"]
    )
    if kubectl.plane.version() >= (1, 25):
        # At the limit, the call passed every check of ours: the API server's dry run is
        # what refused it (strict field validation: a Deployment has no field "a"), before
        # anyone was asked.
        phase = wait_phase(kubectl, namespace, "deep", "Succeeded", "Failed")["phase"]
        assert phase == "Succeeded"
        tool = [e["data"] for e in stream(r, uid) if e["type"] == "tool"]
        assert [t["status"] for t in tool] == ["failed", "failed"], tool
        assert "refused a dry run" in tool[0]["result"]["error"]
        assert "Invalid (422)" in tool[0]["result"]["error"]
        assert approvals_of(kubectl, namespace, "deep") == []
    else:
        # Before 1.25 the server drops unknown fields, so the dry run passes: a person is
        # asked about the deepest arguments the tools accept.
        [name] = wait_awaiting(kubectl, namespace, "deep")
        [ta] = approvals_of(kubectl, namespace, "deep")
        assert ta["spec"]["arguments"] == call
        assert decide(kubectl, namespace, name, "approver", "Denied").returncode == 0
        phase = wait_phase(kubectl, namespace, "deep", "Succeeded", "Failed")["phase"]
        assert phase == "Succeeded"
        tool = [e["data"] for e in stream(r, uid) if e["type"] == "tool"]
        assert [t["status"] for t in tool] == ["denied", "failed"], tool
    assert f"argument 'patch': nested deeper than {limit} levels" in tool[1]["result"]["error"]
    # And the webhook takes an approval whose arguments are that deep, from the operator.
    doc = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "ToolApproval",
        "metadata": {"name": "deep-c-0123456789ab"},
        "spec": {
            "runName": "deep",
            "callId": "c-0123456789ab",
            "tool": "k8s_patch",
            "arguments": call,
        },
    }
    operator = kubectl.as_user("agentrun-operator")
    proc = operator("create", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)
    assert proc.returncode == 0, proc.stderr
    stored = approvals.deeper_than(
        json.loads(
            kubectl("get", "ta", "deep-c-0123456789ab", "-n", namespace, "-o", "json").stdout
        )["spec"]["arguments"],
        limit,
    )
    assert stored is None


def test_people_without_the_right_cannot_decide(
    kubectl: Kubectl, namespace: str, agent_sa: str, script: Script
) -> None:
    start_scaling_run(kubectl, namespace, agent_sa, scale_script(script, "rights"))
    [name] = wait_awaiting(kubectl, namespace, "scale")
    viewer = decide(kubectl, namespace, name, "viewer", "Approved")
    assert viewer.returncode != 0 and "forbidden" in viewer.stderr.lower()
    assert "toolapprovals" in viewer.stderr, "RBAC, not the webhook, refused the viewer"
    outsider = decide(kubectl, namespace, name, "creator", "Approved")
    assert outsider.returncode != 0
    assert "creator is not among the approvers of run scale" in outsider.stderr
    assert "spec.approval.approvers" in outsider.stderr
    forged_votes = kubectl.as_user("approver")(
        "patch",
        "ta",
        name,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps(
            {
                "spec": {
                    "votes": [
                        {"username": "boss", "decision": "Approved", "at": "2026-01-01T00:00:00Z"}
                    ]
                }
            }
        ),
        check=False,
    )
    assert forged_votes.returncode == 0  # accepted, but the votes are the webhook's
    assert approvals_of(kubectl, namespace, "scale")[0]["spec"]["votes"] == []
    edit = kubectl.as_user("approver")(
        "patch",
        "ta",
        name,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"arguments": {"replicas": 100}}}),
        check=False,
    )
    assert edit.returncode != 0 and "spec.arguments is written by the operator" in edit.stderr
    assert get_run(kubectl, namespace, "scale")["status"]["phase"] == "AwaitingApproval"


def test_the_creator_may_not_approve_their_own_run(
    kubectl: Kubectl, namespace: str, agent_sa: str, script: Script
) -> None:
    kubectl("create", "deployment", "web", "--image=nginx", "-n", namespace)
    doc = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "AgentRun",
        "metadata": {"name": "mine"},
        "spec": {
            "goal": scale_script(script, "self"),
            "serviceAccountName": agent_sa,
            "tools": ["k8s_scale"],
        },
    }
    kubectl.as_user("creator")("create", "-n", namespace, "-f", "-", input=json.dumps(doc))
    run = get_run(kubectl, namespace, "mine")
    assert run["metadata"]["annotations"]["agentrun.dev/created-by"] == "creator"
    [name] = wait_awaiting(kubectl, namespace, "mine")
    assert get_run(kubectl, namespace, "mine")["status"]["createdBy"] == "creator"
    own = decide(kubectl, namespace, name, "creator", "Approved")
    assert own.returncode != 0
    assert "creator created run mine and may not approve" in own.stderr
    assert "allowSelfApproval" in own.stderr
    assert decide(kubectl, namespace, name, "approver", "Approved").returncode == 0
    assert wait_phase(kubectl, namespace, "mine", "Succeeded", "Failed")["phase"] == "Succeeded"


def test_a_forged_creator_annotation_is_overwritten(kubectl: Kubectl, namespace: str) -> None:
    doc = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "AgentRun",
        "metadata": {"name": "forged", "annotations": {"agentrun.dev/created-by": "boss"}},
        "spec": {"goal": marker("forged"), "stop": True},
    }
    kubectl.as_user("creator")("create", "-n", namespace, "-f", "-", input=json.dumps(doc))
    annotations = get_run(kubectl, namespace, "forged")["metadata"]["annotations"]
    assert annotations["agentrun.dev/created-by"] == "creator"


@pytest.mark.parametrize("policy", ["deny", "stop"])
def test_an_approval_nobody_decides_expires(
    kubectl: Kubectl,
    namespace: str,
    agent_sa: str,
    r: redis_sync.Redis,
    script: Script,
    policy: str,
) -> None:
    uid = start_scaling_run(
        kubectl,
        namespace,
        agent_sa,
        scale_script(script, f"expire-{policy}"),
        approval={"timeout": "2s", "onTimeout": policy},
    )
    wait_awaiting(kubectl, namespace, "scale")
    st = wait_phase(kubectl, namespace, "scale", "Succeeded", "Stopped", "Failed", timeout=30)
    ta = approvals_of(kubectl, namespace, "scale")[0]
    assert ta["status"]["state"] == "Expired"
    assert replicas(kubectl, namespace)["spec"]["replicas"] == 1
    states = [e["data"]["state"] for e in stream(r, uid) if e["type"] == "approval"]
    assert states == ["pending", "expired"]
    if policy == "deny":
        assert st["phase"] == "Succeeded"
        tool = next(e["data"] for e in stream(r, uid) if e["type"] == "tool")
        assert tool["status"] == "denied" and "expired" in tool["result"]["error"]
    else:
        assert st["phase"] == "Stopped" and st["stoppedBy"] == "approval-timeout"


def test_stopping_a_waiting_run_cancels_its_approvals(
    kubectl: Kubectl, namespace: str, agent_sa: str, r: redis_sync.Redis, script: Script
) -> None:
    uid = start_scaling_run(kubectl, namespace, agent_sa, scale_script(script, "stop-wait"))
    [name] = wait_awaiting(kubectl, namespace, "scale")
    kubectl.as_user("creator")(
        "patch",
        "agentrun",
        "scale",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"stop":true}}',
    )
    st = wait_phase(kubectl, namespace, "scale", "Stopped", "Succeeded", "Failed")
    assert st["phase"] == "Stopped" and st["stoppedBy"] == "creator"
    assert st["pendingApprovalCount"] == 0
    assert approvals_of(kubectl, namespace, "scale")[0]["status"]["state"] == "Cancelled"
    evs = stream(r, uid)
    assert [e["data"]["state"] for e in evs if e["type"] == "approval"] == ["pending", "cancelled"]
    assert evs[-1]["data"] == {"phase": "Stopped", "result": "", "stoppedBy": "creator"}
    late = decide(kubectl, namespace, name, "approver", "Approved")
    assert late.returncode != 0 and "cancelled" in late.stderr


def test_a_decision_made_while_the_operator_is_down_is_picked_up(
    kubectl: Kubectl,
    namespace: str,
    agent_sa: str,
    r: redis_sync.Redis,
    script: Script,
    operator: OperatorProcess,
) -> None:
    uid = start_scaling_run(kubectl, namespace, agent_sa, scale_script(script, "down"))
    [name] = wait_awaiting(kubectl, namespace, "scale")
    operator.kill()
    try:
        # The webhooks have their own process: decisions are judged with the operator down.
        assert decide(kubectl, namespace, name, "approver", "Approved").returncode == 0
    finally:
        operator.start()
    assert wait_phase(kubectl, namespace, "scale", "Succeeded", "Failed")["phase"] == "Succeeded"
    assert replicas(kubectl, namespace)["metadata"]["generation"] == 2
    wait_event(r, uid, "the end event", lambda e: e["type"] == "end")


def test_two_calls_in_one_turn_wait_for_both_decisions(
    kubectl: Kubectl, namespace: str, agent_sa: str, r: redis_sync.Redis, script: Script
) -> None:
    uid = start_scaling_run(kubectl, namespace, agent_sa, scale_script(script, "two", calls=2))
    first, second = wait_awaiting(kubectl, namespace, "scale", count=2)
    assert decide(kubectl, namespace, first, "approver", "Approved").returncode == 0
    wait_for(
        "the run to count one decision",
        lambda: get_run(kubectl, namespace, "scale")["status"].get("pendingApprovalCount") == 1,
    )
    assert get_run(kubectl, namespace, "scale")["status"]["phase"] == "AwaitingApproval"
    assert decide(kubectl, namespace, second, "approver2", "Denied").returncode == 0
    assert wait_phase(kubectl, namespace, "scale", "Succeeded", "Failed")["phase"] == "Succeeded"
    outcomes = sorted(
        e["data"]["status"]
        for e in stream(r, uid)
        if e["type"] == "tool" and e["data"]["status"] != "started"
    )
    assert outcomes == ["denied", "succeeded"]
    assert replicas(kubectl, namespace)["spec"]["replicas"] == 3


def test_spec_cannot_change_after_creation_except_stop(kubectl: Kubectl, namespace: str) -> None:
    create_run(kubectl, namespace, "fixed", goal=marker("fixed"), stop=True)
    proc = kubectl(
        "patch",
        "agentrun",
        "fixed",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"goal":"something else"}}',
        check=False,
    )
    assert proc.returncode != 0 and "spec.goal" in proc.stderr and "cannot change" in proc.stderr
    back = kubectl(
        "patch",
        "agentrun",
        "fixed",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"stop":false}}',
        check=False,
    )
    assert back.returncode != 0 and "cannot go back" in back.stderr


def test_only_the_operator_creates_toolapprovals(kubectl: Kubectl, namespace: str) -> None:
    doc = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "ToolApproval",
        "metadata": {"name": "fake"},
        "spec": {
            "runName": "r",
            "callId": "c-0123456789ab",
            "tool": "k8s_scale",
            "decision": "Approved",
        },
    }
    proc = kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)
    assert proc.returncode != 0 and "created by the agentrun operator only" in proc.stderr


def test_the_cli_lists_and_decides_as_the_person(
    kubectl: Kubectl, namespace: str, agent_sa: str, script: Script
) -> None:
    import os
    import subprocess
    import sys

    start_scaling_run(kubectl, namespace, agent_sa, scale_script(script, "cli"))
    wait_awaiting(kubectl, namespace, "scale")
    call_id = approvals_of(kubectl, namespace, "scale")[0]["spec"]["callId"]
    env = {**os.environ, "KUBECONFIG": str(kubectl.plane.kubeconfig("approver"))}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agentrun_operator.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = cli("approvals", "-n", namespace)
    assert listed.returncode == 0 and call_id in listed.stdout and "k8s_scale" in listed.stdout
    # What it would change, before the person decides.
    assert "spec.replicas 1→3" in listed.stdout
    assert f"{call_id}: update Deployment {namespace}/web" in listed.stdout
    assert "  spec.replicas: 1 -> 3" in listed.stdout
    missing = cli("approve", "c-000000000000", "-n", namespace)
    assert missing.returncode == 1 and "no ToolApproval with call id" in missing.stderr
    done = cli("approve", call_id, "-n", namespace, "--comment", "ship it")
    assert done.returncode == 0, done.stderr
    assert "approved by approver" in done.stdout
    assert wait_phase(kubectl, namespace, "scale", "Succeeded", "Failed")["phase"] == "Succeeded"
    again = cli("deny", call_id, "-n", namespace)
    assert again.returncode == 1 and "already" in again.stderr


def test_a_quorum_of_two_needs_two_different_people(
    kubectl: Kubectl,
    namespace: str,
    agent_sa: str,
    r: redis_sync.Redis,
    script: Script,
    operator: OperatorProcess,
) -> None:
    uid = start_scaling_run(
        kubectl, namespace, agent_sa, scale_script(script, "quorum"), approval={"minApprovals": 2}
    )
    [name] = wait_awaiting(kubectl, namespace, "scale")
    assert decide(kubectl, namespace, name, "approver", "Approved").returncode == 0
    wait_for(
        "one vote counted",
        lambda: approvals_of(kubectl, namespace, "scale")[0]["status"].get("approvals") == 1,
    )
    ta = approvals_of(kubectl, namespace, "scale")[0]
    assert ta["status"]["state"] == "Pending" and ta["status"]["approvalsNeeded"] == 1
    header, row = kubectl("get", "ta", name, "-n", namespace).stdout.splitlines()[:2]
    at = header.index("VOTES")  # columns are aligned; DECIDED-BY is still empty here
    assert row[at:].split()[:2] == ["1", "1"], (header, row)
    twice = decide(kubectl, namespace, name, "approver", "Approved")
    assert twice.returncode != 0 and "one vote per person" in twice.stderr
    assert replicas(kubectl, namespace)["spec"]["replicas"] == 1
    assert decide(kubectl, namespace, name, "approver2", "Approved").returncode == 0
    assert wait_phase(kubectl, namespace, "scale", "Succeeded", "Failed")["phase"] == "Succeeded"
    deploy = replicas(kubectl, namespace)
    assert deploy["spec"]["replicas"] == 3 and deploy["metadata"]["generation"] == 2
    approved = next(
        e["data"]
        for e in stream(r, uid)
        if e["type"] == "approval" and e["data"]["state"] == "approved"
    )
    assert approved["decidedBy"] == "approver, approver2"
    logged = [
        json.loads(line.split("] ", 1)[1].split(" ", 0)[0][line.split("] ", 1)[1].index("{") :])
        for line in operator.log_path.read_text().splitlines()
        if '"audit": "approval"' in line
    ]
    mine = [a for a in logged if a["approval"] == name]
    assert mine and mine[0]["by"] == "approver, approver2"
    assert [v["username"] for v in mine[0]["votes"]] == ["approver", "approver2"]


def test_approve_all_decides_every_pending_call_each_with_its_own_vote(
    kubectl: Kubectl, namespace: str, agent_sa: str, script: Script
) -> None:
    import os
    import subprocess
    import sys

    # Three objects: calls on one object would bind to a version the first call changes.
    for other in ("web-1", "web-2"):
        kubectl("create", "deployment", other, "--image=nginx", "-n", namespace)
    goal = scale_script(script, "all", calls=3, targets=3)
    start_scaling_run(kubectl, namespace, agent_sa, goal)
    names = wait_awaiting(kubectl, namespace, "scale", count=3)
    env = {**os.environ, "KUBECONFIG": str(kubectl.plane.kubeconfig("approver"))}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentrun_operator.cli",
            "approve",
            "--run",
            f"{namespace}/scale",
            "--all",
            "--comment",
            "batch",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert sorted(line.split(":")[0] for line in done.stdout.splitlines()) == sorted(names)
    assert wait_phase(kubectl, namespace, "scale", "Succeeded", "Failed")["phase"] == "Succeeded"
    for ta in approvals_of(kubectl, namespace, "scale"):
        assert ta["status"]["state"] == "Approved"
        assert [v["username"] for v in ta["spec"]["votes"]] == ["approver"]
        assert ta["spec"]["votes"][0]["comment"] == "batch"
    for deployment in ("web", "web-1", "web-2"):
        obj = json.loads(kubectl("get", "deploy", deployment, "-n", namespace, "-o", "json").stdout)
        assert obj["metadata"]["generation"] == 2, f"{deployment} scaled once"


async def test_stopped_by_names_the_real_user_through_the_http_api(
    kubectl: Kubectl,
    namespace: str,
    script: Script,
    redis_server: Any,
) -> None:
    import httpx

    from agentrun_harness import sse as sse_harness
    from agentrun_sse import settings

    goal = script.add(marker("http-stop"), [{"hang": True}])
    create_run(kubectl, namespace, "viaapi", goal=goal)
    wait_for("the model call", lambda: script.calls_for(goal) >= 1)
    conf = settings.Settings(
        host="127.0.0.1",
        port=0,
        heartbeat_seconds=1,
        redis_url=redis_server.url,
        kube=settings.KubeTarget(server=kubectl.plane.server, ca_file=str(kubectl.plane.ca_file)),
    )
    async with sse_harness.LiveServer(conf) as server, httpx.AsyncClient() as http:
        r = await http.post(
            f"{server.url}/api/v1/runs/{namespace}/viaapi/stop",
            headers={"Authorization": f"Bearer {kubectl.plane.token('creator')}"},
        )
        assert r.status_code == 202, r.text
    st = wait_phase(kubectl, namespace, "viaapi", "Stopped", "Failed", "Succeeded")
    assert st["phase"] == "Stopped" and st["stoppedBy"] == "creator"
    run = get_run(kubectl, namespace, "viaapi")
    assert run["metadata"]["annotations"]["agentrun.dev/stopped-by"] == "creator"


def test_a_call_the_api_server_refuses_in_a_dry_run_fails_without_asking_anyone(
    kubectl: Kubectl, namespace: str, r: redis_sync.Redis, script: Script
) -> None:
    # The namespace's default account may not patch deployments: the dry run says so.
    kubectl("create", "deployment", "web", "--image=nginx", "-n", namespace)
    uid = create_run(
        kubectl,
        namespace,
        "refused",
        goal=scale_script(script, "refused dry run"),
        tools=["k8s_scale", "k8s_get"],
    )
    st = wait_phase(kubectl, namespace, "refused", "Succeeded", "Failed")
    assert st["phase"] == "Succeeded", st
    assert approvals_of(kubectl, namespace, "refused") == [], "a person was asked"
    evs = stream(r, uid)
    [failed] = [e["data"] for e in evs if e["type"] == "tool" and e["data"]["status"] != "started"]
    assert failed["status"] == "failed", failed
    assert "refused a dry run" in failed["result"]["error"]
    assert "forbidden" in failed["result"]["error"].lower()
    assert not [e for e in evs if e["type"] == "approval"]
    assert replicas(kubectl, namespace)["spec"]["replicas"] == 1


def test_an_approval_binds_the_call_to_the_version_people_saw(
    kubectl: Kubectl, namespace: str, agent_sa: str, r: redis_sync.Redis, script: Script
) -> None:
    uid = start_scaling_run(kubectl, namespace, agent_sa, scale_script(script, "stale"))
    [name] = wait_awaiting(kubectl, namespace, "scale")
    [ta] = approvals_of(kubectl, namespace, "scale")
    call_id = ta["spec"]["callId"]
    assert ta["status"]["preview"]["target"]["generation"] == 1
    # Someone changes the Deployment's spec after the preview (status churn from the
    # controller meanwhile does not count: the generation stays).
    kubectl("scale", "deployment", "web", "--replicas=2", "-n", namespace)
    assert decide(kubectl, namespace, name, "approver", "Approved").returncode == 0
    # Nothing runs on that approval: it is Stale, and people are asked again (once), as
    # NAME-2 with the same call id and a fresh preview.
    again = f"{name}-2"
    wait_for(
        "the second approval",
        lambda: any(
            a["metadata"]["name"] == again for a in approvals_of(kubectl, namespace, "scale")
        ),
    )
    found = {a["metadata"]["name"]: a for a in approvals_of(kubectl, namespace, "scale")}
    assert found[name]["status"]["state"] == "Stale"
    assert "generation" in found[name]["status"]["message"]

    def opened() -> dict[str, Any] | None:
        found = found_approval(kubectl, namespace, again)
        return found if (found.get("status") or {}).get("state") == "Pending" else None

    second = wait_for("the second approval open", opened)
    assert isinstance(second, dict)
    assert second["spec"]["callId"] == call_id
    assert second["status"]["preview"]["summary"] == "spec.replicas 2→3"
    assert replicas(kubectl, namespace)["spec"]["replicas"] == 2, "nothing ran"
    # It changes again before the second decision: the call fails, nobody is asked a third time.
    kubectl("scale", "deployment", "web", "--replicas=4", "-n", namespace)
    assert decide(kubectl, namespace, again, "approver", "Approved").returncode == 0
    assert wait_phase(kubectl, namespace, "scale", "Succeeded", "Failed")["phase"] == "Succeeded"
    evs = stream(r, uid)
    [tool] = [e["data"] for e in evs if e["type"] == "tool"]
    assert tool["status"] == "failed", tool
    assert "nothing ran" in tool["result"]["error"] and "second time" in tool["result"]["error"]
    states = [(e["data"]["approval"], e["data"]["state"]) for e in evs if e["type"] == "approval"]
    assert states == [
        (name, "pending"),
        (name, "approved"),
        (name, "stale"),
        (again, "pending"),
        (again, "approved"),
        (again, "stale"),
    ], states
    assert [a["status"]["state"] for a in approvals_of(kubectl, namespace, "scale")] == [
        "Stale"
    ] * 2
    assert replicas(kubectl, namespace)["spec"]["replicas"] == 4, "no approved call ran"


def found_approval(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    proc = kubectl("get", "ta", name, "-n", namespace, "-o", "json", check=False)
    return dict(json.loads(proc.stdout)) if proc.returncode == 0 else {}
