"""The webhook server down while an editor edits a running run.

AgentRun updates fail open (failurePolicy Ignore: nothing may block spec.stop), so with the
webhook server gone an editor's spec change reaches the API server. The run must keep the
settings fixed when the operator first saw it (status.effective), say in its stream and as
a Kubernetes Event that the edit was ignored, and votes (failurePolicy Fail) must wait for
the webhook server to be back, then be judged against the fixed settings.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import redis as redis_sync

from agentrun_harness.operatorproc import OperatorProcess, WebhookProcess

from support import (
    Kubectl,
    Script,
    bind_roles,
    create_run,
    get_run,
    let_default_account_scale,
    marker,
    wait_event,
    wait_phase,
)


@pytest.fixture
def namespace(op_namespace: str, kubectl: Kubectl) -> str:
    # The creator may also decide approvals, so only the webhook's rules stop her.
    bind_roles(
        kubectl,
        op_namespace,
        [
            ("creator", "agentrun-editor"),
            ("creator", "agentrun-approver"),
            ("approver", "agentrun-approver"),
        ],
    )
    let_default_account_scale(kubectl, op_namespace)  # its runs' calls are previewed
    return op_namespace


@pytest.fixture(autouse=True)
def _dump_on_failure(
    request: pytest.FixtureRequest, operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> Any:
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        runs = kubectl("get", "agentruns", "-n", namespace, "-o", "yaml", check=False).stdout
        print(f"--- runs ---\n{runs}\n--- operator log ---\n{operator.log_tail(120)}")


def vote(
    kubectl: Kubectl, user: str, namespace: str, name: str
) -> subprocess.CompletedProcess[str]:
    body = json.dumps({"spec": {"decision": "Approved"}})
    return kubectl.as_user(user)(
        "patch", "ta", name, "-n", namespace, "--type=merge", "-p", body, check=False
    )


def test_an_edit_while_the_webhook_server_is_down_is_ignored_and_reported(
    kubectl: Kubectl,
    namespace: str,
    script: Script,
    r: redis_sync.Redis,
    operator: OperatorProcess,
    webhooks: WebhookProcess,
) -> None:
    goal = script.add(
        marker("outage"),
        [
            {"text": "plan: scale web"},
            {"tool_calls": [{"name": "k8s_scale",
                             "arguments": {"kind": "Deployment", "name": "web", "replicas": 2}}]},
            {"text": "done"},
        ],
    )  # fmt: skip
    kubectl("create", "deployment", "web", "--image=nginx", "-n", namespace)
    uid = create_run(
        kubectl.as_user("creator"),
        namespace,
        "outage",
        goal=goal,
        tools=["k8s_scale"],
        approval={"approvers": {"users": ["approver"]}},
    )
    st = wait_phase(kubectl, namespace, "outage", "AwaitingApproval", "Failed", "Succeeded")
    assert st["phase"] == "AwaitingApproval", st
    fixed = st["effective"]
    [ta] = json.loads(
        kubectl("get", "ta", "-n", namespace, "-l", "agentrun.dev/run=outage", "-o", "json").stdout
    )["items"]
    name = ta["metadata"]["name"]

    webhooks.stop()
    try:
        edit = {"spec": {"approval": {"approvers": {"users": ["creator"]},
                                      "allowSelfApproval": True}}}  # fmt: skip
        edited = kubectl.as_user("creator")(
            "patch",
            "agentrun",
            "outage",
            "-n",
            namespace,
            "--type=merge",
            "-p",
            json.dumps(edit),
            check=False,
        )
        assert edited.returncode == 0, f"AgentRun updates fail open: {edited.stderr}"
        # Votes fail closed while the webhook server is away.
        refused = vote(kubectl, "approver", namespace, name)
        assert refused.returncode != 0 and "webhook" in refused.stderr, refused.stderr
        fault = wait_event(
            r,
            uid,
            "a fault event saying the edit was ignored",
            lambda e: e["type"] == "fault" and e["data"]["code"] == "SpecChangeIgnored",
        )
        assert "spec.approval" in fault["data"]["message"]
    finally:
        webhooks.start()
    assert get_run(kubectl, namespace, "outage")["status"]["effective"] == fixed
    events = kubectl("get", "events", "-n", namespace, "--field-selector",
                     "reason=SpecChangeIgnored", "-o", "name").stdout  # fmt: skip
    assert events.strip(), "a Kubernetes Event says the edit was ignored"

    # Back: the creator's own vote is judged against the fixed approvers, not her edit.
    mine = vote(kubectl, "creator", namespace, name)
    assert mine.returncode != 0 and "not among the approvers" in mine.stderr, mine.stderr
    theirs = vote(kubectl, "approver", namespace, name)
    assert theirs.returncode == 0, theirs.stderr
    assert wait_phase(kubectl, namespace, "outage", "Succeeded", "Failed")["phase"] == "Succeeded"
