"""Hostile input (fault scenario 6): malformed manifests and malformed HTTP requests are each
refused with a clear answer naming what is wrong, the processes stay up, nothing is written.

Covers, against the real control plane, the admission webhook server and the SSE server
as a real process (its own Redis, so every write it makes is counted):
- a table of malformed AgentRun and ToolApproval manifests beyond tests/integration/
  test_crds.py (huge and multibyte goals, unicode, control and RTL characters in names,
  wrong types, deep JSON in arguments, forged status, forged identities, edits of
  operator-written fields), each refused by the API server's schema, the webhooks or RBAC
  with an error naming the field, and the namespace left exactly as it was;
- hypothesis: generated names that are not DNS labels and generated values of the wrong
  type for every typed spec field are refused naming the field; any unicode goal within
  bounds is stored as sent;
- a table of malformed HTTP requests (bad JSON, deep JSON, wrong content types, oversized
  bodies, bad Last-Event-ID values, path traversal in ns/name, CR/LF in event ids, hostile
  tokens, bad query parameters, unknown methods), and raw requests no client library sends,
  each a 4xx naming the field where it is a body; /healthz after each; no write to
  Kubernetes or Redis;
- schemathesis against the server's own OpenAPI document: generated requests to every
  operation, none answered with a 5xx or an undocumented status;
- CR/LF and SSE field text inside an event's data arrive as one event, injecting nothing.
"""

from __future__ import annotations

import contextlib
import json
import re
import string
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import pytest
import redis as redis_sync
import schemathesis
from faults import hostile_support as hs
from faults.conftest import count
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from agentrun_harness import sse as sse_harness
from agentrun_harness.controlplane import USERS, ControlPlane
from agentrun_harness.operatorproc import WebhookProcess
from agentrun_harness.redisserver import RedisServer
from agentrun_operator import events, models
from agentrun_sse import openapi

from support import Kubectl, Script, fix_settings, open_approval

if TYPE_CHECKING:
    from faults.conftest import Figures

SCENARIO = "Hostile input"
CALL_ID = "c-0123456789ab"
TARGET_TA = f"target-{CALL_ID}"
# Another approval of the target run, opened as the operator would, and past its deadline.
LATE_TA = "target-c-0000000000e2"
API = "/api/v1"
# Bounded and repeatable: the same examples on every run, no example database.
HYPOTHESIS = settings(
    max_examples=count(full=100, ci=25),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@dataclass
class Tally:
    """Cases of one kind: how many ran, and those whose expectation held."""

    ran: int = 0
    held: list[str] = field(default_factory=list)


TALLIES: dict[str, Tally] = {}
DEATHS: list[int] = []  # server processes found dead at the end


def tally(kind: str) -> Tally:
    return TALLIES.setdefault(kind, Tally())


# -- the ground: a judged namespace, its objects, the SSE server ------------------------


@dataclass
class Ground:
    plane: ControlPlane
    namespace: str
    api: httpx.Client  # the API server as admin
    sse: hs.SSEProcess
    redis: redis_sync.Redis  # the SSE server's own Redis
    redis_url: str
    run_uid: str
    allowed_base_url: str
    workdir: Path


@pytest.fixture(scope="module")
def ground(
    cluster: ControlPlane,
    rbac: None,
    webhooks: WebhookProcess,
    kubectl: Kubectl,
    script: Script,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Ground]:
    bindings = {"creator": "agentrun-editor", "approver": "agentrun-approver"}
    workdir = tmp_path_factory.mktemp("hostile")
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer(workdir=workdir / "redis", appendonly=False))
        sse = hs.SSEProcess(plane=cluster, redis_url=redis_server.url, workdir=workdir)
        stack.callback(sse.stop)
        api = stack.enter_context(hs.kube_api(cluster))
        r = redis_sync.Redis.from_url(redis_server.url)
        stack.callback(r.close)
        for namespace in hs.webhook_namespace(kubectl, request, bindings=bindings):
            run = {
                "apiVersion": "agentrun.dev/v1alpha1",
                "kind": "AgentRun",
                "metadata": {"name": "target"},
                "spec": {"goal": "stay as you are", "approval": {"approvers": {"users": []}}},
            }
            with hs.kube_api(cluster, "creator") as creator:
                made = creator.post(f"{hs.GROUP_PATH}/namespaces/{namespace}/agentruns", json=run)
                assert made.status_code == 201, made.text
            approval: dict[str, Any] = {
                "apiVersion": "agentrun.dev/v1alpha1",
                "kind": "ToolApproval",
                "metadata": {
                    "name": TARGET_TA,
                    "labels": {"agentrun.dev/run": "target", "agentrun.dev/call-id": CALL_ID},
                },
                "spec": {
                    "runName": "target",
                    "callId": CALL_ID,
                    "tool": "k8s_scale",
                    "arguments": {"kind": "Deployment", "name": "web", "replicas": 3},
                },
            }
            with hs.kube_api(cluster, "agentrun-operator") as operator_identity:
                made_ta = operator_identity.post(
                    f"{hs.GROUP_PATH}/namespaces/{namespace}/toolapprovals", json=approval
                )
                assert made_ta.status_code == 201, made_ta.text
                call_id = LATE_TA.removeprefix("target-")
                late = {
                    **approval,
                    "metadata": {
                        "name": LATE_TA,
                        "labels": {"agentrun.dev/run": "target", "agentrun.dev/call-id": call_id},
                    },
                    "spec": {**approval["spec"], "callId": call_id},
                }
                made_late = operator_identity.post(
                    f"{hs.GROUP_PATH}/namespaces/{namespace}/toolapprovals", json=late
                )
                assert made_late.status_code == 201, made_late.text
            open_approval(kubectl, namespace, LATE_TA, seconds=-60)
            fix_settings(kubectl, namespace, "target")
            sse.start()
            yield Ground(
                plane=cluster,
                namespace=namespace,
                api=api,
                sse=sse,
                redis=r,
                redis_url=redis_server.url,
                run_uid=made.json()["metadata"]["uid"],
                allowed_base_url=script.llm.base_url,
                workdir=workdir,
            )


