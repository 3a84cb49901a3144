"""Helpers the tests share: kubectl as a test user, and bounded waits that say what they
waited for."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis as redis_sync

from agentrun_harness.controlplane import ControlPlane
from agentrun_harness.operatorproc import OperatorProcess
from agentrun_operator import events, models

__all__ = [
    "Kubectl",
    "OperatorProcess",
    "Script",
    "all_running",
    "assert_clean_stream",
    "bind_roles",
    "create_run",
    "fix_settings",
    "fresh_namespace",
    "get_run",
    "marker",
    "open_approval",
    "require_tool",
    "run_kubectl",
    "stream",
    "wait_event",
    "wait_for",
    "wait_phase",
]


# Set to 1 to let tests whose system tool (nginx, chromium) is missing skip instead of fail.
ALLOW_MISSING_TOOLS = "AGENTRUN_ALLOW_MISSING_TOOLS"


def require_tool(path: str, *, package: str) -> None:
    """Fail the test when a system tool it drives is absent, naming the fix: a suite that
    skips silently on a machine without nginx proves nothing about the proxy config. Only an
    explicit AGENTRUN_ALLOW_MISSING_TOOLS=1 turns that into a skip."""
    if os.path.exists(path):
        return
    hint = (
        f"{path} not found: run `scripts/install-deps.sh test` (or apt-get install {package}); "
        f"{ALLOW_MISSING_TOOLS}=1 skips such tests instead"
    )
    if os.environ.get(ALLOW_MISSING_TOOLS) == "1":
        pytest.skip(hint)
    pytest.fail(hint, pytrace=False)


@dataclass
class Kubectl:
    """kubectl as one of the control plane's users."""

    plane: ControlPlane
    user: str = "admin"

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        base = [str(self.plane.kubectl), f"--kubeconfig={self.plane.kubeconfig(self.user)}"]
        return run_kubectl(base, args, user=self.user, input=input, check=check, timeout=timeout)

    def as_user(self, user: str) -> Kubectl:
        return Kubectl(self.plane, user)


def run_kubectl(
    base: list[str],
    args: tuple[str, ...],
    *,
    user: str,
    input: str | None,
    check: bool,
    timeout: float,
) -> subprocess.CompletedProcess[str]:
    """``base`` (kubectl and its connection flags) + ``args``; fails naming the command and
    the user when ``check`` and it did."""
    proc = subprocess.run(
        [*base, *args], input=input, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"kubectl {' '.join(args)} as {user} failed ({proc.returncode}):\n"
            f"{proc.stderr}{proc.stdout}"
        )
    return proc


def wait_for(
    what: str, predicate: Callable[[], object], *, timeout: float = 30, interval: float = 0.1
) -> object:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def fresh_namespace(kubectl: Kubectl, request: Any, prefix: str) -> Iterator[str]:
    """A new namespace; on failure its events are printed before it goes."""
    name = f"{prefix}{uuid.uuid4().hex[:10]}"
    kubectl("create", "namespace", name)
    yield name
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        events = kubectl("get", "events", "-n", name, check=False)
        print(f"--- events in {name} ---\n{events.stdout}{events.stderr}")
    kubectl("delete", "namespace", name, "--wait=false", check=False)


# One thing each agentrun ClusterRole allows (verb, resource in agentrun.dev), to tell when
# a binding has taken effect.
ROLE_PROBES = {
    "agentrun-viewer": ("get", "toolapprovals"),
    "agentrun-approver": ("patch", "toolapprovals"),
    "agentrun-editor": ("create", "agentruns"),
    "agentrun-sa-user": ("use", "serviceaccounts"),  # virtual: `kubectl auth can-i` says no
}


def bind_roles(kubectl: Kubectl, namespace: str, bindings: list[tuple[str, str]]) -> None:
    """RoleBindings of agentrun's ClusterRoles to test users, ``[(user, role), ...]``;
    returns once each is in effect (RBAC caches briefly)."""
    for user, role in bindings:
        kubectl(
            "create",
            "rolebinding",
            f"{user}-{role}",
            "-n",
            namespace,
            f"--clusterrole={role}",
            f"--user={user}",
        )

    def can(user: str, verb: str, resource: str) -> bool:
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {
                    "namespace": namespace,
                    "verb": verb,
                    "group": models.GROUP,
                    "resource": resource,
                }
            },
        }
        out = kubectl.as_user(user)(
            "create",
            "--validate=false",
            "-f",
            "-",
            "-o",
            "jsonpath={.status.allowed}",
            input=json.dumps(review),
        )
        return out.stdout.strip() == "true"

    for user, role in bindings:
        verb, resource = ROLE_PROBES[role]
        wait_for(f"{user}'s {role} to take effect", functools.partial(can, user, verb, resource))


