"""The CRDs against a real kube-apiserver (1.20): the examples are accepted, a table of bad
manifests is rejected with an error naming the field, printer columns and `kubectl explain`
work, and RBAC decides who may create runs."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentrun_harness.controlplane import ControlPlane
from agentrun_operator import kube

from support import Kubectl, wait_for

ROOT = Path(__file__).resolve().parents[2]


def agentrun(name: str = "bad", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "AgentRun",
        "metadata": {"name": name},
        "spec": {"goal": "look around", **spec},
    }


def toolapproval(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "ToolApproval",
        "metadata": {"name": "bad-ta"},
        "spec": {"runName": "r", "callId": "c-0123456789ab", "tool": "k8s_scale", **spec},
    }


def agentpolicy(kind: str = "AgentPolicy", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "bad-policy"},
        "spec": spec,
    }


def rule(**fields: Any) -> dict[str, Any]:
    return {"name": "r", "when": "true", "action": "require", **fields}


def selector(*requirements: dict[str, Any]) -> dict[str, Any]:
    return agentpolicy(
        "ClusterAgentPolicy", namespaceSelector={"matchExpressions": list(requirements)}
    )


def mcpserver(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": "bad-mcp"},
        "spec": {"url": "http://mcp.example/mcp", **spec},
    }


def without_goal() -> dict[str, Any]:
    doc = agentrun()
    del doc["spec"]["goal"]
    return doc


def without_spec() -> dict[str, Any]:
    doc = agentrun()
    del doc["spec"]
    return doc


# (case id, manifest, the field the error must name)
BAD_MANIFESTS: list[tuple[str, dict[str, Any], str]] = [
    ("missing goal", without_goal(), "spec.goal"),
    ("missing spec", without_spec(), "spec"),
    ("empty goal", agentrun(goal=""), "spec.goal"),
    ("huge goal", agentrun(goal="x" * 16385), "spec.goal"),
    ("goal of wrong type", agentrun(goal=["a", "list"]), "spec.goal"),
    ("unknown tool name", agentrun(tools=["k8s_nuke"]), "spec.tools"),
    ("tools not a list", agentrun(tools="k8s_get"), "spec.tools"),
    ("duplicate tool", agentrun(tools=["k8s_get", "k8s_get"]), "spec.tools"),
    ("negative maxSteps", agentrun(limits={"maxSteps": -1}), "spec.limits.maxSteps"),
    ("zero maxTokens", agentrun(limits={"maxTokens": 0}), "spec.limits.maxTokens"),
    ("negative maxCostUSD", agentrun(limits={"maxCostUSD": -0.5}), "spec.limits.maxCostUSD"),
    ("maxSteps as string", agentrun(limits={"maxSteps": "ten"}), "spec.limits.maxSteps"),
    ("bad run timeout", agentrun(limits={"timeout": "5 minutes"}), "spec.limits.timeout"),
    ("days in approval timeout", agentrun(approval={"timeout": "1d"}), "spec.approval.timeout"),
    ("unknown onTimeout", agentrun(approval={"onTimeout": "ignore"}), "spec.approval.onTimeout"),
    ("unknown required tool", agentrun(approval={"required": ["rm"]}), "spec.approval.required"),
    ("zero minApprovals", agentrun(approval={"minApprovals": 0}), "spec.approval.minApprovals"),
    (
        "approvers users not a list",
        agentrun(approval={"approvers": {"users": "alice"}}),
        "spec.approval.approvers.users",
    ),
    ("unknown provider", agentrun(model={"provider": "anthropic"}), "spec.model.provider"),
    ("temperature too high", agentrun(model={"temperature": 3}), "spec.model.temperature"),
    ("non-http baseURL", agentrun(model={"baseURL": "ftp://x/v1"}), "spec.model.baseURL"),
    (
        "secret ref without key",
        agentrun(model={"apiKeySecretRef": {"name": "llm"}}),
        "spec.model.apiKeySecretRef.key",
    ),
    (
        "invalid service account",
        agentrun(serviceAccountName="Not_A_Name"),
        "spec.serviceAccountName",
    ),
    ("negative ttl", agentrun(ttlSecondsAfterFinished=-5), "spec.ttlSecondsAfterFinished"),
    ("stop as string", agentrun(stop="yes"), "spec.stop"),
    ("name over 63 characters", agentrun(name="r" * 64), "metadata.name"),
    ("bad call id", toolapproval(callId="call_1"), "spec.callId"),
    ("unknown decision", toolapproval(decision="Maybe"), "spec.decision"),
    ("approval tool not a function name", toolapproval(tool="rm -rf"), "spec.tool"),
    ("approval server name too long", toolapproval(server="s" * 64), "spec.server"),
    ("arguments not an object", toolapproval(arguments="rm -rf"), "spec.arguments"),
    ("empty model name", agentrun(model={"name": ""}), "spec.model.name"),
    (
        "secret ref without name",
        agentrun(model={"apiKeySecretRef": {"key": "k"}}),
        "spec.model.apiKeySecretRef.name",
    ),
    (
        "duplicate approver group",
        agentrun(approval={"approvers": {"groups": ["sre", "sre"]}}),
        "spec.approval.approvers.groups",
    ),
    ("empty run name", toolapproval(runName=""), "spec.runName"),
    ("huge reason", toolapproval(reason="x" * 16385), "spec.reason"),
    ("huge comment", toolapproval(comment="x" * 2049), "spec.comment"),
    (
        "decidedBy without username",
        toolapproval(decidedBy={"groups": []}),
        "spec.decidedBy.username",
    ),
    (
        "a vote with an unknown decision",
        toolapproval(votes=[{"username": "a", "decision": "Maybe", "at": "2026-01-01T00:00:00Z"}]),
        "spec.votes.decision",
    ),
    (
        "a vote with a huge comment",
        toolapproval(
            votes=[
                {
                    "username": "a",
                    "decision": "Approved",
                    "comment": "x" * 2049,
                    "at": "2026-01-01T00:00:00Z",
                }
            ]
        ),
        "spec.votes.comment",
    ),
    (
        "a vote by nobody",
        toolapproval(votes=[{"decision": "Approved", "at": "2026-01-01T00:00:00Z"}]),
        "spec.votes.username",
    ),
    (
        "a vote at no time",
        toolapproval(votes=[{"username": "a", "decision": "Approved", "at": "yesterday"}]),
        "spec.votes.at",
    ),
    ("mcp server without url", mcpserver(url=None), "spec.url"),
    ("mcp server url not http", mcpserver(url="ftp://x/mcp"), "spec.url"),
    ("unknown mcp transport", mcpserver(transport="stdio"), "spec.transport"),
    ("unknown mcp auth", mcpserver(auth="oauth"), "spec.auth"),
    ("duplicate audience", mcpserver(audiences=["a", "a"]), "spec.audiences"),
    (
        "21 headers",
        mcpserver(
            headers=[
                {"name": f"h{i}", "secretKeyRef": {"name": "s", "key": "k"}} for i in range(21)
            ]
        ),
        "spec.headers",
    ),
    (
        "header name with a space",
        mcpserver(headers=[{"name": "X Key", "secretKeyRef": {"name": "s", "key": "k"}}]),
        "spec.headers.name",
    ),
    ("header without secret", mcpserver(headers=[{"name": "X-Key"}]), "spec.headers.secretKeyRef"),
    (
        "header secret without key",
        mcpserver(headers=[{"name": "X-Key", "secretKeyRef": {"name": "s"}}]),
        "spec.headers.secretKeyRef.key",
    ),
    (
        "header secret without name",
        mcpserver(headers=[{"name": "X-Key", "secretKeyRef": {"key": "k"}}]),
        "spec.headers.secretKeyRef.name",
    ),
    (
        "invalid discovery account",
        mcpserver(discoveryServiceAccountName="Not_A_Name"),
        "spec.discoveryServiceAccountName",
    ),
    ("days in mcp timeout", mcpserver(timeout="1d"), "spec.timeout"),
    ("asking rule without policy", toolapproval(rule={"name": "r"}), "spec.rule.policy"),
    ("asking rule without name", toolapproval(rule={"policy": "p"}), "spec.rule.name"),
    (
        "asking rule with zero approvals",
        toolapproval(rule={"policy": "p", "name": "r", "minApprovals": 0}),
        "spec.rule.minApprovals",
    ),
    (
        "101 approver lists of an asking rule",
        toolapproval(rule={"policy": "p", "name": "r", "approvers": [{}] * 101}),
        "spec.rule.approvers",
    ),
    (
        "asking rule approvers not a list",
        toolapproval(rule={"policy": "p", "name": "r", "approvers": [{"users": "alice"}]}),
        "spec.rule.approvers.users",
    ),
    (
        "asking rule duplicate approver group",
        toolapproval(rule={"policy": "p", "name": "r", "approvers": [{"groups": ["a", "a"]}]}),
        "spec.rule.approvers.groups",
    ),
    ("unknown rule action", agentpolicy(rules=[rule(action="maybe")]), "spec.rules.action"),
    (
        "rule without a condition",
        agentpolicy(rules=[{"name": "r", "action": "deny"}]),
        "spec.rules.when",
    ),
    ("huge condition", agentpolicy(rules=[rule(when="x" * 2049)]), "spec.rules.when"),
    ("rule name with capitals", agentpolicy(rules=[rule(name="Big")]), "spec.rules.name"),
    ("two rules of one name", agentpolicy(rules=[rule(), rule()]), "spec.rules"),
    ("zero rule approvals", agentpolicy(rules=[rule(minApprovals=0)]), "spec.rules.minApprovals"),
    ("huge rule message", agentpolicy(rules=[rule(message="x" * 1025)]), "spec.rules.message"),
    (
        "rule approvers not a list",
        agentpolicy(rules=[rule(approvers={"users": "alice"})]),
        "spec.rules.approvers.users",
    ),
    (
        "duplicate rule approver group",
        agentpolicy(rules=[rule(approvers={"groups": ["sre", "sre"]})]),
        "spec.rules.approvers.groups",
    ),
    ("days in maxTimeout", agentpolicy(approval={"maxTimeout": "1d"}), "spec.approval.maxTimeout"),
    (
        "duplicate allowed endpoint",
        agentpolicy(models={"baseURLs": ["http://a/v1", "http://a/v1"]}),
        "spec.models.baseURLs",
    ),
    (
        "invalid allowed service account",
        agentpolicy(serviceAccounts=["Not_A_Name"]),
        "spec.serviceAccounts",
    ),
    (
        "tool pattern with a space",
        agentpolicy(tools={"allowed": ["k8s get"]}),
        "spec.tools.allowed",
    ),
    (
        "tool pattern with brackets",
        agentpolicy(tools={"requireApproval": ["k8s_[a-z]"]}),
        "spec.tools.requireApproval",
    ),
    (
        "unknown selector operator",
        selector({"key": "env", "operator": "Near"}),
        "spec.namespaceSelector.matchExpressions.operator",
    ),
    (
        "selector requirement without key",
        selector({"operator": "Exists"}),
        "spec.namespaceSelector.matchExpressions.key",
    ),
    (
        "21 selector requirements",
        selector(*({"key": f"k{i}", "operator": "Exists"} for i in range(21))),
        "spec.namespaceSelector.matchExpressions",
    ),
    (
        "101 selector values",
        selector({"key": "env", "operator": "In", "values": [str(i) for i in range(101)]}),
        "spec.namespaceSelector.matchExpressions.values",
    ),
    (
        "101 votes",
        toolapproval(
            votes=[
                {"username": f"u{i}", "decision": "Approved", "at": "2026-01-01T00:00:00Z"}
                for i in range(101)
            ]
        ),
        "spec.votes",
    ),
]


@pytest.mark.parametrize(
    ("manifest", "field"),
    [pytest.param(m, f, id=i) for i, m, f in BAD_MANIFESTS],
)
def test_invalid_manifests_are_rejected_naming_the_field(
    kubectl: Kubectl, namespace: str, manifest: dict[str, Any], field: str
) -> None:
    # --validate=false: the API server, not kubectl's client-side check, must refuse it.
    proc = kubectl(
        "create",
        "--validate=false",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(manifest),
        check=False,
    )
    assert proc.returncode != 0, f"accepted: {json.dumps(manifest)[:200]}"
    assert "is invalid" in proc.stderr, proc.stderr
    # The API server names the path, with an index for list items: spec.tools[1]: ...
    # (1.20 leaves the index out: spec.votes.decision.)
    path = r"(\[\d+\])?\.".join(re.escape(part) for part in field.split("."))
    assert re.search(path + r"(\[\d+\])?[: ]", proc.stderr), proc.stderr
    listed = kubectl(
        "get", "agentruns,toolapprovals,agentpolicies,mcpservers", "-n", namespace, "-o", "name"
    )
    assert listed.stdout.strip() == "", "nothing may be stored after a rejection"
    stored = kubectl("get", "clusteragentpolicy", "bad-policy", check=False)
    assert stored.returncode != 0, "nothing may be stored after a rejection"


def _constrained_fields(crd: Path) -> set[str]:
    """The spec fields the CRD's schema constrains (required, bounds, enum, pattern, list
    rules), as the API server names them in an error."""
    doc = yaml.safe_load(crd.read_text())
    schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = {"enum", "minimum", "maximum", "minLength", "maxLength", "pattern", "maxItems"}
    found: set[str] = set()

    def walk(node: dict[str, Any], path: str) -> None:
        if rules & set(node) or node.get("x-kubernetes-list-type"):
            found.add(path)
        found.update(f"{path}.{key}" for key in node.get("required") or ())
        for key, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], path)

    walk(schema, "spec")
    return found


def test_every_field_the_crds_constrain_has_a_bad_manifest() -> None:
    """The table follows the CRDs: a new constrained field without a case fails here."""
    named = {field for _, _, field in BAD_MANIFESTS}
    for crd in sorted((ROOT / "crds").glob("*.yaml")):
        fields = _constrained_fields(crd)
        assert fields, crd
        missing = fields - named
        assert not missing, f"{crd.name}: no bad manifest names {sorted(missing)}"


def validation(cluster: ControlPlane) -> str:
    """kubectl's strictest validation this release has: server-side field validation
    (unknown and duplicate fields are errors) from 1.25, the client-side schema before."""
    return "--validate=strict" if cluster.version() >= (1, 25) else "--validate=true"


def test_examples_are_accepted_as_they_are(
    kubectl: Kubectl, namespace: str, cluster: ControlPlane
) -> None:
    kubectl("apply", validation(cluster), "-n", namespace, "-f", str(ROOT / "examples"))
    names = kubectl("get", "agentruns", "-n", namespace, "-o", "name").stdout.split()
    expected = {
        f"agentrun.agentrun.dev/{doc['metadata']['name']}"
        for path in (ROOT / "examples").glob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "AgentRun"
    }
    assert expected and set(names) == expected


def test_a_misspelled_field_is_an_error_naming_it_where_the_server_validates_fields(
    kubectl: Kubectl, namespace: str, cluster: ControlPlane
) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "agentrun-basic.yaml").read_text())
    doc["spec"]["limits"]["maxStep"] = 3  # maxSteps
    proc = kubectl(
        "apply", validation(cluster), "-n", namespace, "-f", "-", input=json.dumps(doc), check=False
    )
    assert proc.returncode != 0
    # 1.25+: the API server's field validation; 1.20: kubectl's own schema check (the API
    # server itself would prune the field silently, see the next test).
    named = 'unknown field "spec.limits.maxStep"' if cluster.version() >= (1, 25) else "maxStep"
    assert named in proc.stderr, proc.stderr


async def test_the_operators_own_writes_are_strictly_validated(
    cluster: ControlPlane, namespace: str
) -> None:
    # What kube.Kube writes (ToolApprovals, status, Events, the agent's k8s_patch/k8s_apply)
    # goes with fieldValidation=Strict: a field the CRD lacks is an error, not lost.
    k = await kube.Kube.from_kubeconfig(cluster.kubeconfig("admin"))
    body = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "ToolApproval",
        "metadata": {"name": "strict"},
        "spec": {"runName": "r", "callId": "c-0123456789ab", "tool": "k8s_scale", "reasn": "x"},
    }
    try:
        if cluster.version() >= (1, 25):
            with pytest.raises(kube.KubeError) as e:
                await k.request("POST", kube.TOOLAPPROVALS.path(namespace=namespace), body=body)
            assert e.value.status == 400
            assert 'unknown field "spec.reasn"' in str(e.value), e.value
        else:
            made = await k.request("POST", kube.TOOLAPPROVALS.path(namespace=namespace), body=body)
            assert "reasn" not in made["spec"]
    finally:
        await k.close()


def test_the_api_server_fills_in_spec_defaults(kubectl: Kubectl, namespace: str) -> None:
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(agentrun("defaults")))
    spec = json.loads(kubectl("get", "ar", "defaults", "-n", namespace, "-o", "json").stdout)[
        "spec"
    ]
    assert spec["tools"] == ["k8s_get", "k8s_list", "k8s_describe", "k8s_logs", "k8s_events"]
    # Not approval.required: a run that leaves it unset lets AgentPolicy allow rules decide
    # (the operator applies the default, every mutating tool, in status.effective).
    assert "required" not in spec["approval"]
    assert spec["approval"]["timeout"] == "1h"
    assert spec["limits"] == {"maxSteps": 25, "timeout": "30m"}
    assert spec["stop"] is False


def test_status_sent_with_a_create_is_dropped(kubectl: Kubectl, namespace: str) -> None:
    doc = agentrun("with-status")
    doc["status"] = {"phase": "Succeeded"}
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(doc))
    stored = json.loads(kubectl("get", "ar", "with-status", "-n", namespace, "-o", "json").stdout)
    assert "phase" not in stored.get("status", {})


def test_status_subresource_enforces_the_phase_enum(kubectl: Kubectl, namespace: str) -> None:
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(agentrun("phased")))
    stored = json.loads(kubectl("get", "ar", "phased", "-n", namespace, "-o", "json").stdout)
    stored["status"] = {"phase": "Exploded"}
    path = f"/apis/agentrun.dev/v1alpha1/namespaces/{namespace}/agentruns/phased/status"
    proc = kubectl("replace", "--raw", path, "-f", "-", input=json.dumps(stored), check=False)
    assert proc.returncode != 0 and "status.phase" in proc.stderr, proc.stderr
    stored["status"] = {"phase": "Running", "step": 2}
    kubectl("replace", "--raw", path, "-f", "-", input=json.dumps(stored))
    phase = kubectl("get", "ar", "phased", "-n", namespace, "-o", "jsonpath={.status.phase}")
    assert phase.stdout == "Running"


def test_printer_columns_show_in_kubectl_get(kubectl: Kubectl, namespace: str) -> None:
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(agentrun("columns")))
    header = kubectl("get", "ar", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "STEP", "APPROVALS", "TOKENS", "COST", "AGE"]
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(toolapproval()))
    header = kubectl("get", "ta", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "RUN", "TOOL", "STATE", "DECIDED-BY", "VOTES", "NEEDED", "AGE"]


def test_every_kind_is_in_the_agentrun_all_category(kubectl: Kubectl, namespace: str) -> None:
    discovery = json.loads(kubectl("get", "--raw", "/apis/agentrun.dev/v1alpha1").stdout)
    kinds = {r["kind"]: r for r in discovery["resources"] if "/" not in r["name"]}
    assert set(kinds) == {
        "AgentRun",
        "ToolApproval",
        "AgentPolicy",
        "ClusterAgentPolicy",
        "MCPServer",
    }
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(agentrun("both")))
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(toolapproval()))
    listed = kubectl("get", "agentrun-all", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(listed) == ["agentrun.agentrun.dev/both", "toolapproval.agentrun.dev/bad-ta"]
    # ...and the category does not shadow the singular name.
    one = kubectl("get", "agentrun", "both", "-n", namespace, "-o", "name").stdout.split()
    assert one == ["agentrun.agentrun.dev/both"]
    for kind, short, namespaced in (
        ("AgentRun", "ar", True),
        ("ToolApproval", "ta", True),
        ("AgentPolicy", "ap", True),
        ("ClusterAgentPolicy", "cap", False),
        ("MCPServer", "mcp", True),
    ):
        assert kinds[kind]["categories"] == ["agentrun-all"]
        assert kinds[kind]["shortNames"] == [short]
        assert kinds[kind]["namespaced"] is namespaced


def test_kubectl_explain_teaches_the_approval_fields(kubectl: Kubectl) -> None:
    # The API server publishes CRD schemas to /openapi/v2 a moment after they are established.
    def explained() -> str | None:
        proc = kubectl("explain", "agentrun.spec.approval", check=False)
        return proc.stdout if proc.returncode == 0 else None

    text = str(
        wait_for("kubectl explain agentrun.spec.approval", explained, timeout=60, interval=1)
    )
    for field in ("required", "approvers", "timeout", "onTimeout", "allowSelfApproval"):
        assert field in text
    assert "Which tool calls need a human decision" in text


def test_kubectl_explain_teaches_every_policy_field(kubectl: Kubectl) -> None:
    def explained(what: str) -> str | None:
        proc = kubectl("explain", what, "--recursive", check=False)
        return proc.stdout if proc.returncode == 0 else None

    for kind in ("agentpolicy", "clusteragentpolicy"):
        what = f"{kind}.spec"
        text = str(
            wait_for(
                f"kubectl explain {what}",
                functools.partial(explained, what),
                timeout=60,
                interval=1,
            )
        )
        for field in (
            "tools",
            "allowed",
            "requireApproval",
            "approval",
            "minApprovals",
            "maxTimeout",
            "limits",
            "models",
            "baseURLs",
            "serviceAccounts",
            "rules",
            "when",
            "action",
            "message",
        ):
            assert field in text, (kind, field)
    rule_text = kubectl("explain", "agentpolicy.spec.rules.when").stdout
    assert "CEL expression" in rule_text and "namespaceObject" in rule_text
    cluster = kubectl("explain", "clusteragentpolicy.spec.namespaceSelector").stdout
    assert "Namespaces (by their labels)" in cluster


def test_a_user_without_rbac_rights_cannot_create_a_run(kubectl: Kubectl, namespace: str) -> None:
    doc = json.dumps(agentrun("forbidden"))
    proc = kubectl.as_user("nobody")("create", "-n", namespace, "-f", "-", input=doc, check=False)
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), proc.stderr


def test_a_role_granting_create_lets_the_creator_in(kubectl: Kubectl, namespace: str) -> None:
    doc = json.dumps(agentrun("allowed"))
    creator = kubectl.as_user("creator")
    denied = creator("create", "-n", namespace, "-f", "-", input=doc, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    kubectl(
        "create",
        "role",
        "run-creator",
        "-n",
        namespace,
        "--verb=create,get",
        "--resource=agentruns.agentrun.dev",
    )
    kubectl(
        "create",
        "rolebinding",
        "run-creator",
        "-n",
        namespace,
        "--role=run-creator",
        "--user=creator",
    )
    wait_for(
        "the creator's new role to take effect",
        lambda: (
            creator(
                "auth", "can-i", "create", "agentruns.agentrun.dev", "-n", namespace, check=False
            ).stdout.strip()
            == "yes"
        ),
    )
    creator("create", "-n", namespace, "-f", "-", input=doc)