@pytest.fixture(scope="module", autouse=True)
def _figures(figures: Figures) -> Iterator[None]:
    yield
    labels = {
        "manifests": "malformed manifests refused naming the field, nothing stored",
        "generated manifests": "generated malformed manifests (hypothesis) refused",
        "http": "malformed HTTP requests answered 4xx, nothing written",
        "raw http": "raw malformed HTTP requests (no client sends them) answered 4xx",
        "schemathesis": "schemathesis requests (OpenAPI, every operation) without a 5xx",
    }
    for kind, label in labels.items():
        t = TALLIES.get(kind)
        if t is not None and t.ran:
            figures.record(SCENARIO, label, f"{len(t.held)}/{t.ran}", "all")
    if DEATHS:
        figures.record(SCENARIO, "server processes that died (SSE, webhooks)", DEATHS[-1], "0")


# -- malformed manifests --------------------------------------------------------------

Verb = Literal["create", "patch-run", "patch-approval", "status-run", "status-approval"]
Layer = Literal["schema", "webhook", "rbac"]
LAYER_SAYS = {
    "schema": r"is invalid",
    "webhook": r'admission webhook "[^"]+" denied the request',
    "rbac": r"(?i)forbidden: User \"[^\"]+\" cannot",
}


@dataclass(frozen=True)
class Manifest:
    """One hostile write: what, as whom, who must refuse it and the error's words."""

    id: str
    user: str
    verb: Verb
    body: Any  # the manifest (create), the merge patch (patch-*), the status (status-*)
    layer: Layer
    says: str  # a regex the error must match: it names the field
    target: str = TARGET_TA  # the approval a patch-approval case edits


def named(path: str) -> str:
    """The API server names a field path, with an index for list items: spec.tools[1]: ..."""
    return re.escape(path) + r"(\[\d+\])?[: ]"


def run(name: str = "hostile", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "AgentRun",
        "metadata": {"name": name},
        "spec": {"goal": "look around", **spec},
    }


def approval(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "ToolApproval",
        "metadata": {"name": "hostile-ta"},
        "spec": {"runName": "target", "callId": "c-00000000beef", "tool": "k8s_scale", **spec},
    }