class Script:
    """The mock LLM's rules, accumulated: each test adds rules keyed by a unique marker."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.rules: list[dict[str, Any]] = []

    def add(self, marker: str, replies: list[dict[str, Any]]) -> str:
        self.rules.insert(0, {"match": marker, "replies": replies})
        self.llm.set_script(self.rules)
        return marker

    def calls_for(self, marker: str) -> int:
        count = 0
        for call in self.llm.calls:
            users = [m for m in call.get("messages", []) if m.get("role") == "user"]
            if users and marker in str(users[0].get("content")):
                count += 1
        return count


# -- runs, as the tests see them ------------------------------------------------------


def let_default_account_scale(kubectl: Kubectl, namespace: str) -> None:
    """The namespace's default ServiceAccount may read and patch Deployments (returns once
    RBAC enforces it): runs acting as it pass the dry run that previews a k8s_scale, so
    people are asked."""
    kubectl(
        "create", "role", "scaler", "-n", namespace, "--verb=get,list,patch",
        "--resource=deployments",
    )  # fmt: skip
    kubectl(
        "create", "rolebinding", "scaler", "-n", namespace, "--role=scaler",
        f"--serviceaccount={namespace}:default",
    )  # fmt: skip
    default = f"system:serviceaccount:{namespace}:default"
    wait_for(
        "RBAC to let the default account patch deployments",
        lambda: kubectl(
            "auth", "can-i", "patch", "deployments", "-n", namespace, f"--as={default}",
            check=False,
        ).stdout.strip()
        == "yes",
    )  # fmt: skip


def create_run(kubectl: Kubectl, namespace: str, name: str, **spec: Any) -> str:
    doc = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "AgentRun",
        "metadata": {"name": name},
        "spec": spec,
    }
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(doc))
    return str(get_run(kubectl, namespace, name)["metadata"]["uid"])


def _replace_status(kubectl: Kubectl, path: str, status: dict[str, Any]) -> None:
    """Merge ``status`` into an object's status as the operator would, through the status
    subresource (``replace --raw``: kubectl 1.20 has no ``--subresource``)."""
    current = json.loads(kubectl("get", "--raw", path).stdout)
    current["status"] = {**(current.get("status") or {}), **status}
    kubectl("replace", "--raw", f"{path}/status", "-f", "-", input=json.dumps(current))


def set_run_status(kubectl: Kubectl, namespace: str, run: str, status: dict[str, Any]) -> None:
    """Merge ``status`` into a run's status, as the operator writes it."""
    path = f"/apis/agentrun.dev/v1alpha1/namespaces/{namespace}/agentruns/{run}"
    _replace_status(kubectl, path, status)


def fix_settings(kubectl: Kubectl, namespace: str, run: str) -> None:
    """What the operator writes when it first sees a run (status.effective, createdBy), for
    tests of the webhook and the SSE server that run no operator."""
    body = get_run(kubectl, namespace, run)
    spec = models.AgentRunSpec.model_validate(body.get("spec") or {})
    generation = int(body["metadata"].get("generation") or 1)
    creator = (body["metadata"].get("annotations") or {}).get("agentrun.dev/created-by")
    status = {
        "effective": models.effective_settings(spec, generation=generation),
        **({"createdBy": creator} if creator else {}),
    }
    _replace_status(
        kubectl, f"/apis/agentrun.dev/v1alpha1/namespaces/{namespace}/agentruns/{run}", status
    )


def open_approval(kubectl: Kubectl, namespace: str, name: str, *, seconds: int = 3600) -> None:
    """What the operator writes on a new ToolApproval before anyone may vote: state Pending
    and its deadline."""
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds))
    path = f"/apis/agentrun.dev/v1alpha1/namespaces/{namespace}/toolapprovals/{name}"
    _replace_status(kubectl, path, {"state": "Pending", "expiresAt": expires})


