"""Authorization matrix (fault scenario 7): who may do what, on the kubectl path and on the
HTTP path, each cell a test of its own.

People: admin (system:masters), creator (agentrun-editor), approver (agentrun-approver),
viewer (agentrun-viewer), each bound in one namespace the admission webhooks judge, and
anonymous (no credentials: kubectl's requests are system:anonymous, the SSE server answers
401). Actions, each on fresh objects:
- read: the run's event stream (HTTP) / get the run (kubectl: what opening a stream asks);
- list: the namespace's runs;
- chat: create a run;
- approve / deny: decide a pending ToolApproval;
- stop: stop a run;
- repatch: change a decision that is already recorded (another approver approved);
- forge: decide with a forged decidedBy and votes (kubectl) or a decidedBy field (HTTP).
An allowed cell checks the effect and that it is recorded under the real person; a refused
cell checks who refused (401, RBAC, the webhook, the request's validation) and that the
objects are exactly as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import pytest
import yaml
from faults import hostile_support as hs

from agentrun_harness.controlplane import ControlPlane
from agentrun_harness.operatorproc import WebhookProcess
from agentrun_harness.redisserver import RedisServer
from agentrun_operator import models

from support import Kubectl

if TYPE_CHECKING:
    from faults.conftest import Figures

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = "Authorization matrix"
USERS = ("admin", "creator", "approver", "viewer", "anonymous")
ACTIONS = ("read", "list", "chat", "approve", "deny", "stop", "repatch", "forge")
PATHS = ("kubectl", "http")
BINDINGS = {
    "creator": "agentrun-editor",
    "approver": "agentrun-approver",
    "approver2": "agentrun-approver",
    "viewer": "agentrun-viewer",
}
# Who may, by the ClusterRoles of manifests/rbac.yaml (admin: system:masters).
MAY: dict[str, set[str]] = {
    "read": {"admin", "creator", "approver", "viewer"},
    "list": {"admin", "creator", "approver", "viewer"},
    "chat": {"admin", "creator"},
    "approve": {"admin", "approver"},
    "deny": {"admin", "approver"},
    "stop": {"admin", "creator"},
    "repatch": set(),
    "forge": set(),
}
RBAC_LETS_DECIDE = {"admin", "approver"}

Outcome = Literal[
    "allowed",  # done, and recorded under the real person
    "neutralised",  # accepted, but the forged identity replaced by the real one
    "unauthenticated",  # HTTP 401: no credentials
    "anonymous",  # kubectl: refused to system:anonymous
    "rbac",  # refused by RBAC (kubectl: forbidden; HTTP: the API server's 403)
    "webhook",  # refused by the admission webhook
    "invalid",  # HTTP 422: the request names a field the API does not take
]


def expected(action: str, user: str, path: str) -> Outcome:
    if user == "anonymous":
        return "unauthenticated" if path == "http" else "anonymous"
    if user in MAY[action]:
        return "allowed"
    if action == "forge":
        if path == "http":
            return "invalid"
        return "neutralised" if user in RBAC_LETS_DECIDE else "rbac"
    if action == "repatch" and user in RBAC_LETS_DECIDE:
        return "webhook"
    return "rbac"


CELLS = [(a, u, p) for a in ACTIONS for u in USERS for p in PATHS]
RESULTS: dict[str, bool] = {}


# -- the ground ---------------------------------------------------------------------------


@dataclass
class Matrix:
    plane: ControlPlane
    namespace: str
    api: httpx.Client  # the API server as admin
    sse: hs.SSEProcess
    anonymous: hs.ConfiguredKubectl
    workdir: Path

    def path(self, plural: str, name: str = "") -> str:
        base = f"{hs.GROUP_PATH}/namespaces/{self.namespace}/{plural}"
        return f"{base}/{name}" if name else base

    def get(self, plural: str, name: str) -> dict[str, Any]:
        answer = self.api.get(self.path(plural, name))
        answer.raise_for_status()
        return dict(answer.json())

    def exists(self, plural: str, name: str) -> bool:
        return self.api.get(self.path(plural, name)).status_code == 200

    def create_as(self, user: str, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        with hs.kube_api(self.plane, user) as as_user:
            answer = as_user.post(self.path(plural), json=body)
        assert answer.status_code == 201, answer.text
        return dict(answer.json())

    def write_status(self, plural: str, name: str, status: dict[str, Any]) -> None:
        """As the operator writes status: a merge patch of the status subresource."""
        answer = self.api.patch(
            self.path(plural, name) + "/status",
            content=json.dumps({"status": status}),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert answer.status_code == 200, answer.text

    def patch_as(self, user: str, plural: str, name: str, patch: dict[str, Any]) -> None:
        with hs.kube_api(self.plane, user) as as_user:
            answer = as_user.patch(
                self.path(plural, name),
                content=json.dumps(patch),
                headers={"Content-Type": "application/merge-patch+json"},
            )
        assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
def matrix(
    cluster: ControlPlane,
    rbac: None,
    webhooks: WebhookProcess,
    kubectl: Kubectl,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Matrix]:
    workdir = tmp_path_factory.mktemp("authz")
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer(workdir=workdir / "redis", appendonly=False))
        sse = hs.SSEProcess(plane=cluster, redis_url=redis_server.url, workdir=workdir)
        stack.callback(sse.stop)
        sse.start()
        api = stack.enter_context(hs.kube_api(cluster))
        anonymous = hs.ConfiguredKubectl(
            cluster, hs.anonymous_kubeconfig(cluster, workdir / "anonymous.yaml")
        )
        for namespace in hs.webhook_namespace(kubectl, request, bindings=BINDINGS):
            yield Matrix(cluster, namespace, api, sse, anonymous, workdir)


@pytest.fixture(scope="module", autouse=True)
def _figures(figures: Figures) -> Iterator[None]:
    yield
    if RESULTS:
        held = sum(RESULTS.values())
        figures.record(SCENARIO, "cells checked (kubectl + HTTP)", len(RESULTS))
        figures.record(
            SCENARIO, "cells where the expected allow/deny held", f"{held}/{len(RESULTS)}", "all"
        )


# -- one cell ---------------------------------------------------------------------------


@dataclass
class Cell:
    action: str
    user: str
    path: str
    run: str  # the run it acts on (or creates)
    call_id: str
    approval: str

    @classmethod
    def of(cls, action: str, user: str, path: str) -> Cell:
        run = f"{action}-{user}-{path}"
        call_id = "c-" + hashlib.sha256(run.encode()).hexdigest()[:12]
        return cls(action, user, path, run, call_id, f"{run}-{call_id}")


def _prepare(m: Matrix, cell: Cell) -> None:
    """The objects a cell acts on: a run made by creator, and for decisions a pending
    ToolApproval made by the operator's identity (already approved by approver2 for
    repatch)."""
    if cell.action == "chat":
        return
    m.create_as(
        "creator",
        "agentruns",
        {
            "apiVersion": "agentrun.dev/v1alpha1",
            "kind": "AgentRun",
            "metadata": {"name": cell.run},
            "spec": {"goal": f"the {cell.action} cell"},
        },
    )
    if cell.action not in ("approve", "deny", "repatch", "forge"):
        return
    m.create_as(
        "agentrun-operator",
        "toolapprovals",
        {
            "apiVersion": "agentrun.dev/v1alpha1",
            "kind": "ToolApproval",
            "metadata": {
                "name": cell.approval,
                "labels": {"agentrun.dev/run": cell.run, "agentrun.dev/call-id": cell.call_id},
            },
            "spec": {
                "runName": cell.run,
                "callId": cell.call_id,
                "tool": "k8s_scale",
                "arguments": {"kind": "Deployment", "name": "web", "replicas": 2},
            },
        },
    )
    # What the operator writes before anyone may vote: the run's fixed settings, and the
    # approval's state and deadline.
    run = m.get("agentruns", cell.run)
    spec = models.AgentRunSpec.model_validate(run["spec"])
    m.write_status(
        "agentruns",
        cell.run,
        {"effective": models.effective_settings(spec, generation=1), "createdBy": "creator"},
    )
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    m.write_status("toolapprovals", cell.approval, {"state": "Pending", "expiresAt": expires})
    if cell.action == "repatch":
        m.patch_as("approver2", "toolapprovals", cell.approval, {"spec": {"decision": "Approved"}})


FORGED: dict[str, Any] = {
    "decision": "Approved",
    "decidedBy": {"username": "boss", "groups": ["system:masters"]},
    "votes": [{"username": "boss", "decision": "Approved", "at": "2026-01-01T00:00:00Z"}],
}


@dataclass
class Answer:
    ok: bool  # kubectl exit 0 / HTTP 2xx
    status: int  # HTTP status (0 for kubectl)
    text: str


def _kubectl(m: Matrix, kubectl: Kubectl, cell: Cell) -> Answer:
    ns = m.namespace
    doc: str | None = None
    if cell.action == "read":
        args = ["get", "agentrun", cell.run, "-n", ns, "-o", "name"]
    elif cell.action == "list":
        args = ["get", "agentruns", "-n", ns, "-o", "name"]
    elif cell.action == "chat":
        # --validate=false: the API server judges (anonymous cannot even fetch its schema).
        args = ["create", "--validate=false", "-n", ns, "-f", "-"]
        doc = json.dumps(
            {
                "apiVersion": "agentrun.dev/v1alpha1",
                "kind": "AgentRun",
                "metadata": {"name": cell.run},
                "spec": {"goal": "a run from kubectl"},
            }
        )
    elif cell.action == "stop":
        args = ["patch", "agentrun", cell.run, "-n", ns, "--type=merge", "-p"]
        args.append('{"spec":{"stop":true}}')
    else:
        spec: dict[str, Any] = {
            "approve": {"decision": "Approved"},
            "deny": {"decision": "Denied", "comment": "not now"},
            "repatch": {"decision": "Denied"},
            "forge": FORGED,
        }[cell.action]
        args = ["patch", "toolapproval", cell.approval, "-n", ns, "--type=merge", "-p"]
        args.append(json.dumps({"spec": spec}))
    if cell.user == "anonymous":
        proc = m.anonymous(*args, input=doc)
    else:
        proc = kubectl.as_user(cell.user)(*args, input=doc, check=False)
    return Answer(proc.returncode == 0, 0, proc.stderr + proc.stdout)


def _http(m: Matrix, cell: Cell) -> Answer:
    ns = m.namespace
    headers = {}
    if cell.user != "anonymous":
        headers["Authorization"] = f"Bearer {m.plane.token(cell.user)}"
    base = f"{m.sse.url}/api/v1"
    with httpx.Client(timeout=30, headers=headers) as http:
        if cell.action == "read":
            with http.stream("GET", f"{base}/runs/{ns}/{cell.run}/events") as r:
                streams = r.headers.get("content-type", "").startswith("text/event-stream")
                text = "(an event stream)" if streams else r.read().decode()
                return Answer(r.is_success and streams, r.status_code, text)
        if cell.action == "list":
            r = http.get(f"{base}/runs", params={"namespace": ns})
        elif cell.action == "chat":
            body = {"goal": "a run from the API", "namespace": ns, "name": cell.run}
            r = http.post(f"{base}/agent/chat?stream=false", json=body)
        elif cell.action == "stop":
            r = http.post(f"{base}/runs/{ns}/{cell.run}/stop")
        else:
            decision: dict[str, Any] = {
                "approve": {"decision": "approve"},
                "deny": {"decision": "deny", "comment": "not now"},
                "repatch": {"decision": "deny"},
                "forge": {"decision": "approve", "decidedBy": FORGED["decidedBy"]},
            }[cell.action]
            r = http.post(
                f"{base}/agent/approvals/{cell.call_id}?stream=false",
                json={"namespace": ns, **decision},
            )
        return Answer(r.is_success, r.status_code, r.text)


def _snapshot(m: Matrix, cell: Cell) -> dict[str, Any]:
    """The cell's objects as they are: (plural, name) -> resourceVersion, or None."""
    out: dict[str, Any] = {}
    for plural, name in (("agentruns", cell.run), ("toolapprovals", cell.approval)):
        answer = m.api.get(m.path(plural, name))
        out[f"{plural}/{name}"] = (
            answer.json()["metadata"]["resourceVersion"] if answer.status_code == 200 else None
        )
    return out


