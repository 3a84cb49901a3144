"""The k8s_* tools and the Kube client against a real kube-apiserver (1.20) with
kube-controller-manager running (Deployments get ReplicaSets and Pod objects; no kubelet,
so no pod ever runs).

Covers: kubectl-style kind lookup through discovery; impersonation (a run has exactly its
service account's rights, the account's groups come with it, the default account has none,
and `impersonate` on serviceaccounts is all the operator needs); each of the ten tools;
bad arguments and 403/404 as `failed` outcomes naming what to fix; Secret redaction in
every tool that can show one; result capping; the call-id stamp and `landed()` for every
mutating tool; server-side apply as field manager `agentrun` without forcing conflicts; a
write whose answer is lost; and the operator's own calls (AgentRun status, Events, delete,
reading the model key as the run's account).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import yaml

from agentrun_harness.controlplane import ControlPlane
from agentrun_operator import contract, tools
from agentrun_operator import kube as kubeapi

from support import Kubectl, create_run, wait_for

SECRET_VALUE = "hunter2-do-not-leak"
SECRET_B64 = base64.b64encode(SECRET_VALUE.encode()).decode()

# What the `agent` service account may do in its namespace in most tests.
AGENT_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": [""],
        "resources": ["pods", "configmaps", "secrets", "events", "pods/log"],
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    {
        "apiGroups": ["apps"],
        "resources": ["deployments", "statefulsets", "daemonsets", "replicasets"],
        "verbs": ["get", "list", "watch", "patch"],
    },
]


@pytest.fixture(scope="session")
async def kube(cluster: ControlPlane) -> AsyncIterator[kubeapi.Kube]:
    """The operator's client, as the admin user."""
    client = await kubeapi.Kube.from_kubeconfig(cluster.kubeconfig("admin"))
    yield client
    await client.close()


def new_call_id() -> str:
    return f"c-{uuid.uuid4().hex[:12]}"


def apply(kubectl: Kubectl, namespace: str, *docs: dict[str, Any]) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))


def get(kubectl: Kubectl, namespace: str, *what: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(kubectl("get", *what, "-n", namespace, "-o", "json").stdout)
    return found


def annotations_of(obj: dict[str, Any]) -> dict[str, str]:
    return obj["metadata"].get("annotations") or {}


def grant(kubectl: Kubectl, namespace: str, account: str, rules: list[dict[str, Any]]) -> None:
    """A ServiceAccount with a Role of ``rules``; returns once RBAC enforces it."""
    apply(
        kubectl,
        namespace,
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": account},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": account},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    )
    first = rules[0]
    verb, resource = first["verbs"][0], first["resources"][0]
    if first.get("resourceNames"):
        resource += "/" + first["resourceNames"][0]
    wait_for(
        f"RBAC to let {account} {verb} {resource}",
        lambda: (
            kubectl(
                "auth",
                "can-i",
                verb,
                resource,
                "-n",
                namespace,
                f"--as=system:serviceaccount:{namespace}:{account}",
                check=False,
            ).stdout.strip()
            == "yes"
        ),
    )


@pytest.fixture
def agent(kube: kubeapi.Kube, kubectl: Kubectl, namespace: str) -> kubeapi.ServiceAccountKube:
    grant(kubectl, namespace, "agent", AGENT_RULES)
    return kube.as_service_account(namespace=namespace, name="agent")


def pods_can_be_created(kubectl: Kubectl, namespace: str) -> None:
    # The ServiceAccount admission plugin refuses pods until `default` exists.
    wait_for(
        f"the default ServiceAccount in {namespace}",
        lambda: kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0,
    )


def pod(name: str, **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **metadata},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }


def deployment(kubectl: Kubectl, namespace: str, name: str = "web", replicas: int = 1) -> None:
    kubectl(
        "create", "deployment", name, "--image=nginx", f"--replicas={replicas}", "-n", namespace
    )


