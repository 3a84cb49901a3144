"""The approval boundary, hole by hole, on real parts: kube-apiserver calling the webhook
server over HTTPS, the operator as a process, people as themselves with kubectl.

Each test is named after a hole a review found (and reproduced on a real cluster) and
fails without its fix:
- any edit casts a vote (a label edit counted as a second approval);
- a run's settings change mid-run (while the AgentRun webhook, which fails open, is away);
- a spec changed before the operator first saw the run;
- any service account of the namespace is free to use;
- the run's own service account votes on its own calls;
- a late decision beats the deadline (operator paused past expiresAt);
- Secret data leaks into the ToolApproval and the stream.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_sync

from support import (
    Kubectl,
    OperatorProcess,
    Script,
    bind_roles,
    create_run,
    get_run,
    let_default_account_scale,
    marker,
    stream,
    wait_event,
    wait_for,
    wait_phase,
)

WEBHOOK_LABEL = "agentrun-test/webhooks"


@pytest.fixture
def namespace(op_namespace: str, kubectl: Kubectl) -> str:
    """A watched namespace with people: editors who create runs, two approvers, and the
    creator also allowed to approve (so only the webhook's rules stop self-approval)."""
    bind_roles(
        kubectl,
        op_namespace,
        [
            ("creator", "agentrun-editor"),
            ("creator", "agentrun-approver"),
            ("approver", "agentrun-approver"),
            ("approver2", "agentrun-approver"),
        ],
    )
    # The runs act as the namespace's default account, which may scale deployments: the
    # dry run that previews each call is then allowed, and people are asked.
    let_default_account_scale(kubectl, op_namespace)
    return op_namespace


pytestmark = pytest.mark.usefixtures("operator_log_on_failure")


def scaling_goal(script: Script, name: str) -> str:
    return script.add(
        marker(name),
        [
            {"text": "plan: scale web"},
            {
                "tool_calls": [
                    {
                        "name": "k8s_scale",
                        "arguments": {"kind": "Deployment", "name": "web", "replicas": 3},
                    }
                ]
            },
            {"text": "done"},
        ],
    )


def start(kubectl: Kubectl, namespace: str, goal: str, *, name: str = "scale", **spec: Any) -> str:
    """A run (created by the admin) that wants to scale web; returns its uid."""
    kubectl("create", "deployment", "web", "--image=nginx", "-n", namespace, check=False)
    return create_run(kubectl, namespace, name, goal=goal, tools=["k8s_scale", "k8s_get"], **spec)


def approvals_of(kubectl: Kubectl, namespace: str, run: str) -> list[dict[str, Any]]:
    out = kubectl(
        "get", "toolapprovals", "-n", namespace, "-l", f"agentrun.dev/run={run}", "-o", "json"
    )
    return list(json.loads(out.stdout)["items"])


def pending_approval(kubectl: Kubectl, namespace: str, run: str) -> dict[str, Any]:
    st = wait_phase(kubectl, namespace, run, "AwaitingApproval", "Failed", "Succeeded")
    assert st["phase"] == "AwaitingApproval", st
    [ta] = approvals_of(kubectl, namespace, run)
    return ta


def patch_ta(kubectl: Kubectl, namespace: str, name: str, body: dict[str, Any]) -> Any:
    return kubectl(
        "patch", "ta", name, "-n", namespace, "--type=merge", "-p", json.dumps(body), check=False
    )


def replicas(kubectl: Kubectl, namespace: str) -> int:
    out = kubectl("get", "deploy", "web", "-n", namespace, "-o", "jsonpath={.spec.replicas}")
    return int(out.stdout)


@contextlib.contextmanager
def webhooks_away(kubectl: Kubectl, namespace: str, run: str) -> Iterator[None]:
    """As if the webhook server were unreachable for this namespace's AgentRun updates
    (failurePolicy Ignore lets them through): the namespace leaves the webhooks' selector.
    A server-side dry run of a spec edit tells when the API server has noticed."""

    def edit_admitted() -> bool:
        probe = '{"spec":{"goal":"probe"}}'
        return (
            kubectl(
                "patch", "agentrun", run, "-n", namespace, "--dry-run=server",
                "--type=merge", "-p", probe, check=False,
            ).returncode
            == 0
        )  # fmt: skip

    kubectl("label", "namespace", namespace, f"{WEBHOOK_LABEL}-")
    try:
        wait_for("the webhooks to stop judging the namespace", edit_admitted)
        yield
    finally:
        kubectl("label", "namespace", namespace, f"{WEBHOOK_LABEL}=on")
        wait_for("the webhooks to judge the namespace again", lambda: not edit_admitted())


@contextlib.contextmanager
def operator_paused(operator: OperatorProcess) -> Iterator[None]:
    """The operator frozen (SIGSTOP): it sees nothing and settles nothing until resumed."""
    assert operator.proc is not None
    os.kill(operator.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(operator.proc.pid, signal.SIGCONT)


def test_any_edit_casts_a_vote_no_more_only_an_explicit_decision_does(
    kubectl: Kubectl, namespace: str, script: Script, agent_sa: str
) -> None:
    start(
        kubectl,
        namespace,
        scaling_goal(script, "quorum"),
        serviceAccountName=agent_sa,
        approval={"minApprovals": 2},
    )
    ta = pending_approval(kubectl, namespace, "scale")
    name = ta["metadata"]["name"]
    approve = {"spec": {"decision": "Approved", "comment": "fine"}}
    assert patch_ta(kubectl.as_user("approver"), namespace, name, approve).returncode == 0
    stored = approvals_of(kubectl, namespace, "scale")[0]
    assert "decision" not in stored["spec"] and "comment" not in stored["spec"], (
        "spec.decision is a write-only request: the webhook turns it into a vote and removes it"
    )
    assert [v["username"] for v in stored["spec"]["votes"]] == ["approver"]
    assert stored["spec"]["votes"][0]["comment"] == "fine"

    # Another approver edits a label: that is no vote, so the quorum of two is not reached.
    label = {"metadata": {"labels": {"team": "payments"}}}
    assert patch_ta(kubectl.as_user("approver2"), namespace, name, label).returncode == 0
    stored = approvals_of(kubectl, namespace, "scale")[0]
    assert [v["username"] for v in stored["spec"]["votes"]] == ["approver"]
    assert get_run(kubectl, namespace, "scale")["status"]["phase"] == "AwaitingApproval"
    assert replicas(kubectl, namespace) == 1

    # The same person's explicit decision is the second vote, and only then does it run.
    assert patch_ta(kubectl.as_user("approver2"), namespace, name, approve).returncode == 0
    assert wait_phase(kubectl, namespace, "scale", "Succeeded", "Failed")["phase"] == "Succeeded"
    assert replicas(kubectl, namespace) == 3
    ta = approvals_of(kubectl, namespace, "scale")[0]
    assert [v["username"] for v in ta["spec"]["votes"]] == ["approver", "approver2"]
    assert ta["status"]["state"] == "Approved"


def test_a_runs_settings_cannot_change_mid_run_even_while_the_webhook_is_away(
    kubectl: Kubectl, namespace: str, script: Script, r: redis_sync.Redis
) -> None:
    kubectl("create", "deployment", "web", "--image=nginx", "-n", namespace)
    uid = create_run(
        kubectl.as_user("creator"),
        namespace,
        "scale",
        goal=scaling_goal(script, "fixed"),
        tools=["k8s_scale", "k8s_get"],
        approval={"approvers": {"users": ["approver"]}},
    )
    ta = pending_approval(kubectl, namespace, "scale")
    effective = get_run(kubectl, namespace, "scale")["status"]["effective"]
    assert effective["approval"]["approvers"]["users"] == ["approver"]
    assert effective["serviceAccountName"] == "default"
    assert get_run(kubectl, namespace, "scale")["status"]["createdBy"] == "creator"

    # While the webhook is away the editor widens the approvers to herself, allows
    # self-approval, raises the limits and forges the creator annotation.
    edit = {
        "metadata": {"annotations": {"agentrun.dev/created-by": "someone-else"}},
        "spec": {
            "approval": {"approvers": {"users": ["creator"]}, "allowSelfApproval": True},
            "limits": {"maxSteps": 999},
        },
    }
    with webhooks_away(kubectl, namespace, "scale"):
        kubectl.as_user("creator")(
            "patch", "agentrun", "scale", "-n", namespace, "--type=merge", "-p", json.dumps(edit)
        )
    fault = wait_event(
        r,
        uid,
        "a fault event saying the edit was ignored",
        lambda e: e["type"] == "fault" and e["data"]["code"] == "SpecChangeIgnored",
    )
    assert "spec.approval" in fault["data"]["message"] and "spec.limits" in fault["data"]["message"]
    events = kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    assert "SpecChangeIgnored" in events
    st = get_run(kubectl, namespace, "scale")["status"]
    assert st["effective"] == effective, "the fixed settings stay as they were"

    # The vote is judged against the fixed settings and the recorded creator.
    mine = patch_ta(
        kubectl.as_user("creator"),
        namespace,
        ta["metadata"]["name"],
        {"spec": {"decision": "Approved"}},
    )
    assert mine.returncode != 0
    assert "creator is not among the approvers of run scale" in mine.stderr, mine.stderr
    theirs = patch_ta(
        kubectl.as_user("approver"),
        namespace,
        ta["metadata"]["name"],
        {"spec": {"decision": "Approved"}},
    )
    assert theirs.returncode == 0, theirs.stderr
    assert wait_phase(kubectl, namespace, "scale", "Succeeded", "Failed")["phase"] == "Succeeded"


def test_a_spec_changed_before_the_operator_first_saw_the_run_fails_it(
    kubectl: Kubectl, namespace: str, script: Script, operator: OperatorProcess
) -> None:
    with operator_paused(operator):
        create_run(
            kubectl.as_user("creator"),
            namespace,
            "early",
            goal=scaling_goal(script, "early"),
            tools=["k8s_get"],
        )
        with webhooks_away(kubectl, namespace, "early"):
            kubectl.as_user("creator")(
                "patch",
                "agentrun",
                "early",
                "-n",
                namespace,
                "--type=merge",
                "-p",
                json.dumps({"spec": {"tools": ["k8s_get", "k8s_scale"]}}),
            )
        assert get_run(kubectl, namespace, "early")["metadata"]["generation"] == 2
    st = wait_phase(kubectl, namespace, "early", "Failed", "Succeeded", "Running")
    assert st["phase"] == "Failed", st
    reasons = [c.get("reason") for c in st.get("conditions") or []]
    assert "SpecChangedBeforeStart" in reasons, st
    assert "create a new AgentRun" in st["message"]


def test_any_service_account_of_the_namespace_is_free_to_use_no_more(
    kubectl: Kubectl, namespace: str, script: Script
) -> None:
    kubectl("create", "serviceaccount", "agent", "-n", namespace)
    creator = kubectl.as_user("creator")
    doc = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "AgentRun",
        "metadata": {"name": "as-agent"},
        "spec": {"goal": "g", "serviceAccountName": "agent"},
    }
    refused = creator("create", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)
    assert refused.returncode != 0
    assert "creator may not run agents as service account" in refused.stderr, refused.stderr
    assert "verb 'use' on resource 'serviceaccounts.agentrun.dev'" in refused.stderr
    assert "agentrun-sa-user" in refused.stderr
    # The default account needs no grant: it is what every pod of the namespace gets.
    plain = {**doc, "metadata": {"name": "as-default"}, "spec": {"goal": "g"}}
    assert creator("create", "-n", namespace, "-f", "-", input=json.dumps(plain)).returncode == 0

    # Granted for one named account only (resourceNames), as the docs show.
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "use-agent", "namespace": namespace},
        "rules": [
            {
                "apiGroups": ["agentrun.dev"],
                "resources": ["serviceaccounts"],
                "verbs": ["use"],
                "resourceNames": ["agent"],
            }
        ],
    }
    kubectl("apply", "-f", "-", input=json.dumps(role))
    kubectl(
        "create",
        "rolebinding",
        "creator-uses-agent",
        "-n",
        namespace,
        "--role=use-agent",
        "--user=creator",
    )

    def allowed() -> bool:
        out = creator("create", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)
        return out.returncode == 0

    wait_for("the creator's run as agent to be admitted", allowed)
    other = {
        **doc,
        "metadata": {"name": "as-other"},
        "spec": {"goal": "g", "serviceAccountName": "other"},
    }
    refused = creator("create", "-n", namespace, "-f", "-", input=json.dumps(other), check=False)
    assert refused.returncode != 0 and "service account" in refused.stderr