def _check_effect(m: Matrix, cell: Cell, answer: Answer, outcome: Outcome) -> None:
    """What an accepted action must have done, recorded under the real person."""
    action, user = cell.action, cell.user
    if action == "read":
        assert answer.status in (0, 200)
    elif action == "list":
        if cell.path == "kubectl":
            assert f"agentrun.agentrun.dev/{cell.run}" in answer.text.split(), answer.text
        else:
            assert cell.run in [i["name"] for i in json.loads(answer.text)["items"]]
    elif action == "chat":
        run = m.get("agentruns", cell.run)
        assert run["metadata"]["annotations"]["agentrun.dev/created-by"] == user
    elif action == "stop":
        run = m.get("agentruns", cell.run)
        assert run["spec"]["stop"] is True
        assert run["metadata"]["annotations"]["agentrun.dev/stopped-by"] == user
    else:
        spec = m.get("toolapprovals", cell.approval)["spec"]
        wanted = {"approve": "Approved", "deny": "Denied", "forge": "Approved"}[action]
        assert "decision" not in spec, "the request became a vote and is not stored"
        assert [(v["username"], v["decision"]) for v in spec["votes"]] == [(user, wanted)], spec
        assert spec["decidedBy"]["username"] == user, spec
        if outcome == "neutralised":
            assert "boss" not in json.dumps(spec), spec