def configmap(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


async def call(
    sa: kubeapi.ServiceAccountKube,
    tool: str,
    namespace: str,
    /,
    *,
    call_id: str | None = None,
    max_bytes: int = 16384,
    **arguments: Any,
) -> tools.ToolOutcome:
    # Positional-only: a tool's own arguments include `name`.
    return await tools.run_tool(
        sa,
        name=tool,
        arguments=arguments,
        namespace=namespace,
        call_id=call_id or new_call_id(),
        max_bytes=max_bytes,
    )


async def succeeds(
    sa: kubeapi.ServiceAccountKube, tool: str, namespace: str, /, **arguments: Any
) -> Any:
    outcome = await call(sa, tool, namespace, **arguments)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.error is None
    return outcome.result


async def fails(
    sa: kubeapi.ServiceAccountKube, tool: str, namespace: str, /, **arguments: Any
) -> str:
    outcome = await call(sa, tool, namespace, **arguments)
    assert outcome.status == "failed", outcome
    assert outcome.error
    return outcome.error


# -- discovery -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "api_version", "expected"),
    [
        ("Deployment", None, ("apps/v1", "Deployment")),
        ("deployments", None, ("apps/v1", "Deployment")),
        ("deployment", None, ("apps/v1", "Deployment")),  # 1.20 serves no singularName
        ("DEPLOY", None, ("apps/v1", "Deployment")),
        ("deployments.apps", None, ("apps/v1", "Deployment")),
        ("deploy", "apps/v1", ("apps/v1", "Deployment")),
        ("po", None, ("v1", "Pod")),
        ("events", None, ("v1", "Event")),  # core first, as kubectl
        ("ar", None, ("agentrun.dev/v1alpha1", "AgentRun")),
        ("ToolApprovals", None, ("agentrun.dev/v1alpha1", "ToolApproval")),
        ("ns", None, ("v1", "Namespace")),
    ],
)
async def test_kinds_resolve_as_kubectl_resolves_them(
    kube: kubeapi.Kube, kind: str, api_version: str | None, expected: tuple[str, str]
) -> None:
    rt = await kube.resolve(kind=kind, api_version=api_version)
    assert (rt.api_version, rt.kind) == expected


async def test_an_unknown_kind_or_version_is_an_unknown_kind_error(kube: kubeapi.Kube) -> None:
    with pytest.raises(kubeapi.UnknownKindError, match="Deploymnt"):
        await kube.resolve(kind="Deploymnt")
    with pytest.raises(kubeapi.UnknownKindError, match="apps/v1beta7"):
        await kube.resolve(kind="Deployment", api_version="apps/v1beta7")


# -- impersonation ---------------------------------------------------------------------------


async def test_a_run_has_exactly_its_service_accounts_rights(
    kube: kubeapi.Kube, kubectl: Kubectl, namespace: str
) -> None:
    pods_can_be_created(kubectl, namespace)
    apply(kubectl, namespace, pod("p1"))
    grant(
        kubectl,
        namespace,
        "reader",
        [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
    )
    reader = kube.as_service_account(namespace=namespace, name="reader")
    assert kube.as_service_account(namespace=namespace, name="reader") is reader  # cached

    listed = await succeeds(reader, "k8s_list", namespace, kind="pods")
    assert [i["name"] for i in listed["items"]] == ["p1"]

    error = await fails(reader, "k8s_delete_pod", namespace, name="p1")
    assert "403" in error and "forbidden" in error.lower()
    assert f"system:serviceaccount:{namespace}:reader" in error
    assert get(kubectl, namespace, "pod", "p1")["metadata"]["name"] == "p1"  # still there

    error = await fails(reader, "k8s_get", namespace, kind="deploy", name="web")
    assert "403" in error and "forbidden" in error.lower()


async def test_the_default_service_account_has_no_rights(
    kube: kubeapi.Kube, kubectl: Kubectl, namespace: str
) -> None:
    default = kube.as_service_account(namespace=namespace, name=None)
    assert default.username == f"system:serviceaccount:{namespace}:default"
    for tool, arguments in (
        ("k8s_list", {"kind": "pods"}),
        ("k8s_get", {"kind": "cm", "name": "x"}),
        ("k8s_events", {}),
        ("k8s_apply", {"manifest": configmap("x")}),
    ):
        error = await fails(default, tool, namespace, **arguments)
        assert "Forbidden (403)" in error, error


async def test_the_operator_needs_only_impersonate_on_serviceaccounts(
    cluster: ControlPlane, kubectl: Kubectl, namespace: str
) -> None:
    """As `nobody` with nothing but that right, a run still gets its account's rights,
    including the groups the API server attaches to a service account."""
    grant(kubectl, namespace, "agent", AGENT_RULES)
    apply(
        kubectl,
        namespace,
        configmap("c1", a="1"),
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "impersonate-sa"},
            "rules": [
                {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["impersonate"]}
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "operator-impersonates"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "impersonate-sa",
            },
            "subjects": [{"kind": "User", "name": "nobody"}],
        },
        # Rights given to the namespace's service accounts as a group.
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "read-configmaps"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "all-accounts-read-configmaps"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "read-configmaps",
            },
            "subjects": [
                {
                    "kind": "Group",
                    "name": f"system:serviceaccounts:{namespace}",
                    "apiGroup": "rbac.authorization.k8s.io",
                }
            ],
        },
    )
    wait_for(
        "RBAC to let nobody impersonate",
        lambda: (
            kubectl.as_user("nobody")(
                "auth", "can-i", "impersonate", "serviceaccounts", "-n", namespace, check=False
            ).stdout.strip()
            == "yes"
        ),
    )
    operator = await kubeapi.Kube.from_kubeconfig(cluster.kubeconfig("nobody"))
    try:
        agent = operator.as_service_account(namespace=namespace, name="agent")
        await succeeds(agent, "k8s_list", namespace, kind="pods")
        # Any account of the namespace, through its group only.
        anyone = operator.as_service_account(namespace=namespace, name="someone-else")
        listed = await succeeds(anyone, "k8s_list", namespace, kind="configmaps")
        assert "c1" in [i["name"] for i in listed["items"]]
        error = await fails(anyone, "k8s_list", namespace, kind="pods")
        assert "403" in error
        # An account elsewhere: the operator may not impersonate it.
        outsider = operator.as_service_account(namespace="default", name="default")
        error = await fails(outsider, "k8s_list", "default", kind="configmaps")
        assert "403" in error and "impersonate" in error
    finally:
        await operator.close()