def with_meta(doc: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {**doc, "metadata": {**doc["metadata"], **meta}}


# Placeholders filled in at run time: text json.dumps cannot write, or fixture values.
DEEP_70, DEEP_5000, ALLOWED = "@DEEP70@", "@DEEP5000@", "@ALLOWED@"
GOAL_MAX = 16384


def _ar(case: str, layer: Layer, says: str, **spec: Any) -> Manifest:
    return Manifest(case, "creator", "create", run(**spec), layer, says)


MANIFESTS: list[Manifest] = [
    # AgentRun creates, by a person allowed to create runs.
    _ar("goal of 16385 emoji", "schema", named("spec.goal"), goal="\U0001f600" * (GOAL_MAX + 1)),
    _ar("goal of 1 MiB", "schema", named("spec.goal"), goal="x" * (1 << 20)),
    _ar("goal a number", "schema", named("spec.goal"), goal=42),
    _ar("goal an object", "schema", named("spec.goal"), goal={"text": "hi"}),
    _ar("goal null", "schema", named("spec.goal"), goal=None),
    _ar("goal a boolean", "schema", named("spec.goal"), goal=True),
    Manifest("name with RTL override", "creator", "create",
             run("run\u202egpj.exe"), "schema", named("metadata.name")),
    Manifest("name with a control character", "creator", "create",
             run("run\x07"), "schema", named("metadata.name")),
    Manifest("name with NUL", "creator", "create",
             run("run\x00x"), "schema", named("metadata.name")),
    Manifest("name with a newline", "creator", "create",
             run("run\nx"), "schema", named("metadata.name")),
    Manifest("name with an emoji", "creator", "create",
             run("r\U0001f600n"), "schema", named("metadata.name")),
    Manifest("name of 253 characters", "creator", "create",
             run("a" * 253), "schema", named("metadata.name")),
    Manifest("name of 254 characters", "creator", "create",
             run("a" * 254), "schema", named("metadata.name")),
    Manifest("name with path traversal", "creator", "create",
             run("../kube-system"), "schema", named("metadata.name")),
    Manifest("label value in unicode", "creator", "create",
             with_meta(run(), labels={"team": "\u00fcber"}), "schema", named("metadata.labels")),
    _ar("tool name with a Cyrillic e", "schema", named("spec.tools"), tools=["k8s_g\u0435t"]),
    _ar("tool name null", "schema", named("spec.tools"), tools=[None]),
    _ar("tool names nested", "schema", named("spec.tools"), tools=[["k8s_get"]]),
    _ar("maxSteps 1e30", "schema", named("spec.limits.maxSteps"), limits={"maxSteps": 1e30}),
    _ar("maxSteps 2.5", "schema", named("spec.limits.maxSteps"), limits={"maxSteps": 2.5}),
    _ar("maxSteps 1001", "schema", named("spec.limits.maxSteps"), limits={"maxSteps": 1001}),
    _ar("limits a list", "schema", named("spec.limits"), limits=[{"maxSteps": 1}]),
    _ar("negative run timeout", "schema", named("spec.limits.timeout"),
        limits={"timeout": "-5m"}),
    _ar("run timeout in fullwidth digits", "schema", named("spec.limits.timeout"),
        limits={"timeout": "\uff15m"}),
    _ar("approval timeout with a newline", "schema", named("spec.approval.timeout"),
        approval={"timeout": "1h\n"}),
    _ar("101 approver groups", "schema", named("spec.approval.approvers.groups"),
        approval={"approvers": {"groups": [f"g{i}" for i in range(101)]}}),
    _ar("approver user a number", "schema", named("spec.approval.approvers.users"),
        approval={"approvers": {"users": [5]}}),
    _ar("minApprovals 11", "schema", named("spec.approval.minApprovals"),
        approval={"minApprovals": 11}),
    _ar("allowSelfApproval as text", "schema", named("spec.approval.allowSelfApproval"),
        approval={"allowSelfApproval": "true"}),
    _ar("required tools as text", "schema", named("spec.approval.required"),
        approval={"required": "k8s_scale"}),
    _ar("temperature as text", "schema", named("spec.model.temperature"),
        model={"temperature": "hot"}),
    _ar("negative temperature", "schema", named("spec.model.temperature"),
        model={"temperature": -0.1}),
    _ar("baseURL to the metadata service", "webhook", named("spec.model.baseURL"),
        model={"baseURL": "http://169.254.169.254/latest/meta-data"}),
    _ar("baseURL with the allowed one as user info", "webhook", named("spec.model.baseURL"),
        model={"baseURL": f"{ALLOWED}@evil.example.com/v1"}),
    _ar("baseURL javascript:", "schema", named("spec.model.baseURL"),
        model={"baseURL": "javascript:alert(1)"}),
    _ar("baseURL with CR/LF", "schema", named("spec.model.baseURL"),
        model={"baseURL": "http://llm/v1\r\nHost: evil"}),
    _ar("baseURL of 2049 characters", "schema", named("spec.model.baseURL"),
        model={"baseURL": "http://x/" + "a" * 2040}),
    _ar("secret name with path traversal", "schema", named("spec.model.apiKeySecretRef.name"),
        model={"apiKeySecretRef": {"name": "../../etc/passwd", "key": "k"}}),
    _ar("model name of 257 characters", "schema", named("spec.model.name"),
        model={"name": "m" * 257}),
    _ar("model name an object", "schema", named("spec.model.name"), model={"name": {"a": 1}}),
    _ar("service account of another namespace", "schema", named("spec.serviceAccountName"),
        serviceAccountName="system:serviceaccount:kube-system:admin"),
    _ar("ttl as a duration", "schema", named("spec.ttlSecondsAfterFinished"),
        ttlSecondsAfterFinished="1h"),
    Manifest("spec a string", "creator", "create",
             {**run(), "spec": "look around"}, "schema", named("spec")),
    # ToolApproval creates. Only the operator's identity may create them at all, so the
    # schema is tried as that identity; the webhook judges everyone else.
    Manifest("approval by a person with a forged decidedBy", "admin", "create",
             approval(decidedBy={"username": "boss", "groups": ["system:masters"]}),
             "webhook", "created by the agentrun operator only"),
    Manifest("approval created already decided", "agentrun-operator", "create",
             approval(decision="Approved"), "webhook", named("spec.decision")),
    Manifest("call id in upper case", "agentrun-operator", "create",
             approval(callId="c-0123456789AB"), "schema", named("spec.callId")),
    Manifest("call id with a newline", "agentrun-operator", "create",
             approval(callId="c-0123456789ab\n"), "schema", named("spec.callId")),
    Manifest("run name of 64 characters", "agentrun-operator", "create",
             approval(runName="r" * 64), "schema", named("spec.runName")),
    Manifest("empty run name", "agentrun-operator", "create",
             approval(runName=""), "schema", named("spec.runName")),
    Manifest("tool name with NUL", "agentrun-operator", "create",
             approval(tool="k8s_scale\x00"), "schema", named("spec.tool")),
    Manifest("reason of 16385 characters", "agentrun-operator", "create",
             approval(reason="r" * (GOAL_MAX + 1)), "schema", named("spec.reason")),
    Manifest("comment of 2049 characters", "agentrun-operator", "create",
             approval(comment="c" * 2049), "schema", named("spec.comment")),
    Manifest("arguments a list", "agentrun-operator", "create",
             approval(arguments=[1, 2]), "schema", named("spec.arguments")),
    Manifest("arguments 70 levels deep", "agentrun-operator", "create",
             approval(arguments=DEEP_70), "webhook", named("spec.arguments")),
    Manifest("arguments 5000 levels deep", "agentrun-operator", "create",
             approval(arguments=DEEP_5000), "webhook", named("spec.arguments")),
    # Trust: a service account its creator was never granted; votes cast before the
    # operator opened the approval or after its deadline (forged votes are overwritten and
    # the agent's own vote is refused: tests/integration/test_trust.py).
    _ar("run as a service account its creator may not use", "webhook",
        r"verb 'use' on resource 'serviceaccounts\.agentrun\.dev'", goal="g",
        serviceAccountName="powerful"),
    Manifest("vote before the operator opened the approval", "approver", "patch-approval",
             {"spec": {"decision": "Approved"}}, "webhook", r"not open for decisions yet"),
    Manifest("vote after the deadline", "approver", "patch-approval",
             {"spec": {"decision": "Approved"}}, "webhook", r"this approval expired at",
             LATE_TA),
    # Edits of the existing run and approval, by people RBAC lets patch them.
    Manifest("decision in lower case", "approver", "patch-approval",
             {"spec": {"decision": "approved"}}, "schema", named("spec.decision")),
    Manifest("decision comment of 2049 characters", "approver", "patch-approval",
             {"spec": {"decision": "Approved", "comment": "c" * 2049}},
             "schema", named("spec.comment")),
    Manifest("arguments made 70 levels deep", "approver", "patch-approval",
             {"spec": {"arguments": DEEP_70}}, "webhook", named("spec.arguments")),
    Manifest("call id rewritten", "approver", "patch-approval",
             {"spec": {"callId": "c-00000000dead"}}, "webhook", named("spec.callId")),
    Manifest("run label rewritten", "approver", "patch-approval",
             {"metadata": {"labels": {"agentrun.dev/run": "other"}}},
             "webhook", "label agentrun.dev/run"),
    Manifest("goal grown past its limit", "creator", "patch-run",
             {"spec": {"goal": "g" * (GOAL_MAX + 1)}}, "schema", named("spec.goal")),
    Manifest("tools widened after creation", "creator", "patch-run",
             {"spec": {"tools": ["k8s_get", "k8s_apply"]}}, "webhook", named("spec.tools")),
    Manifest("model endpoint swapped after creation", "creator", "patch-run",
             {"spec": {"model": {"baseURL": "http://evil.example.com/v1"}}},
             "webhook", named("spec.model")),
    Manifest("stop as text", "creator", "patch-run",
             {"spec": {"stop": "yes"}}, "schema", named("spec.stop")),
    # Forged status: only the operator has the status subresource, and its schema holds.
    Manifest("run status by its creator", "creator", "status-run",
             {"phase": "Succeeded"}, "rbac", r'"agentruns/status"'),
    Manifest("approval status by an approver", "approver", "status-approval",
             {"state": "Approved", "decidedBy": {"username": "boss"}},
             "rbac", r'"toolapprovals/status"'),
    Manifest("negative token count", "admin", "status-run",
             {"phase": "Running", "usage": {"totalTokens": -1}},
             "schema", named("status.usage.totalTokens")),
    Manifest("result over 4 KiB", "admin", "status-run",
             {"phase": "Succeeded", "result": "r" * 4097}, "schema", named("status.result")),
    Manifest("condition status Maybe", "admin", "status-run",
             {"conditions": [{"type": "Ready", "status": "Maybe"}]},
             # 1.20 leaves the index out: status.conditions.status
             "schema", r"status\.conditions(\[0\])?\.status: "),
    Manifest("approval state Hacked", "admin", "status-approval",
             {"state": "Hacked"}, "schema", named("status.state")),
]  # fmt: skip


def _text(body: Any, ground: Ground) -> str:
    text = json.dumps(body)
    return (
        text.replace(f'"{DEEP_70}"', hs.deep_json(70))
        .replace(f'"{DEEP_5000}"', hs.deep_json(5000))
        .replace(ALLOWED, ground.allowed_base_url)
    )


def _write(case: Manifest, ground: Ground, kubectl: Kubectl) -> tuple[int, str]:
    """Make the write with kubectl as the case's user; (exit code, stderr and stdout)."""
    as_user = kubectl.as_user(case.user)
    ns = ground.namespace
    text = _text(case.body, ground)
    if case.verb == "create":
        # --validate=false: the API server, not kubectl's client-side check, must refuse it.
        proc = as_user("create", "--validate=false", "-n", ns, "-f", "-", input=text, check=False)
    elif case.verb in ("patch-run", "patch-approval"):
        kind, name = ("agentrun", "target") if case.verb == "patch-run" else ("ta", case.target)
        patch = ground.workdir / "patch.json"  # a file: a 1 MiB argument is over ARG_MAX
        patch.write_text(text)
        proc = as_user(
            "patch", kind, name, "-n", ns, "--type=merge", f"--patch-file={patch}", check=False
        )
    else:
        plural, name = (
            ("agentruns", "target") if case.verb == "status-run" else ("toolapprovals", TARGET_TA)
        )
        path = f"{hs.GROUP_PATH}/namespaces/{ns}/{plural}/{name}"
        current = ground.api.get(path).json()
        forged = json.dumps({**current, "status": json.loads(text)})
        proc = as_user("replace", "--raw", f"{path}/status", "-f", "-", input=forged, check=False)
    return proc.returncode, proc.stderr + proc.stdout


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in MANIFESTS])
def test_a_malformed_manifest_is_refused_naming_the_field(
    ground: Ground, kubectl: Kubectl, case: Manifest
) -> None:
    t = tally("manifests")
    t.ran += 1
    before = hs.objects(ground.api, ground.namespace)
    code, said = _write(case, ground, kubectl)
    assert code != 0, f"accepted: {_text(case.body, ground)[:300]}"
    assert re.search(LAYER_SAYS[case.layer], said), f"not refused by the {case.layer}: {said}"
    assert re.search(case.says, said), f"the error does not name {case.says!r}: {said[:2000]}"
    assert hs.objects(ground.api, ground.namespace) == before, "something was written"
    t.held.append(case.id)