REFUSAL_SAYS = {
    "anonymous": 'User "system:anonymous" cannot',
    "rbac": "cannot",
    "webhook": "already approved by approver2",
}


def _check_refusal(answer: Answer, cell: Cell, outcome: Outcome) -> None:
    assert not answer.ok, f"{cell} was allowed: {answer.text[:500]}"
    if outcome == "unauthenticated":
        assert answer.status == 401, answer.text
    elif outcome == "invalid":
        assert answer.status == 422, answer.text
        assert ["body", "decidedBy"] in [d["loc"] for d in json.loads(answer.text)["detail"]]
    else:
        if cell.path == "http":
            assert answer.status == 403, answer.text
        if outcome in ("anonymous", "rbac"):
            assert "forbidden" in answer.text.lower(), answer.text
        assert REFUSAL_SAYS[outcome] in answer.text, answer.text


@pytest.mark.parametrize(
    ("action", "user", "path"),
    [pytest.param(a, u, p, id=f"{a}-{u}-{p}") for a, u, p in CELLS],
)
def test_the_expected_allow_or_deny_holds(
    matrix: Matrix, kubectl: Kubectl, action: str, user: str, path: str
) -> None:
    cell = Cell.of(action, user, path)
    outcome = expected(action, user, path)
    RESULTS[f"{action}-{user}-{path}"] = False
    _prepare(matrix, cell)
    before = _snapshot(matrix, cell)
    answer = _kubectl(matrix, kubectl, cell) if path == "kubectl" else _http(matrix, cell)
    if outcome in ("allowed", "neutralised"):
        assert answer.ok, f"{cell} was refused: {answer.text[:1000]}"
        _check_effect(matrix, cell, answer, outcome)
    else:
        _check_refusal(answer, cell, outcome)
        assert _snapshot(matrix, cell) == before, "a refused action changed something"
    assert matrix.sse.alive(), matrix.sse.log_tail()
    RESULTS[f"{action}-{user}-{path}"] = True