# -- read-only tools -------------------------------------------------------------------------


async def test_get_returns_the_object_without_managed_fields(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    deployment(kubectl, namespace)
    for kind, api_version in (
        ("deploy", None),
        ("Deployment", "apps/v1"),
        ("deployments.apps", None),
    ):
        arguments = {"kind": kind, "name": "web"} | (
            {"apiVersion": api_version} if api_version else {}
        )
        obj = await succeeds(agent, "k8s_get", namespace, **arguments)
        assert (obj["apiVersion"], obj["kind"]) == ("apps/v1", "Deployment")
        assert obj["metadata"]["name"] == "web" and obj["spec"]["replicas"] == 1
        assert "managedFields" not in obj["metadata"]
    # The namespace argument overrides the run's own.
    obj = await succeeds(
        agent, "k8s_get", "elsewhere", kind="deploy", name="web", namespace=namespace
    )
    assert obj["metadata"]["namespace"] == namespace


async def test_get_names_the_argument_when_nothing_is_found(
    agent: kubeapi.ServiceAccountKube, namespace: str
) -> None:
    error = await fails(agent, "k8s_get", namespace, kind="cm", name="missing")
    assert "NotFound (404)" in error and "'name'" in error
    error = await fails(agent, "k8s_get", namespace, kind="Deploymnt", name="web")
    assert "argument 'kind'" in error and "Deploymnt" in error


async def test_list_gives_a_compact_summary(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    pods_can_be_created(kubectl, namespace)
    deployment(kubectl, namespace, replicas=2)
    apply(kubectl, namespace, pod("lonely", labels={"app": "lonely"}))
    wait_for(
        "the Deployment's pods",
        lambda: len(get(kubectl, namespace, "pods", "-l", "app=web")["items"]) == 2,
    )
    listed = await succeeds(agent, "k8s_list", namespace, kind="po")
    assert listed["kind"] == "Pod" and listed["namespace"] == namespace
    assert listed["count"] == 3
    lonely = next(i for i in listed["items"] if i["name"] == "lonely")
    assert lonely["kind"] == "Pod" and lonely["namespace"] == namespace
    assert lonely["phase"] == "Pending" and lonely["ready"] == "0/1"
    assert "spec" not in lonely and "metadata" not in lonely

    selected = await succeeds(agent, "k8s_list", namespace, kind="pods", labelSelector="app=web")
    assert selected["count"] == 2
    selected = await succeeds(
        agent, "k8s_list", namespace, kind="pods", fieldSelector="metadata.name=lonely"
    )
    assert [i["name"] for i in selected["items"]] == ["lonely"]

    deployments = await succeeds(agent, "k8s_list", namespace, kind="deployments")
    assert deployments["items"][0]["replicas"] == 2

    error = await fails(agent, "k8s_list", namespace, kind="pods", fieldSelector="spec.color=red")
    assert "fieldSelector" in error and "400" in error


async def test_describe_gives_the_object_and_its_events(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    deployment(kubectl, namespace)
    wait_for(
        "the deployment controller's event",
        lambda: (
            "ScalingReplicaSet" in kubectl("get", "events", "-n", namespace, check=False).stdout
        ),
    )
    described = await succeeds(agent, "k8s_describe", namespace, kind="deployment", name="web")
    assert described["object"]["metadata"]["name"] == "web"
    assert "managedFields" not in described["object"]["metadata"]
    reasons = [e["reason"] for e in described["events"]]
    assert "ScalingReplicaSet" in reasons
    assert all(e["object"] == "Deployment/web" for e in described["events"])


async def test_events_filter_on_the_involved_object(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    pods_can_be_created(kubectl, namespace)
    deployment(kubectl, namespace)
    wait_for(
        "events from the deployment and replicaset controllers",
        lambda: (
            {"ScalingReplicaSet", "SuccessfulCreate"}
            <= {e["reason"] for e in get(kubectl, namespace, "events")["items"]}
        ),
    )
    everything = await succeeds(agent, "k8s_events", namespace)
    assert everything["count"] >= 2
    reasons = {e["reason"] for e in everything["events"]}
    assert {"ScalingReplicaSet", "SuccessfulCreate"} <= reasons

    only = await succeeds(agent, "k8s_events", namespace, kind="deploy", name="web")
    assert only["count"] >= 1
    assert {e["object"] for e in only["events"]} == {"Deployment/web"}
    none = await succeeds(agent, "k8s_events", namespace, kind="Deployment", name="other")
    assert none == {"namespace": namespace, "count": 0, "events": []}


async def test_logs_of_a_pod_no_node_runs_are_a_clear_error(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    pods_can_be_created(kubectl, namespace)
    apply(kubectl, namespace, pod("p1"))
    error = await fails(agent, "k8s_logs", namespace, pod="p1", tailLines=10)
    assert "not scheduled to a node" in error and "Pending" in error
    error = await fails(agent, "k8s_logs", namespace, pod="missing")
    assert "404" in error and "'pod'" in error


async def test_read_only_tools_never_write(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    apply(kubectl, namespace, configmap("c1", a="1"))
    before = get(kubectl, namespace, "cm", "c1")
    await succeeds(agent, "k8s_get", namespace, kind="cm", name="c1")
    await succeeds(agent, "k8s_list", namespace, kind="configmaps")
    await succeeds(agent, "k8s_describe", namespace, kind="ConfigMap", name="c1")
    await succeeds(agent, "k8s_events", namespace, kind="ConfigMap", name="c1")
    after = get(kubectl, namespace, "cm", "c1")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert contract.LAST_CALL_ID not in annotations_of(after)


# -- Secrets ---------------------------------------------------------------------------------


async def test_secret_data_never_leaves_any_tool(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    # kubectl apply also keeps a copy of the data in last-applied-configuration.
    apply(
        kubectl,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "db"},
            "stringData": {"password": SECRET_VALUE},
        },
    )
    assert tools.LAST_APPLIED in annotations_of(get(kubectl, namespace, "secret", "db"))

    def assert_clean(result: Any) -> None:
        text = json.dumps(result)
        assert SECRET_VALUE not in text and SECRET_B64 not in text, text

    got = await succeeds(agent, "k8s_get", namespace, kind="secret", name="db")
    assert got["data"] == {"password": tools.REDACTED}
    assert_clean(got)
    listed = await succeeds(agent, "k8s_list", namespace, kind="secrets")
    assert next(i for i in listed["items"] if i["name"] == "db")["keys"] == ["password"]
    assert_clean(listed)
    assert_clean(await succeeds(agent, "k8s_describe", namespace, kind="Secret", name="db"))
    patched = await succeeds(
        agent,
        "k8s_patch",
        namespace,
        kind="secrets",
        name="db",
        patch={"stringData": {"user": "admin"}},
    )
    assert set(patched["data"]) == {"password", "user"}
    assert_clean(patched)
    # A json patch could copy the value to an annotation, which is shown: refused.
    error = await fails(
        agent,
        "k8s_patch",
        namespace,
        kind="secret",
        name="db",
        patchType="json",
        patch=[{"op": "copy", "from": "/data/password", "path": "/metadata/annotations/x"}],
    )
    assert "argument 'patch'" in error
    assert "x" not in annotations_of(get(kubectl, namespace, "secret", "db"))
    applied = await succeeds(
        agent,
        "k8s_apply",
        namespace,
        manifest="apiVersion: v1\nkind: Secret\nmetadata:\n  name: api\n"
        f"stringData:\n  token: {SECRET_VALUE}\n",
    )
    assert applied["data"] == {"token": tools.REDACTED}
    assert_clean(applied)
    # The real value did land.
    data = get(kubectl, namespace, "secret", "api")["data"]
    assert base64.b64decode(data["token"]).decode() == SECRET_VALUE


# -- capping ---------------------------------------------------------------------------------


async def test_results_are_capped_and_say_so(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    apply(kubectl, namespace, configmap("big", blob="x" * 40_000))
    apply(kubectl, namespace, *(configmap(f"cm-{i:02}", a=str(i)) for i in range(30)))

    full = await call(agent, "k8s_get", namespace, kind="cm", name="big")
    assert full.status == "succeeded" and tools.size(full.result) <= 16384
    assert full.result["truncated"] is True

    small = await call(agent, "k8s_get", namespace, kind="cm", name="big", max_bytes=2000)
    assert small.status == "succeeded" and tools.size(small.result) <= 2000
    assert small.result["truncated"] is True and '"name": "big"' in small.result["json"]

    listed = await call(agent, "k8s_list", namespace, kind="configmaps", max_bytes=1500)
    assert listed.status == "succeeded" and tools.size(listed.result) <= 1500
    assert listed.result["truncated"] is True
    shown = len(listed.result["items"])
    # 31 made here, and kube-root-ca.crt once the controller-manager publishes it.
    assert listed.result["count"] >= 31 and 0 < shown < listed.result["count"]
    assert f"{shown} of {listed.result['count']}" in listed.result["note"]


# -- mutating tools: stamps and landed() -----------------------------------------------------


async def landed(
    sa: kubeapi.ServiceAccountKube, tool: str, namespace: str, call_id: str, /, **arguments: Any
) -> bool | None:
    return await tools.landed(
        sa, name=tool, arguments=arguments, namespace=namespace, call_id=call_id
    )


async def test_scale_sets_replicas_and_stamps_in_one_patch(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    pods_can_be_created(kubectl, namespace)
    deployment(kubectl, namespace)
    arguments: dict[str, Any] = {"kind": "deploy", "name": "web", "replicas": 3}
    call_id = new_call_id()
    assert await landed(agent, "k8s_scale", namespace, call_id, **arguments) is False

    outcome = await call(agent, "k8s_scale", namespace, call_id=call_id, **arguments)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.result["replicas"] == 3 and outcome.result["kind"] == "Deployment"
    obj = get(kubectl, namespace, "deploy", "web")
    assert obj["spec"]["replicas"] == 3
    assert annotations_of(obj)[contract.LAST_CALL_ID] == call_id
    wait_for(
        "three pods",
        lambda: len(get(kubectl, namespace, "pods", "-l", "app=web")["items"]) == 3,
    )

    assert await landed(agent, "k8s_scale", namespace, call_id, **arguments) is True
    assert await landed(agent, "k8s_scale", namespace, new_call_id(), **arguments) is False

    error = await fails(agent, "k8s_scale", namespace, kind="configmap", name="x", replicas=1)
    assert "argument 'kind'" in error and "ConfigMap" in error


async def test_rollout_restart_changes_the_template_and_stamps(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    deployment(kubectl, namespace)
    wait_for(
        "the first ReplicaSet",
        lambda: len(get(kubectl, namespace, "rs", "-l", "app=web")["items"]) == 1,
    )
    arguments: dict[str, Any] = {"kind": "Deployment", "name": "web"}
    call_id = new_call_id()
    assert await landed(agent, "k8s_rollout_restart", namespace, call_id, **arguments) is False
    result = await succeeds(agent, "k8s_rollout_restart", namespace, call_id=call_id, **arguments)
    obj = get(kubectl, namespace, "deploy", "web")
    template = obj["spec"]["template"]["metadata"]["annotations"]
    assert template[tools.RESTARTED_AT] == result["restartedAt"]
    assert annotations_of(obj)[contract.LAST_CALL_ID] == call_id
    wait_for(
        "a second ReplicaSet (the restart rolls out)",
        lambda: len(get(kubectl, namespace, "rs", "-l", "app=web")["items"]) == 2,
    )
    assert await landed(agent, "k8s_rollout_restart", namespace, call_id, **arguments) is True
    assert (
        await landed(agent, "k8s_rollout_restart", namespace, "c-000000000000", **arguments)
        is False
    )

    error = await fails(agent, "k8s_rollout_restart", namespace, kind="rs", name="web")
    assert "argument 'kind'" in error and "ReplicaSet" in error


@pytest.mark.parametrize(
    ("patch_type", "patch", "check"),
    [
        ("merge", {"data": {"b": "2"}}, lambda o: o["data"] == {"a": "1", "b": "2"}),
        (
            "json",
            [{"op": "replace", "path": "/data/a", "value": "9"}],
            lambda o: o["data"] == {"a": "9"},
        ),
    ],
    ids=["merge", "json"],
)
@pytest.mark.parametrize("annotated", [False, True], ids=["bare", "annotated"])
async def test_patch_applies_the_patch_and_stamps(
    agent: kubeapi.ServiceAccountKube,
    kubectl: Kubectl,
    namespace: str,
    patch_type: str,
    patch: Any,
    check: Callable[[dict[str, Any]], bool],
    annotated: bool,
) -> None:
    cm = configmap("c1", a="1")
    if annotated:
        cm["metadata"]["annotations"] = {"keep": "me"}
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(cm))
    arguments = {"kind": "cm", "name": "c1", "patch": patch, "patchType": patch_type}
    call_id = new_call_id()
    assert await landed(agent, "k8s_patch", namespace, call_id, **arguments) is False

    result = await succeeds(agent, "k8s_patch", namespace, call_id=call_id, **arguments)
    assert result["metadata"]["annotations"][contract.LAST_CALL_ID] == call_id
    obj = get(kubectl, namespace, "cm", "c1")
    assert check(obj), obj
    expected = {contract.LAST_CALL_ID: call_id} | ({"keep": "me"} if annotated else {})
    assert annotations_of(obj) == expected
    assert await landed(agent, "k8s_patch", namespace, call_id, **arguments) is True
    assert await landed(agent, "k8s_patch", namespace, new_call_id(), **arguments) is False


async def test_strategic_patch_merges_containers_by_name(
    kube: kubeapi.Kube, agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    deployment(kubectl, namespace)
    patch = {
        "spec": {"template": {"spec": {"containers": [{"name": "nginx", "image": "nginx:2"}]}}}
    }
    call_id = new_call_id()
    result = await succeeds(
        agent,
        "k8s_patch",
        namespace,
        call_id=call_id,
        kind="deployment",
        name="web",
        patch=patch,
        patchType="strategic",
    )
    assert result["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:2"
    assert (
        annotations_of(get(kubectl, namespace, "deploy", "web"))[contract.LAST_CALL_ID] == call_id
    )
    # Custom resources have no strategic merge: the error says what to use instead.
    create_run(kubectl, namespace, "r1", goal="look")
    grant(
        kubectl,
        namespace,
        "crs",
        [{"apiGroups": ["agentrun.dev"], "resources": ["agentruns"], "verbs": ["patch", "get"]}],
    )
    crs = kube.as_service_account(namespace=namespace, name="crs")
    error = await fails(
        crs,
        "k8s_patch",
        namespace,
        kind="ar",
        name="r1",
        patch={"spec": {"stop": True}},
        patchType="strategic",
    )
    assert "415" in error and "merge" in error


async def test_apply_uses_field_manager_agentrun_without_force(
    kube: kubeapi.Kube, agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    manifest = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\ndata:\n  a: '1'\n"
    call_id = new_call_id()
    assert await landed(agent, "k8s_apply", namespace, call_id, manifest=manifest) is False

    result = await succeeds(agent, "k8s_apply", namespace, call_id=call_id, manifest=manifest)
    assert result["data"] == {"a": "1"} and result["metadata"]["namespace"] == namespace
    assert "managedFields" not in result["metadata"]
    raw = await kube.as_service_account(namespace=namespace, name="agent").get_object(
        kind="cm", name="applied", namespace=namespace
    )
    managers = {(m["manager"], m["operation"]) for m in raw["metadata"]["managedFields"]}
    assert managers == {("agentrun", "Apply")}
    assert annotations_of(raw)[contract.LAST_CALL_ID] == call_id
    assert await landed(agent, "k8s_apply", namespace, call_id, manifest=manifest) is True
    assert await landed(agent, "k8s_apply", namespace, new_call_id(), manifest=manifest) is False

    # A field another manager owns is a conflict, never forced.
    kubectl("create", "configmap", "owned", "--from-literal=a=1", "-n", namespace)
    error = await fails(
        agent,
        "k8s_apply",
        namespace,
        manifest={
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "owned"},
            "data": {"a": "2"},
        },
    )
    assert "409" in error and "conflict" in error.lower()
    assert get(kubectl, namespace, "cm", "owned")["data"] == {"a": "1"}

    error = await fails(
        agent,
        "k8s_apply",
        namespace,
        manifest={"apiVersion": "v9", "kind": "Gizmo", "metadata": {"name": "g"}},
    )
    assert "argument 'kind'" in error and "Gizmo" in error


async def test_delete_pod_stamps_then_deletes_that_pod(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    pods_can_be_created(kubectl, namespace)
    apply(kubectl, namespace, pod("p1"), pod("held", finalizers=["example.com/hold"]))
    call_id = new_call_id()
    assert await landed(agent, "k8s_delete_pod", namespace, call_id, name="p1") is False

    result = await succeeds(agent, "k8s_delete_pod", namespace, call_id=call_id, name="p1")
    assert result["deleted"] is True
    wait_for(
        "p1 to be gone",
        lambda: kubectl("get", "pod", "p1", "-n", namespace, check=False).returncode != 0,
    )
    assert await landed(agent, "k8s_delete_pod", namespace, call_id, name="p1") is True

    # A finalizer keeps the pod terminating: the stamp on it tells the call landed.
    held_call = new_call_id()
    await succeeds(agent, "k8s_delete_pod", namespace, call_id=held_call, name="held")
    held = get(kubectl, namespace, "pod", "held")
    assert held["metadata"]["deletionTimestamp"]
    assert annotations_of(held)[contract.LAST_CALL_ID] == held_call
    assert await landed(agent, "k8s_delete_pod", namespace, held_call, name="held") is True
    assert await landed(agent, "k8s_delete_pod", namespace, new_call_id(), name="held") is False
    kubectl(
        "patch",
        "pod",
        "held",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"metadata":{"finalizers":null}}',
    )

    error = await fails(agent, "k8s_delete_pod", namespace, name="never-was")
    assert "404" in error


async def test_landed_cannot_tell_for_read_only_tools_or_bad_arguments(
    agent: kubeapi.ServiceAccountKube, namespace: str
) -> None:
    assert await landed(agent, "k8s_get", namespace, "c-1", kind="pod", name="x") is None
    assert await landed(agent, "k8s_scale", namespace, "c-1", kind="deploy") is None
    assert (
        await landed(agent, "k8s_scale", namespace, "c-1", kind="nope", name="x", replicas=1)
        is None
    )


async def test_a_write_whose_answer_is_lost_is_settled_by_its_stamp(
    kube: kubeapi.Kube, kubectl: Kubectl, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    grant(kubectl, namespace, "agent", AGENT_RULES)
    apply(kubectl, namespace, configmap("c1", a="1"))
    sa = kubeapi.ServiceAccountKube(kube, namespace=namespace, name="agent")
    real_patch = sa.patch_object
    lost = kubeapi.KubeError(0, "Unreachable", "connection reset")

    async def landed_then_lost(**kwargs: Any) -> dict[str, Any]:
        await real_patch(**kwargs)
        raise lost

    async def never_sent(**kwargs: Any) -> dict[str, Any]:
        raise lost

    arguments: dict[str, Any] = {"kind": "cm", "name": "c1", "patch": {"data": {"b": "2"}}}
    monkeypatch.setattr(sa, "patch_object", landed_then_lost)
    outcome = await call(sa, "k8s_patch", namespace, **arguments)
    assert outcome.status == "succeeded" and outcome.result["landed"] is True

    monkeypatch.setattr(sa, "patch_object", never_sent)
    outcome = await call(sa, "k8s_patch", namespace, **arguments)
    assert outcome.status == "failed" and "not made" in (outcome.error or "")

    async def unreachable(**kwargs: Any) -> dict[str, Any]:
        raise lost

    monkeypatch.setattr(sa, "get_object", unreachable)
    outcome = await call(sa, "k8s_patch", namespace, **arguments)
    assert outcome.status == "unknown" and "cannot be told" in (outcome.error or "")


# -- the operator's own calls ----------------------------------------------------------------


async def test_agentrun_status_events_and_delete(
    kube: kubeapi.Kube, kubectl: Kubectl, namespace: str
) -> None:
    assert await kube.get_agentrun(namespace=namespace, name="r1") is None
    create_run(kubectl, namespace, "r1", goal="look around")
    run = await kube.get_agentrun(namespace=namespace, name="r1")
    assert run is not None and run["spec"]["goal"] == "look around"

    patched = await kube.patch_agentrun_status(
        namespace=namespace, name="r1", status={"phase": "Running", "step": 1}
    )
    assert patched["status"]["phase"] == "Running"
    patched = await kube.patch_agentrun_status(namespace=namespace, name="r1", status={"step": 2})
    assert patched["status"] == {"phase": "Running", "step": 2}  # merged, not replaced
    assert patched["spec"] == run["spec"]

    await kube.post_event(involved=run, type="Normal", reason="Started", message="m" * 5000)
    events = get(kubectl, namespace, "events", "--field-selector", "involvedObject.name=r1")
    (event,) = events["items"]
    assert (event["type"], event["reason"]) == ("Normal", "Started")
    assert event["source"]["component"] == "agentrun-operator"
    assert event["involvedObject"]["uid"] == run["metadata"]["uid"]
    assert event["involvedObject"]["kind"] == "AgentRun"
    assert len(event["message"]) == 1024
    # Fully qualified: the CRDs' category "agentrun" shadows the singular name in kubectl.
    described = kubectl("describe", "agentruns.agentrun.dev", "r1", "-n", namespace).stdout
    assert "Started" in described

    # An Event that cannot be posted is logged, never raised.
    gone = {**run, "metadata": {**run["metadata"], "namespace": "no-such-namespace"}}
    await kube.post_event(involved=gone, type="Warning", reason="Oops", message="x")

    with pytest.raises(kubeapi.KubeError) as caught:
        await kube.patch_agentrun_status(namespace=namespace, name="nope", status={"step": 1})
    assert caught.value.status == 404

    await kube.delete_agentrun(namespace=namespace, name="r1")
    await kube.delete_agentrun(namespace=namespace, name="r1")  # already gone: fine
    assert await kube.get_agentrun(namespace=namespace, name="r1") is None


async def test_the_model_key_is_read_as_the_runs_service_account(
    kube: kubeapi.Kube, kubectl: Kubectl, namespace: str
) -> None:
    kubectl(
        "create",
        "secret",
        "generic",
        "llm",
        f"--from-literal=key={SECRET_VALUE}\n",
        "-n",
        namespace,
    )
    kubectl("create", "secret", "generic", "other", "--from-literal=key=x", "-n", namespace)
    grant(
        kubectl,
        namespace,
        "runner",
        [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["llm"]}],
    )
    runner = kube.as_service_account(namespace=namespace, name="runner")
    assert await runner.read_secret_key(name="llm", key="key") == SECRET_VALUE

    with pytest.raises(kubeapi.KubeError) as caught:
        await runner.read_secret_key(name="llm", key="nope")
    assert caught.value.status == 404 and "'nope'" in str(caught.value)
    assert f"Secret {namespace}/llm" in str(caught.value)
    assert SECRET_VALUE not in str(caught.value)

    with pytest.raises(kubeapi.KubeError) as caught:
        await runner.read_secret_key(name="other", key="key")
    assert caught.value.status == 403 and f"Secret {namespace}/other" in str(caught.value)

    nobody = kube.as_service_account(namespace=namespace, name=None)
    with pytest.raises(kubeapi.KubeError) as caught:
        await nobody.read_secret_key(name="llm", key="key")
    assert caught.value.status == 403 and SECRET_VALUE not in str(caught.value)


async def test_from_env_reads_kubeconfig(
    cluster: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig("viewer")))
    client = await kubeapi.Kube.from_env()
    try:
        rt = await client.resolve(kind="ar")
        assert rt.plural == "agentruns"
    finally:
        await client.close()