# -- generated manifests (hypothesis) -----------------------------------------------------

# Names: any text that is not a valid AgentRun name: a DNS subdomain, as for every custom
# resource ("0.0" is one), of at most 63 characters, which the webhook adds.
_VALID_NAME = re.compile(models.DNS_SUBDOMAIN_PATTERN)
bad_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=80
).filter(lambda s: not (len(s) <= models.MAX_RUN_NAME and _VALID_NAME.fullmatch(s)))

# Every typed field of spec, by the JSON type its schema declares.
TYPED_FIELDS: dict[str, str] = {
    "goal": "string",
    "tools": "array",
    "stop": "boolean",
    "serviceAccountName": "string",
    "ttlSecondsAfterFinished": "integer",
    "limits": "object",
    "limits.maxSteps": "integer",
    "limits.maxTokens": "integer",
    "limits.maxCostUSD": "number",
    "limits.timeout": "string",
    "approval": "object",
    "approval.required": "array",
    "approval.approvers": "object",
    "approval.approvers.users": "array",
    "approval.minApprovals": "integer",
    "approval.timeout": "string",
    "approval.onTimeout": "string",
    "approval.allowSelfApproval": "boolean",
    "model": "object",
    "model.provider": "string",
    "model.name": "string",
    "model.baseURL": "string",
    "model.apiKeySecretRef": "object",
    "model.temperature": "number",
}
_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40),
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(string.ascii_letters, min_size=1, max_size=8), inner, max_size=4),
    ),
    max_leaves=30,
)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _wrongly_typed(field_type: str, value: Any) -> bool:
    kind = _json_type(value)
    return kind != field_type and not (field_type == "number" and kind == "integer")


