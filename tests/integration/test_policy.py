"""AgentPolicy and ClusterAgentPolicy on real parts: the admission webhook server (called by
kube-apiserver) admits policies only when their CEL compiles and refuses runs that ask for
what a policy forbids; the operator process fixes a run's settings after its namespace's
policies and judges every call by the rules as they are now.

Covers: an invalid rule refused at admission naming it (both kinds); agentrun-editor cannot
write policies, agentrun-policy-admin can; a run asking for a forbidden tool or service
account is refused naming the policy; floors and caps clamp a run that asks for less (and
a fault event and a Kubernetes Event say so); the examples' paths through the operator:
scale above 10 needs two sre-leads (others refused), kube-system denied without asking
anyone, a tier=batch restart runs without a person, a StatefulSet's pod is never deleted.
(Each example's every path, as pure functions: tests/unit/test_policy.py.)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
import yaml
from integration.test_approvals import (
    approvals_of,
    decide,
    replicas,
    scale_script,
    start_scaling_run,
    wait_awaiting,
)

from agentrun_operator import kube
from agentrun_operator.engine.policybook import PolicyBook

from support import (
    Kubectl,
    Script,
    bind_roles,
    create_run,
    get_run,
    marker,
    stream,
    wait_for,
    wait_phase,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"


@pytest.fixture
def namespace(op_namespace: str, kubectl: Kubectl) -> str:
    bind_roles(
        kubectl,
        op_namespace,
        [
            ("approver", "agentrun-approver"),
            ("creator", "agentrun-editor"),
            ("creator", "agentrun-sa-user"),
        ],
    )
    # People with no static token of the test control plane: the admin impersonates them.
    kubectl(
        "create",
        "rolebinding",
        "leads",
        "-n",
        op_namespace,
        "--clusterrole=agentrun-approver",
        "--group=sre-leads",
    )
    kubectl(
        "create",
        "rolebinding",
        "padmin",
        "-n",
        op_namespace,
        "--clusterrole=agentrun-policy-admin",
        "--user=padmin",
    )

    def may(who: tuple[str, ...], verb: str, resource: str) -> bool:
        found = kubectl(
            *who, "auth", "can-i", verb, f"{resource}.agentrun.dev", "-n", op_namespace, check=False
        )
        return found.stdout.strip() == "yes"

    lead, admin = impersonate("lead1", "sre-leads"), impersonate("padmin")
    wait_for("the sre-leads binding", lambda: may(lead, "patch", "toolapprovals"))
    wait_for("the policy admin binding", lambda: may(admin, "create", "agentpolicies"))
    return op_namespace


def impersonate(user: str, *groups: str) -> tuple[str, ...]:
    """kubectl flags for the admin to act as ``user`` in ``groups``."""
    return (f"--as={user}", *(f"--as-group={g}" for g in groups))


pytestmark = pytest.mark.usefixtures("operator_log_on_failure")


def apply_policy(kubectl: Kubectl, namespace: str, doc: dict[str, Any], *flags: str) -> Any:
    where = ["-n", namespace] if namespace else []
    return kubectl(*flags, "apply", *where, "-f", "-", input=json.dumps(doc), check=False)


def example(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text()))


def policy_doc(name: str, spec: dict[str, Any], kind: str = "AgentPolicy") -> dict[str, Any]:
    return {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }


def test_a_policy_whose_rule_does_not_compile_is_refused_naming_the_rule(
    kubectl: Kubectl, namespace: str
) -> None:
    bad = {"rules": [{"name": "typo", "when": "args.replicas > '10", "action": "require"}]}
    proc = apply_policy(kubectl, namespace, policy_doc("bad", bad))
    assert proc.returncode != 0
    assert "spec.rules[0] (typo).when" in proc.stderr and "Syntax error" in proc.stderr, proc.stderr
    typed = {"rules": [{"name": "typed", "when": "tool == 1", "action": "deny"}]}
    proc = apply_policy(kubectl, "", policy_doc("bad-cluster", typed, "ClusterAgentPolicy"))
    assert proc.returncode != 0 and "spec.rules[0] (typed).when" in proc.stderr, proc.stderr
    assert "no matching overload" in proc.stderr
    # Every example is admitted as it is (the cluster one is tried in a dry run: it would
    # apply to every namespace of the test cluster).
    for path in sorted(EXAMPLES.glob("*.yaml")):
        doc = example(path.stem)
        args = ["apply", "-f", "-", "--dry-run=server"]
        if doc["kind"] == "AgentPolicy":
            args += ["-n", namespace]
        proc = kubectl(*args, input=json.dumps(doc), check=False)
        assert proc.returncode == 0, (path.name, proc.stderr)


def test_editors_cannot_write_policies_and_policy_admins_can(
    kubectl: Kubectl, namespace: str
) -> None:
    doc = policy_doc("floor", {"approval": {"minApprovals": 2}})
    proc = apply_policy(kubectl.as_user("creator"), namespace, doc)
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), proc.stderr
    assert kubectl.as_user("creator")("get", "agentpolicies", "-n", namespace).returncode == 0
    proc = apply_policy(kubectl, namespace, doc, *impersonate("padmin"))
    assert proc.returncode == 0, proc.stderr
    proc = kubectl.as_user("creator")(
        "delete", "agentpolicy", "floor", "-n", namespace, check=False
    )
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), proc.stderr


def test_a_run_asking_for_what_a_policy_forbids_is_refused_naming_it(
    kubectl: Kubectl, namespace: str, agent_sa: str
) -> None:
    spec = {"tools": {"allowed": ["k8s_get", "k8s_list"]}, "serviceAccounts": ["default"]}
    assert apply_policy(kubectl, namespace, policy_doc("readers", spec)).returncode == 0
    doc = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "AgentRun",
        "metadata": {"name": "greedy"},
        "spec": {"goal": "g", "tools": ["k8s_get", "k8s_scale"]},
    }
    proc = kubectl.as_user("creator")(
        "create", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False
    )
    assert proc.returncode != 0
    assert f"spec.tools: k8s_scale is not allowed by AgentPolicy {namespace}/readers" in proc.stderr
    doc["spec"] = {"goal": "g", "tools": ["k8s_get"], "serviceAccountName": agent_sa}
    proc = kubectl.as_user("creator")(
        "create", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False
    )
    assert proc.returncode != 0, "a service account the policy does not list"
    assert f"spec.serviceAccountName: {agent_sa} is not allowed" in proc.stderr, proc.stderr


def test_a_run_asking_for_less_gets_the_policy_and_is_told(
    kubectl: Kubectl, namespace: str, r: redis_sync.Redis, script: Script
) -> None:
    floor = {
        "approval": {"minApprovals": 2, "maxTimeout": "10m"},
        "limits": {"maxSteps": 6, "timeout": "5m"},
    }
    assert apply_policy(kubectl, namespace, policy_doc("floor", floor)).returncode == 0
    name = script.add(
        marker("clamped"), [{"text": "plan"}, {"text": "nothing to do"}, {"text": "done"}]
    )
    uid = create_run(
        kubectl,
        namespace,
        "lax",
        goal=name,
        approval={"minApprovals": 1, "timeout": "1h"},
        limits={"maxSteps": 50},
    )
    assert wait_phase(kubectl, namespace, "lax", "Succeeded", "Failed")["phase"] == "Succeeded"
    effective = get_run(kubectl, namespace, "lax")["status"]["effective"]
    assert effective["approval"]["minApprovals"] == 2 and effective["approval"]["timeout"] == "10m"
    assert (effective["limits"]["maxSteps"], effective["limits"]["timeout"]) == (6, "5m")
    assert effective["policies"][0]["kind"] == "AgentPolicy"
    assert effective["policies"][0]["name"] == "floor"
    fault = next(e["data"] for e in stream(r, uid) if e["type"] == "fault")
    assert fault["code"] == "PolicyApplied" and not fault["fatal"]
    assert f"spec.approval.minApprovals 1 → 2 (AgentPolicy {namespace}/floor)" in fault["message"]
    events = kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    assert "PolicyApplied" in events


def test_scaling_above_ten_needs_two_sre_leads_and_no_one_else(
    kubectl: Kubectl, namespace: str, agent_sa: str, r: redis_sync.Redis, script: Script
) -> None:
    assert apply_policy(kubectl, namespace, example("scale-needs-sre-leads")).returncode == 0
    uid = start_scaling_run(
        kubectl,
        namespace,
        agent_sa,
        scale_script(script, "big", replicas=12),
        approval={"approvers": {}},
    )
    [name] = wait_awaiting(kubectl, namespace, "scale")
    ta = approvals_of(kubectl, namespace, "scale")[0]
    rule = ta["spec"]["rule"]
    assert (rule["name"], rule["minApprovals"]) == ("big-scale", 2)
    assert rule["policy"] == f"AgentPolicy {namespace}/scale-needs-sre-leads"
    assert ta["status"]["approvalsNeeded"] == 2
    pending = next(e["data"] for e in stream(r, uid) if e["type"] == "approval")
    assert pending["rule"]["message"] == "scaling above 10 replicas needs two SRE leads"
    # The run's own approvers are anyone; the rule's are sre-leads only.
    refused = decide(kubectl, namespace, name, "approver", "Approved")
    assert refused.returncode != 0, "not an sre lead"
    assert "rule big-scale" in refused.stderr and "sre-leads" in refused.stderr, refused.stderr
    for lead in ("lead1", "lead2"):
        proc = kubectl(
            *impersonate(lead, "sre-leads"),
            "patch",
            "toolapproval",
            name,
            "-n",
            namespace,
            "--type=merge",
            "-p",
            json.dumps({"spec": {"decision": "Approved"}}),
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        if lead == "lead1":
            assert get_run(kubectl, namespace, "scale")["status"]["phase"] == "AwaitingApproval"
    assert wait_phase(kubectl, namespace, "scale", "Succeeded", "Failed")["phase"] == "Succeeded"
    assert replicas(kubectl, namespace)["spec"]["replicas"] == 12


def test_a_denied_call_fails_at_once_and_nobody_is_asked(
    kubectl: Kubectl, namespace: str, agent_sa: str, r: redis_sync.Redis, script: Script
) -> None:
    deny = {
        "rules": [
            {
                "name": "no-web",
                "when": "target != null && target.name == 'web'",
                "action": "deny",
                "message": "web is frozen this week",
            }
        ]
    }
    assert apply_policy(kubectl, namespace, policy_doc("freeze", deny)).returncode == 0
    uid = start_scaling_run(kubectl, namespace, agent_sa, scale_script(script, "frozen"))
    assert wait_phase(kubectl, namespace, "scale", "Succeeded", "Failed")["phase"] == "Succeeded"
    assert approvals_of(kubectl, namespace, "scale") == [], "nobody was asked"
    assert replicas(kubectl, namespace)["spec"]["replicas"] == 1
    tool = next(e["data"] for e in stream(r, uid) if e["type"] == "tool")
    assert tool["status"] == "denied", tool
    assert f"AgentPolicy {namespace}/freeze (rule no-web)" in tool["result"]["error"]
    assert tool["result"]["comment"] == "web is frozen this week"


def test_a_batch_restart_runs_without_a_person_and_another_restart_waits(
    kubectl: Kubectl, namespace: str, agent_sa: str, r: redis_sync.Redis, script: Script
) -> None:
    assert apply_policy(kubectl, namespace, example("batch-restarts")).returncode == 0
    kubectl("create", "deployment", "batch", "--image=nginx", "-n", namespace)
    kubectl("label", "deployment", "batch", "tier=batch", "-n", namespace)
    kubectl("create", "deployment", "web", "--image=nginx", "-n", namespace)
    name = script.add(
        marker("restarts"),
        [
            {"text": "plan"},
            {
                "tool_calls": [
                    {
                        "name": "k8s_rollout_restart",
                        "arguments": {"kind": "Deployment", "name": "batch"},
                    },
                    {
                        "name": "k8s_rollout_restart",
                        "arguments": {"kind": "Deployment", "name": "web"},
                    },
                ]
            },
            {"text": "done"},
        ],
    )
    uid = create_run(
        kubectl,
        namespace,
        "restarts",
        goal=name,
        serviceAccountName=agent_sa,
        tools=["k8s_rollout_restart"],
    )
    wait_awaiting(kubectl, namespace, "restarts")
    [ta] = approvals_of(kubectl, namespace, "restarts")
    assert ta["spec"]["arguments"]["name"] == "web", "only the unlabelled deployment waits"
    assert (
        decide(kubectl, namespace, ta["metadata"]["name"], "approver", "Approved").returncode == 0
    )
    assert wait_phase(kubectl, namespace, "restarts", "Succeeded", "Failed")["phase"] == "Succeeded"
    done = [
        (e["data"]["arguments"]["name"], e["data"]["status"])
        for e in stream(r, uid)
        if e["type"] == "tool" and e["data"]["status"] != "started"
    ]
    assert sorted(done) == [("batch", "succeeded"), ("web", "succeeded")]


def test_a_statefulset_pod_is_never_deleted(
    kubectl: Kubectl, namespace: str, agent_sa: str, r: redis_sync.Redis, script: Script
) -> None:
    assert apply_policy(kubectl, namespace, example("protect-statefulset-pods")).returncode == 0
    # The agent may delete pods (else its dry run is refused before any rule is asked).
    kubectl("create", "role", "deleter", "-n", namespace, "--verb=delete", "--resource=pods")
    kubectl(
        "create",
        "rolebinding",
        "deleter",
        "-n",
        namespace,
        "--role=deleter",
        f"--serviceaccount={namespace}:{agent_sa}",
    )
    account = f"system:serviceaccount:{namespace}:{agent_sa}"
    wait_for(
        "the agent's right to delete pods",
        lambda: (
            kubectl(
                "auth", "can-i", "delete", "pods", "-n", namespace, f"--as={account}", check=False
            ).stdout.strip()
            == "yes"
        ),
    )
    sts = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "db"},
        "spec": {
            "serviceName": "db",
            "replicas": 1,
            "selector": {"matchLabels": {"app": "db"}},
            "template": {
                "metadata": {"labels": {"app": "db"}},
                "spec": {"containers": [{"name": "db", "image": "nginx"}]},
            },
        },
    }
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(sts))
    wait_for(
        "the StatefulSet's pod db-0",
        lambda: kubectl("get", "pod", "db-0", "-n", namespace, check=False).returncode == 0,
    )
    name = script.add(
        marker("sts"),
        [
            {"text": "plan"},
            {"tool_calls": [{"name": "k8s_delete_pod", "arguments": {"name": "db-0"}}]},
            {"text": "done"},
        ],
    )
    uid = create_run(
        kubectl, namespace, "sts", goal=name, serviceAccountName=agent_sa, tools=["k8s_delete_pod"]
    )
    assert wait_phase(kubectl, namespace, "sts", "Succeeded", "Failed")["phase"] == "Succeeded"
    assert approvals_of(kubectl, namespace, "sts") == []
    tool = next(e["data"] for e in stream(r, uid) if e["type"] == "tool")
    assert tool["status"] == "denied" and "no-statefulset-pod-deletes" in tool["result"]["error"]
    assert kubectl("get", "pod", "db-0", "-n", namespace, check=False).returncode == 0


async def test_the_policy_book_follows_policies_and_namespace_labels_as_they_change(
    cluster: Any, kubectl: Kubectl, namespace: str
) -> None:
    k8s = await kube.Kube.from_kubeconfig(cluster.kubeconfig("agentrun-operator"))
    book = PolicyBook(k8s)
    book.start()
    cluster_policy = f"cap-{namespace}"
    try:

        async def synced() -> bool:
            return book.synced

        await async_wait_for("the policy book in sync", synced, True)

        async def names() -> list[str]:
            return [p.name for p in await book.for_namespace(namespace)]

        assert await names() == []
        assert apply_policy(kubectl, namespace, policy_doc("local", {})).returncode == 0
        selected = {"namespaceSelector": {"matchLabels": {"book-test": namespace}}}
        doc = policy_doc(cluster_policy, selected, "ClusterAgentPolicy")
        assert apply_policy(kubectl, "", doc).returncode == 0
        await async_wait_for("the new AgentPolicy", lambda: names(), ["local"])
        kubectl("label", "namespace", namespace, f"book-test={namespace}")
        await async_wait_for(
            "the selected cluster policy", lambda: names(), ["local", cluster_policy]
        )
        assert book.synced, "no API read was needed"
        kubectl("delete", "agentpolicy", "local", "-n", namespace)
        await async_wait_for("the deletion", lambda: names(), [cluster_policy])
    finally:
        kubectl("delete", "clusteragentpolicy", cluster_policy, check=False)
        await book.close()
        await k8s.close()


async def async_wait_for(what: str, read: Any, want: Any, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while asyncio.get_running_loop().time() < deadline:
        last = await read()
        if last == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def test_a_call_asked_again_is_judged_again_on_what_it_would_change_now(
    kubectl: Kubectl, namespace: str, agent_sa: str, r: redis_sync.Redis, script: Script
) -> None:
    freeze = {
        "rules": [
            {
                "name": "frozen",
                "when": "target != null && 'frozen' in target.labels",
                "action": "deny",
                "message": "frozen for the release",
            }
        ]
    }
    assert apply_policy(kubectl, namespace, policy_doc("freeze", freeze)).returncode == 0
    uid = start_scaling_run(kubectl, namespace, agent_sa, scale_script(script, "rejudge"))
    [name] = wait_awaiting(kubectl, namespace, "scale")
    # After the preview: someone scales it (so the approval goes Stale) and freezes it.
    kubectl("scale", "deployment", "web", "--replicas=2", "-n", namespace)
    kubectl("label", "deployment", "web", "frozen=yes", "-n", namespace)
    assert decide(kubectl, namespace, name, "approver", "Approved").returncode == 0
    assert wait_phase(kubectl, namespace, "scale", "Succeeded", "Failed")["phase"] == "Succeeded"
    names = [a["metadata"]["name"] for a in approvals_of(kubectl, namespace, "scale")]
    assert names == [name], "the deny rule answered: nobody was asked again"
    tool = next(e["data"] for e in stream(r, uid) if e["type"] == "tool")
    assert tool["status"] == "denied" and "(rule frozen)" in tool["result"]["error"], tool
    assert replicas(kubectl, namespace)["spec"]["replicas"] == 2