def get_run(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    out = kubectl("get", "agentrun", name, "-n", namespace, "-o", "json")
    return dict(json.loads(out.stdout))


def wait_phase(
    kubectl: Kubectl, namespace: str, name: str, *phases: str, timeout: float = 60
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        st = get_run(kubectl, namespace, name).get("status") or {}
        return st if st.get("phase") in phases else None

    result = wait_for(f"{namespace}/{name} to reach {'/'.join(phases)}", reached, timeout=timeout)
    assert isinstance(result, dict)
    return result


def decoded(entries: object) -> list[dict[str, Any]]:
    """Entries as XRANGE / XREVRANGE return them, decoded (redis-py types those loosely)."""
    return events.decode_entries(entries)


def stream(r: redis_sync.Redis, uid: str) -> list[dict[str, Any]]:
    return decoded(r.xrange(events.events_key(uid)))


def wait_event(
    r: redis_sync.Redis, uid: str, what: str, pred: Any, timeout: float = 30
) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        return next((e for e in stream(r, uid) if pred(e)), None)

    result = wait_for(what, found, timeout=timeout, interval=0.05)
    assert isinstance(result, dict)
    return result


def assert_clean_stream(evs: list[dict[str, Any]]) -> None:
    """No gap, no duplicate, ids strictly increasing, and `end` last."""
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1)), [e["seq"] for e in evs]
    ids = [tuple(int(p) for p in e["id"].split("-")) for e in evs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert evs[-1]["type"] == "end"
    assert sum(1 for e in evs if e["type"] == "end") == 1


def marker(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# -- operator processes of a module's own ---------------------------------------------

WEBHOOK_LABEL = "agentrun-test/webhooks"  # namespaces the test webhooks judge


def own_operator(
    cluster: ControlPlane,
    *,
    redis_url: str,
    script: Script,
    workdir: Any,
    namespaces: str,
    ident: str = "op-test",
    module: str = "agentrun_operator",
    env: dict[str, str] | None = None,
) -> OperatorProcess:
    """An operator (or, ``module="agentrun_operator.worker"``, a worker) process of a test
    module's own, with the product's least-privilege identity; not started."""
    return OperatorProcess(
        plane=cluster,
        redis_url=redis_url,
        model_base_url=script.llm.base_url,
        workdir=workdir,
        operator_id=ident,
        user="agentrun-operator",
        module=module,
        env={
            "AGENTRUN_MODEL_BASE_URL_ALLOW": script.llm.base_url,
            "AGENTRUN_LLM_MAX_RETRIES": "0",
            "AGENTRUN_NAMESPACES": namespaces,
            **(env or {}),
        },
    )


@contextlib.contextmanager
def all_running(procs: dict[str, OperatorProcess]) -> Iterator[dict[str, OperatorProcess]]:
    """Start every process (operators, controllers, workers); stop them all at the end."""
    try:
        for proc in procs.values():
            proc.start()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def metrics(port: int) -> Callable[..., float]:
    """What a process serves on its Prometheus ``port`` now: ``value(name, **labels)``, 0 for
    a sample it does not serve."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    return value


def judged_namespace(
    kubectl: Kubectl, request: Any, prefix: str, *logs_of: tuple[str, OperatorProcess]
) -> Iterator[str]:
    """A fresh namespace the test webhooks judge, for a module's own operator processes;
    their logs (DEBUG left out) are printed when the test fails."""
    for name in fresh_namespace(kubectl, request, prefix):
        kubectl("label", "namespace", name, f"{WEBHOOK_LABEL}=on")
        yield name
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for what, proc in logs_of:
            print(f"--- {what} log (no DEBUG) ---\n{proc.log_tail(150, quiet=True)}")


def approved_scale(
    kubectl: Kubectl,
    namespace: str,
    script: Script,
    name: str,
    *,
    decide: str | None = "Approved",
    **spec: Any,
) -> tuple[str, str, dict[str, Any]]:
    """A run that scales Deployment web (created here) once an approver decides ``decide``
    (None: nobody decides): returns its uid, the ToolApproval's name and the run's final
    status."""
    bind_roles(kubectl, namespace, [("approver", "agentrun-approver")])
    let_default_account_scale(kubectl, namespace)
    kubectl("create", "deployment", "web", "--image=registry.invalid/web", "-n", namespace)
    scale = {"kind": "Deployment", "name": "web", "replicas": 2}
    goal = script.add(
        marker(name),
        [
            {"text": "Plan: scale web."},
            {"tool_calls": [{"name": "k8s_scale", "arguments": scale}]},
            {"text": "done."},
        ],
    )
    uid = create_run(kubectl, namespace, name, goal=goal, tools=["k8s_get", "k8s_scale"], **spec)
    st = wait_phase(kubectl, namespace, name, "AwaitingApproval", timeout=60)
    (approval,) = st["pendingApprovals"]
    if decide is not None:
        kubectl(
            "--as=approver", "patch", "ta", approval, "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"decision": decide}}),
        )  # fmt: skip
    final = ("Succeeded", "Failed", "Stopped")
    return uid, approval, wait_phase(kubectl, namespace, name, *final, timeout=60)


def newest_only(why: str) -> pytest.MarkDecorator:
    """Skip on the oldest Kubernetes (K8S_VERSION=1.20): a scenario that does not depend on
    the version runs on the newest only, to keep CI's time."""
    return pytest.mark.skipif(
        os.environ.get("K8S_VERSION", "").startswith("1.20"), reason=f"{why}: newest only"
    )