def _wrong_for(path: str) -> st.SearchStrategy[tuple[str, Any]]:
    values = json_values.filter(lambda v: _wrongly_typed(TYPED_FIELDS[path], v))
    return st.tuples(st.just(path), values)


wrong_types: st.SearchStrategy[tuple[str, Any]] = st.sampled_from(sorted(TYPED_FIELDS)).flatmap(
    _wrong_for
)


def _nested(path: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return dict(out)


def _create(api: httpx.Client, namespace: str, doc: dict[str, Any]) -> httpx.Response:
    return api.post(f"{hs.GROUP_PATH}/namespaces/{namespace}/agentruns", json=doc)


def _causes(answer: httpx.Response) -> list[str]:
    details = answer.json().get("details") or {}
    return [str(c.get("field", "")) for c in details.get("causes") or []]


def test_generated_names_that_are_not_dns_labels_are_refused(ground: Ground) -> None:
    t = tally("generated manifests")
    before = hs.objects(ground.api, ground.namespace)
    with hs.kube_api(ground.plane, "creator") as creator:

        @HYPOTHESIS
        @given(name=bad_names)
        def refused(name: str) -> None:
            t.ran += 1
            answer = _create(creator, ground.namespace, run(name))
            assert answer.status_code == 422, (name, answer.text)
            assert "metadata.name" in _causes(answer), (name, answer.text)
            t.held.append(name)

        refused()
    assert hs.objects(ground.api, ground.namespace) == before


def test_generated_values_of_the_wrong_type_are_refused_naming_the_field(ground: Ground) -> None:
    t = tally("generated manifests")
    before = hs.objects(ground.api, ground.namespace)
    with hs.kube_api(ground.plane, "creator") as creator:

        @HYPOTHESIS
        @given(case=wrong_types)
        def refused(case: tuple[str, Any]) -> None:
            path, value = case
            t.ran += 1
            doc = run()
            doc["spec"] = {"goal": "look around", **_nested(path, value)}
            answer = _create(creator, ground.namespace, doc)
            assert answer.status_code == 422, (path, value, answer.text)
            assert f"spec.{path}" in _causes(answer), (path, value, answer.text)
            t.held.append(path)

        refused()
    assert hs.objects(ground.api, ground.namespace) == before


def test_any_unicode_goal_within_bounds_is_stored_as_sent(ground: Ground) -> None:
    """Hostile but valid: RTL, control characters, NUL, emoji come back byte for byte."""
    base = f"{hs.GROUP_PATH}/namespaces/{ground.namespace}/agentruns"
    with hs.kube_api(ground.plane, "creator") as creator:

        @settings(HYPOTHESIS, max_examples=10)
        @given(
            goal=st.text(
                alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
                min_size=1,
                max_size=300,
            )
        )
        def stored(goal: str) -> None:
            made = creator.post(base, json=run("unicode-goal", goal=goal))
            assert made.status_code == 201, made.text
            try:
                assert ground.api.get(f"{base}/unicode-goal").json()["spec"]["goal"] == goal
            finally:
                # No finalizer (no operator runs here): the delete is immediate.
                gone = ground.api.delete(f"{base}/unicode-goal")
                assert gone.status_code == 200, gone.text
                assert ground.api.get(f"{base}/unicode-goal").status_code == 404

        stored()


# -- malformed HTTP requests ------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One malformed request to the SSE server, and the answer it must get."""

    id: str
    method: str
    path: str  # {ns} is the ground's namespace
    status: int
    loc: tuple[str | int, ...] | None = None  # a 422's detail must name this
    body: bytes | None = None
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, bytes], ...] = ()
    token: bool = True  # the admin's bearer token


CHAT = f"{API}/agent/chat?stream=false"
DECIDE = f"{API}/agent/approvals/{CALL_ID}?stream=false"
EVENTS = f"{API}/runs/{{ns}}/target/events"