def test_the_runs_own_service_account_may_not_vote_on_its_calls(
    kubectl: Kubectl, namespace: str, script: Script, agent_sa: str
) -> None:
    # The agent's account may patch ToolApprovals (as if an admin granted too much), and the
    # run leaves approvers empty: anyone RBAC allows may decide, but never the agent itself.
    kubectl(
        "create",
        "rolebinding",
        "agent-approves",
        "-n",
        namespace,
        "--clusterrole=agentrun-approver",
        f"--serviceaccount={namespace}:{agent_sa}",
    )
    start(kubectl, namespace, scaling_goal(script, "self"), serviceAccountName=agent_sa)
    ta = pending_approval(kubectl, namespace, "scale")
    # The admin impersonates the account: the admission request names the account.
    as_agent = kubectl(
        "patch",
        "ta",
        ta["metadata"]["name"],
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"decision": "Approved"}}),
        f"--as=system:serviceaccount:{namespace}:{agent_sa}",
        check=False,
    )
    assert as_agent.returncode != 0
    assert "an agent never decides its own tool calls" in as_agent.stderr, as_agent.stderr
    assert approvals_of(kubectl, namespace, "scale")[0]["spec"].get("votes") == []
    assert replicas(kubectl, namespace) == 1


def test_a_late_decision_never_beats_the_deadline(
    kubectl: Kubectl,
    namespace: str,
    script: Script,
    r: redis_sync.Redis,
    operator: OperatorProcess,
) -> None:
    uid = start(
        kubectl,
        namespace,
        scaling_goal(script, "late"),
        approval={"timeout": "10s", "onTimeout": "deny"},
    )
    ta = pending_approval(kubectl, namespace, "scale")
    expires = ta["status"]["expiresAt"]
    with operator_paused(operator):
        # Past the deadline, with nobody to settle it: the approval still says Pending.
        wait_for(
            "the deadline to pass",
            lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1)) > expires,
            timeout=25,
        )
        late = patch_ta(
            kubectl.as_user("approver"),
            namespace,
            ta["metadata"]["name"],
            {"spec": {"decision": "Approved"}},
        )
        assert late.returncode != 0
        assert f"this approval expired at {expires}" in late.stderr, late.stderr
    st = wait_phase(kubectl, namespace, "scale", "Succeeded", "Failed")
    assert st["phase"] == "Succeeded"
    assert replicas(kubectl, namespace) == 1, "onTimeout deny: the call never ran"
    states = [e["data"]["state"] for e in stream(r, uid) if e["type"] == "approval"]
    assert states == ["pending", "expired"]