# What each action needs from RBAC (resource, verb); repatch and forge are refused by the
# webhooks whatever RBAC says.
NEEDS = {
    "read": ("agentruns", "get"),
    "list": ("agentruns", "list"),
    "chat": ("agentruns", "create"),
    "approve": ("toolapprovals", "patch"),
    "deny": ("toolapprovals", "patch"),
    "stop": ("agentruns", "patch"),
}


def test_who_may_follows_the_shipped_cluster_roles() -> None:
    """MAY is what manifests/rbac.yaml grants: a change of a ClusterRole that the matrix
    does not follow fails here, before any cell runs against the wrong expectation."""
    granted: dict[str, set[tuple[str, str]]] = {}
    for doc in yaml.safe_load_all((ROOT / "manifests" / "rbac.yaml").read_text()):
        if doc and doc["kind"] == "ClusterRole":
            granted[doc["metadata"]["name"]] = {
                (resource, verb)
                for rule in doc.get("rules") or []
                if "agentrun.dev" in rule.get("apiGroups", [])
                for resource in rule.get("resources", [])
                for verb in rule.get("verbs", [])
            }
    for action in ACTIONS:
        need = NEEDS.get(action)
        by_rbac = {"admin"} | {
            user for user, role in BINDINGS.items() if need is not None and need in granted[role]
        }
        expected_users = by_rbac if need is not None else set()
        assert MAY[action] == expected_users & set(USERS), action
    # anonymous is refused everything.
    assert all(expected(a, "anonymous", p) != "allowed" for a in ACTIONS for p in PATHS)