def _json(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def _chat(case: str, loc: tuple[str | int, ...], **fields: Any) -> Call:
    body = {"goal": "look around", "namespace": "{ns}", **fields}
    return Call(case, "POST", CHAT, 422, loc, json.dumps(body).encode())


def _events(case: str, status: int, loc: tuple[str, str] | None, **headers: bytes) -> Call:
    return Call(case, "GET", EVENTS, status, loc, None, None, tuple(headers.items()))


CALLS: list[Call] = [
    # Bodies that are not JSON, or not the JSON asked for.
    Call("invalid JSON", "POST", CHAT, 422, ("body",), b"{not json"),
    Call("truncated JSON", "POST", CHAT, 422, ("body",), b'{"goal": "g"'),
    Call("a JSON array", "POST", CHAT, 422, ("body",), b"[]"),
    Call("a JSON string", "POST", CHAT, 422, ("body",), b'"look around"'),
    Call("an empty body", "POST", CHAT, 422, ("body",), b""),
    Call("invalid UTF-8", "POST", CHAT, 422, ("body",), b'{"goal": "\xff\xfe"}'),
    Call("60,000 levels of brackets", "POST", CHAT, 422, ("body",), b"[" * 60_000),
    _chat("40 levels of objects in model", ("body", "model"),
          model=json.loads(hs.deep_json(40))),
    Call("NaN for the goal", "POST", CHAT, 422, ("body", "goal"),
         b'{"goal": NaN, "namespace": "x"}'),
    _chat("goal a number", ("body", "goal"), goal=42),
    _chat("empty goal", ("body", "goal"), goal=""),
    _chat("goal of 16385 characters", ("body", "goal"), goal="g" * (GOAL_MAX + 1)),
    _chat("namespace with path traversal", ("body", "namespace"), namespace="../kube-system"),
    _chat("namespace with RTL override", ("body", "namespace"), namespace="ns\u202e"),
    _chat("name in upper case", ("body", "name"), name="Run"),
    _chat("name of 64 characters", ("body", "name"), name="r" * 64),
    _chat("forged createdBy", ("body", "createdBy"), createdBy="boss"),
    _chat("tools as text", ("body", "tools"), tools="k8s_get"),
    _chat("65 tools", ("body", "tools"), tools=["k8s_get"] * 65),
    _chat("service account of another namespace", ("body", "serviceAccountName"),
          serviceAccountName="system:serviceaccount:kube-system:admin"),
    _chat("limits a list", ("body", "limits"), limits=[1]),
    Call("decision in upper case", "POST", DECIDE, 422, ("body", "decision"),
         _json(namespace="{ns}", decision="APPROVE")),
    Call("no decision", "POST", DECIDE, 422, ("body", "decision"), _json(namespace="{ns}")),
    Call("comment of 2049 characters", "POST", DECIDE, 422, ("body", "comment"),
         _json(namespace="{ns}", decision="approve", comment="c" * 2049)),
    Call("forged decidedBy", "POST", DECIDE, 422, ("body", "decidedBy"),
         _json(namespace="{ns}", decision="approve", decidedBy={"username": "boss"})),
    Call("namespace other than the path's", "POST",
         f"{API}/runs/{{ns}}/target/approvals/{CALL_ID}?stream=false", 422,
         ("body", "namespace"), _json(namespace="kube-system", decision="approve")),
    Call("label selector injected in the call id", "POST",
         f"{API}/agent/approvals/{CALL_ID},agentrun.dev!=x?stream=false", 422,
         ("path", "call_id"), _json(namespace="{ns}", decision="approve")),
    # Content types and sizes.
    Call("text/plain", "POST", CHAT, 415, None, b"goal=g", "text/plain"),
    Call("a form", "POST", CHAT, 415, None, b"goal=g", "application/x-www-form-urlencoded"),
    Call("multipart", "POST", CHAT, 415, None, b"--x--", "multipart/form-data; boundary=x"),
    Call("no content type", "POST", CHAT, 415, None, b"{}", None),
    Call("a JSON patch type", "POST", CHAT, 415, None, b"[]", "application/json-patch+json"),
    Call("70 KB body", "POST", CHAT, 413, None,
         _json(goal="g" * 70_000, namespace="{ns}")),
    # Last-Event-ID, as a header and as a query parameter.
    _events("Last-Event-ID not an id", 422, ("header", "Last-Event-ID"), **{"Last-Event-ID": b"x"}),
    _events("Last-Event-ID negative", 422, ("header", "Last-Event-ID"),
            **{"Last-Event-ID": b"-1"}),
    _events("Last-Event-ID with three parts", 422, ("header", "Last-Event-ID"),
            **{"Last-Event-ID": b"1-2-3"}),
    _events("Last-Event-ID over 64 bits", 422, ("header", "Last-Event-ID"),
            **{"Last-Event-ID": str(2**64).encode() + b"-0"}),
    _events("Last-Event-ID with a Latin-1 byte", 422, ("header", "Last-Event-ID"),
            **{"Last-Event-ID": b"1-0\xe9"}),
    Call("lastEventId in fullwidth digits", "GET", EVENTS + "?lastEventId=%EF%BC%91-%EF%BC%90",
         422, ("query", "lastEventId")),
    Call("lastEventId with CR/LF and an injected event", "GET",
         EVENTS + "?lastEventId=1-0%0D%0Aevent:%20end%0D%0A", 422, ("query", "lastEventId")),
    Call("lastEventId of 5000 digits", "GET", EVENTS + "?lastEventId=" + "9" * 5000,
         422, ("query", "lastEventId")),
    Call("replay neither all nor none", "GET", EVENTS + "?replay=some", 422, ("query", "replay")),
    Call("replay empty", "GET", EVENTS + "?replay=", 422, ("query", "replay")),
    # Path traversal and odd characters in ns and name.
    Call("namespace ..", "GET", f"{API}/runs/%2e%2e/target", 422, ("path", "ns")),
    Call("name with NUL", "GET", f"{API}/runs/{{ns}}/target%00", 422, ("path", "name")),
    Call("name with backslashes", "GET", f"{API}/runs/{{ns}}/..%5C..%5Cetc", 422,
         ("path", "name")),
    Call("namespace with a trailing newline", "GET", f"{API}/runs/{{ns}}%0A/target", 422,
         ("path", "ns")),
    Call("namespace in unicode", "GET", f"{API}/runs/k%C3%BCbe/target", 422, ("path", "ns")),
    Call("name of 254 characters", "GET", f"{API}/runs/{{ns}}/{'a' * 254}", 422,
         ("path", "name")),
    Call("encoded slashes out of the namespace", "GET",
         f"{API}/runs/..%2F..%2Fkube-system/target", 404),
    Call("list in a traversing namespace", "GET", f"{API}/runs?namespace=..%2Fkube-system",
         422, ("query", "namespace")),
    # Hostile credentials: each the caller's 401, never the server's 5xx.
    Call("token with non-ASCII bytes", "GET", f"{API}/runs/{{ns}}/target", 401, token=False,
         headers=(("Authorization", b"Bearer t\xc3\xa9st"),)),
    Call("token with a space", "GET", f"{API}/runs/{{ns}}/target", 401, token=False,
         headers=(("Authorization", b"Bearer a b"),)),
    Call("basic credentials", "GET", f"{API}/runs/{{ns}}/target", 401, token=False,
         headers=(("Authorization", b"Basic YWRtaW46YWRtaW4="),)),
    Call("session cookie with non-ASCII bytes", "GET", f"{API}/runs/{{ns}}/target", 401,
         token=False, headers=(("Cookie", b"agentrun_session=\xc3\xa9"),)),
    Call("access_token in unicode", "GET", f"{API}/runs/{{ns}}/target?access_token=%C3%A9",
         401, token=False),
    Call("access_token on a write", "POST",
         f"{API}/runs/{{ns}}/target/stop?access_token=agentrun-admin-token", 401, token=False),
    Call("login with a token in unicode", "POST", "/login", 422, ("body", "token"),
         _json(token="t\u00e9st"), token=False),
    # Methods no route has.
    Call("DELETE a run", "DELETE", f"{API}/runs/{{ns}}/target", 405),
    Call("PUT a chat", "PUT", CHAT, 405, body=b"{}"),
    Call("PATCH a stop", "PATCH", f"{API}/runs/{{ns}}/target/stop", 405, body=b"{}"),
    Call("GET a stop", "GET", f"{API}/runs/{{ns}}/target/stop", 405),
    Call("TRACE the UI", "TRACE", "/", 405, content_type=None),
    Call("OPTIONS the list", "OPTIONS", f"{API}/runs", 405),
    Call("source file through static/..", "GET", "/static/%2e%2e/app.py", 404),
]  # fmt: skip


def _fill(text: str, ground: Ground) -> str:
    return text.replace("{ns}", ground.namespace)


@dataclass
class Unchanged:
    """The ground's Kubernetes objects and its Redis, as they were."""

    objects: dict[tuple[str, str], str]
    redis_writes: int
    server_errors: int

    @classmethod
    def now(cls, ground: Ground) -> Unchanged:
        return cls(
            hs.objects(ground.api, ground.namespace),
            hs.redis_writes(ground.redis),
            len(ground.sse.server_errors()),
        )

    def check(self, ground: Ground) -> None:
        assert ground.sse.alive(), f"the SSE server died:\n{ground.sse.log_tail()}"
        health = httpx.get(f"{ground.sse.url}/healthz", timeout=10)
        assert health.status_code == 200 and health.text == "ok"
        assert hs.objects(ground.api, ground.namespace) == self.objects, "Kubernetes written"
        assert hs.redis_writes(ground.redis) == self.redis_writes, "Redis written"
        assert len(ground.sse.server_errors()) == self.server_errors, ground.sse.log_tail()


@pytest.mark.parametrize("call", [pytest.param(c, id=c.id) for c in CALLS])
def test_a_malformed_request_gets_a_clear_4xx_and_changes_nothing(
    ground: Ground, call: Call
) -> None:
    t = tally("http")
    t.ran += 1
    before = Unchanged.now(ground)
    headers = [(name.encode(), value) for name, value in call.headers]
    if call.token:
        headers.append((b"Authorization", f"Bearer {ground.plane.token('admin')}".encode()))
    if call.content_type:
        headers.append((b"Content-Type", call.content_type.encode()))
    body = _fill(call.body.decode("latin-1"), ground).encode("latin-1") if call.body else None
    answer = httpx.request(
        call.method,
        ground.sse.url + _fill(call.path, ground),
        content=body,
        headers=headers,
        timeout=30,
    )
    assert answer.status_code == call.status, answer.text[:1000]
    assert answer.text, "a refusal says why"
    if call.loc is not None:
        locs = [tuple(d["loc"]) for d in answer.json()["detail"]]
        assert call.loc in locs, locs
    before.check(ground)
    t.held.append(call.id)


def test_every_operation_that_takes_input_has_malformed_requests() -> None:
    """The table follows the server's own OpenAPI document: an endpoint or parameter added
    without a malformed request here fails this test."""
    untested = []
    for template, item in openapi.document()["paths"].items():
        pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$")
        for method, op in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            if not (op.get("parameters") or op.get("requestBody") or item.get("parameters")):
                continue
            if not any(
                c.method == method.upper() and pattern.match(c.path.split("?")[0]) for c in CALLS
            ):
                untested.append(f"{method.upper()} {template}")
    assert not untested, f"no malformed request for {untested}"


# Requests only a hostile client writes: broken framing, smuggling, bare CR in headers.
RAW: list[tuple[str, bytes, tuple[int, ...]]] = [
    ("unknown method", b"FOO /healthz HTTP/1.1\r\nHost: x\r\n\r\n", (400, 405)),
    ("bare CR in Last-Event-ID", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
     b"Last-Event-ID: 1-0\revent: end\r\n\r\n", (400,)),
    ("two different Content-Lengths", b"POST /login HTTP/1.1\r\nHost: x\r\n"
     b"Content-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\n{}",
     (400,)),
    ("Content-Length with Transfer-Encoding", b"POST /login HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", (400,)),
    ("negative Content-Length", b"POST /login HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: -1\r\n\r\n", (400,)),
    ("chunked body over 64 KiB", b"POST /api/v1/agent/chat HTTP/1.1\r\nHost: x\r\n"
     b"Authorization: Bearer " + USERS["admin"].token.encode() + b"\r\n"
     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"11170\r\n" + b" " * 0x11170 + b"\r\n0\r\n\r\n", (413,)),
    ("a terabyte Content-Length", b"POST /api/v1/agent/chat HTTP/1.1\r\nHost: x\r\n"
     b"Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n{}", (413,)),
    ("space in a header name", b"GET /healthz HTTP/1.1\r\nHost: x\r\nLast Event ID: 1\r\n\r\n",
     (400,)),
    ("NUL in the request target", b"GET /healthz\x00 HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),
    ("HTTP/9.9", b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", (400, 505)),
    ("raw ../ out of static", b"GET /static/../app.py HTTP/1.1\r\nHost: x\r\n\r\n", (404,)),
]  # fmt: skip


@pytest.mark.parametrize(("request_bytes", "statuses"), [
    pytest.param(data, statuses, id=case) for case, data, statuses in RAW
])  # fmt: skip
def test_a_raw_malformed_request_gets_a_4xx_and_changes_nothing(
    ground: Ground, request_bytes: bytes, statuses: tuple[int, ...]
) -> None:
    t = tally("raw http")
    t.ran += 1
    before = Unchanged.now(ground)
    status, answer = hs.raw_http(ground.sse.port, request_bytes)
    assert status in statuses, answer[:500]
    before.check(ground)
    t.held.append(str(status))


# -- schemathesis against the published OpenAPI document --------------------------------

OPERATIONS = sorted(
    op["operationId"] for path in openapi.document()["paths"].values() for op in path.values()
)
EXPECTED_REFUSALS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422"]


@pytest.fixture(scope="module")
def published(ground: Ground) -> OpenApiSchema:
    """The server's OpenAPI document, as it serves it."""
    schema = schemathesis.openapi.from_url(f"{ground.sse.url}/openapi.json")
    schema.config.checks.negative_data_rejection.expected_statuses = EXPECTED_REFUSALS
    return schema


@pytest.mark.parametrize("operation_id", OPERATIONS)
def test_generated_requests_never_get_a_server_error(
    ground: Ground, published: OpenApiSchema, operation_id: str
) -> None:
    """As ``nobody`` (a real user without rights): every request that passes the server's
    own checks is refused by RBAC, so nothing can be written whatever is generated."""
    t = tally("schemathesis")
    before = Unchanged.now(ground)
    operation = published.find_operation_by_id(operation_id)
    headers = {"Authorization": f"Bearer {ground.plane.token('nobody')}"}
    checks = [
        not_a_server_error,
        negative_data_rejection,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    declared = next(
        op
        for path in openapi.document()["paths"].values()
        for op in path.values()
        if op["operationId"] == operation_id
    )
    modes = [schemathesis.GenerationMode.POSITIVE]
    if declared.get("parameters") or declared.get("requestBody"):
        modes.append(schemathesis.GenerationMode.NEGATIVE)
    for mode in modes:

        @settings(HYPOTHESIS, max_examples=count(full=100, ci=20))
        @given(case=operation.as_strategy(generation_mode=mode))
        def answered(case: schemathesis.Case[Any]) -> None:
            t.ran += 1
            response = case.call(base_url=ground.sse.url, headers=headers, timeout=30)
            case.validate_response(response, checks=checks, headers=headers)
            t.held.append(operation_id)

        answered()
    before.check(ground)


# -- CR/LF inside event data ----------------------------------------------------------------


@pytest.fixture
async def sse_redis(ground: Ground) -> AsyncIterator[Any]:
    r = events.connect(ground.redis_url)
    yield r
    await r.aclose()


async def test_crlf_and_sse_fields_inside_an_event_arrive_as_one_event(
    ground: Ground, sse_redis: Any
) -> None:
    """Text that would end a frame and forge an `end` event (were it written raw) is data."""
    op = await sse_harness.FakeOperator(
        sse_redis, uid=ground.run_uid, run=f"{ground.namespace}/target"
    ).start()
    forged = "ok\r\n\r\nid: 9999999999999-0\r\nevent: end\r\ndata: {}\r\n\r\n"
    await op.emit("token", {"text": forged, "node": "act"})
    await op.emit("token", {"text": "after", "node": "act"})
    admin = {"Authorization": f"Bearer {ground.plane.token('admin')}"}
    url = f"{ground.sse.url}{events.stream_path(ground.namespace, 'target')}"
    async with (
        httpx.AsyncClient(timeout=30) as http,
        sse_harness.StreamTap(http, url, headers=admin) as tap,
    ):
        assert tap.status == 200
        got = [await tap.next(), await tap.next()]
    assert [m.event for m in got] == ["token", "token"]
    assert got[0].json()["data"]["text"] == forged
    assert got[1].json()["data"]["text"] == "after"
    assert got[0].id is not None and got[0].id != "9999999999999-0"


def test_no_server_process_died(ground: Ground, webhooks: WebhookProcess) -> None:
    webhooks_up = webhooks.proc is not None and webhooks.proc.poll() is None
    DEATHS.append(int(not ground.sse.alive()) + int(not webhooks_up))
    assert DEATHS[-1] == 0, (ground.sse.log_tail(), webhooks.log_tail())
    assert not ground.sse.server_errors(), ground.sse.log_tail()