def test_secret_data_never_leaks_into_approvals_or_the_stream(
    kubectl: Kubectl, namespace: str, script: Script, r: redis_sync.Redis
) -> None:
    kubectl("create", "serviceaccount", "writer", "-n", namespace)
    kubectl(
        "create", "role", "writer", "-n", namespace, "--verb=get,create,patch", "--resource=secrets"
    )
    kubectl(
        "create",
        "rolebinding",
        "writer",
        "-n",
        namespace,
        "--role=writer",
        f"--serviceaccount={namespace}:writer",
    )
    password = "hunter2-" + marker("pw")
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "db"},
        "stringData": {"password": password},
    }
    goal = script.add(
        marker("secret"),
        [
            {"text": "plan: write the db secret"},
            {"tool_calls": [{"name": "k8s_apply", "arguments": {"manifest": manifest}}]},
            {"text": "done"},
        ],
    )
    uid = create_run(
        kubectl, namespace, "secret", goal=goal, tools=["k8s_apply"], serviceAccountName="writer"
    )
    ta = pending_approval(kubectl, namespace, "secret")
    shown = ta["spec"]["arguments"]["manifest"]
    assert shown["stringData"] == {"password": "<redacted>"}, "keys stay, values go"
    assert password not in json.dumps(ta)
    pending = wait_event(r, uid, "the approval event", lambda e: e["type"] == "approval")
    assert password not in json.dumps(pending)
    assert (
        patch_ta(
            kubectl.as_user("approver"),
            namespace,
            ta["metadata"]["name"],
            {"spec": {"decision": "Approved"}},
        ).returncode
        == 0
    )
    assert wait_phase(kubectl, namespace, "secret", "Succeeded", "Failed")["phase"] == "Succeeded"
    raw = json.dumps([e for e in stream(r, uid)])
    encoded = base64.b64encode(password.encode()).decode()
    assert password not in raw and encoded not in raw, "no event carries the value"
    tool = [e["data"] for e in stream(r, uid) if e["type"] == "tool"]
    assert tool[-1]["status"] == "succeeded", tool
    # ... and yet the call ran with the real value, as approved.
    data = kubectl("get", "secret", "db", "-n", namespace, "-o", "jsonpath={.data.password}")
    assert base64.b64decode(data.stdout).decode() == password


def test_a_cost_limit_on_a_model_without_a_price_refuses_to_start(
    kubectl: Kubectl, namespace: str, script: Script, r: redis_sync.Redis
) -> None:
    goal = script.add(marker("unpriced"), [{"text": "plan"}, {"text": "done"}])
    uid = create_run(
        kubectl,
        namespace,
        "unpriced",
        goal=goal,
        model={"name": "my-vllm-model"},
        limits={"maxCostUSD": 1.0},
    )
    st = wait_phase(kubectl, namespace, "unpriced", "Failed", "Succeeded")
    assert st["phase"] == "Failed", st
    assert "no price for model my-vllm-model" in st["message"]
    assert "AGENTRUN_PRICES" in st["message"] and "operator.prices" in st["message"]
    fault = next(e["data"] for e in stream(r, uid) if e["type"] == "fault")
    assert fault["code"] == "PriceUnknown" and fault["fatal"] is True
    assert script.calls_for(goal) == 0, "the model was never called"


def test_the_token_budget_cuts_a_call_while_it_streams(
    kubectl: Kubectl, namespace: str, script: Script, r: redis_sync.Redis
) -> None:
    answer = "tokens " * 2000  # about 3,500 tokens by the estimate
    goal = script.add(marker("budget"), [{"text": answer}])
    uid = create_run(kubectl, namespace, "budget", goal=goal, limits={"maxTokens": 300})
    st = wait_phase(kubectl, namespace, "budget", "Failed", "Succeeded")
    assert st["phase"] == "Failed", st
    assert "spec.limits.maxTokens is 300" in st["message"]
    assert "cut while it streamed" in st["message"]
    evs = stream(r, uid)
    fault = next(e["data"] for e in evs if e["type"] == "fault")
    assert fault["code"] == "BudgetExceeded" and fault["fatal"] is True
    streamed = "".join(e["data"]["text"] for e in evs if e["type"] == "token")
    assert 0 < len(streamed) < len(answer) // 4, "the call stopped near the limit"
    reasons = [c.get("reason") for c in st.get("conditions") or []]
    assert "BudgetExceeded" in reasons, st
