"""Previews of mutating calls, by server-side dry run as the run's service account, against a
real kube-apiserver with kube-controller-manager (Deployments get ReplicaSets and Pods).

Covers: each of the five mutating tools previews what it would change (scale: replicas
before → after; restart: the template annotation; delete: the pod, its owner and whether
it is replaced; patch of a Secret: the key shown, the values redacted; apply of a new
object: created) and changes nothing; a dry run the API server refuses (RBAC, validation)
is a PreviewRefused naming why. (Through the operator: tests/integration/test_approvals.py.)
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
from integration.test_tools import (
    AGENT_RULES,
    SECRET_B64,
    SECRET_VALUE,
    apply,
    configmap,
    deployment,
    get,
    grant,
    new_call_id,
    pod,
    pods_can_be_created,
)

from agentrun_operator import contract, models, tools
from agentrun_operator import kube as kubeapi

from support import Kubectl, wait_for


@pytest.fixture
async def kube(cluster: Any) -> Any:
    client = await kubeapi.Kube.from_kubeconfig(cluster.kubeconfig("admin"))
    yield client
    await client.close()


@pytest.fixture
def agent(kube: kubeapi.Kube, kubectl: Kubectl, namespace: str) -> kubeapi.ServiceAccountKube:
    grant(kubectl, namespace, "agent", AGENT_RULES)
    return kube.as_service_account(namespace=namespace, name="agent")


async def preview(
    sa: kubeapi.ServiceAccountKube, tool: str, namespace: str, /, **arguments: Any
) -> models.Preview:
    found = await tools.preview(
        sa, name=tool, arguments=arguments, namespace=namespace, call_id=new_call_id()
    )
    assert found is not None
    return found


async def test_scale_previews_replicas_and_changes_nothing(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    deployment(kubectl, namespace)
    before = get(kubectl, namespace, "deploy", "web")
    p = await preview(agent, "k8s_scale", namespace, kind="deploy", name="web", replicas=3)
    assert p.operation == "update" and not p.approximate
    assert [(c.path, c.before, c.after) for c in p.changes] == [("spec.replicas", "1", "3")]
    assert p.summary == "spec.replicas 1→3"
    assert p.target is not None
    meta = before["metadata"]
    assert (p.target.kind, p.target.name, p.target.namespace) == ("Deployment", "web", namespace)
    assert (p.target.uid, p.target.generation) == (meta["uid"], meta["generation"])
    # (Its resourceVersion moves with the controller's status writes: only that it is one.)
    assert p.target.resource_version and int(p.target.resource_version) >= int(
        meta["resourceVersion"]
    )
    after = get(kubectl, namespace, "deploy", "web")
    # Nothing was written: no new generation, no stamp (the controller may write status).
    assert after["metadata"]["generation"] == meta["generation"], "a dry run wrote"
    assert contract.LAST_CALL_ID not in (after["metadata"].get("annotations") or {})
    assert after["spec"]["replicas"] == 1
    # Read-only tools have no preview.
    assert (
        await tools.preview(
            agent, name="k8s_get", arguments={"kind": "deploy"}, namespace=namespace, call_id="c"
        )
        is None
    )


async def test_restart_and_patch_preview_the_template_and_the_fields(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    deployment(kubectl, namespace)
    p = await preview(agent, "k8s_rollout_restart", namespace, kind="deployment", name="web")
    [change] = p.changes
    assert change.path.startswith("spec.template.metadata.annotations.")
    assert change.path.endswith("restartedAt") and change.before is None and change.after
    p = await preview(
        agent,
        "k8s_patch",
        namespace,
        kind="deployment",
        name="web",
        patch={"metadata": {"labels": {"tier": "web"}}, "spec": {"paused": True}},
    )
    paths = {c.path: (c.before, c.after) for c in p.changes}
    assert paths == {"metadata.labels.tier": (None, '"web"'), "spec.paused": (None, "true")}
    assert "(+1 more)" in p.summary


async def test_a_secret_patch_shows_the_key_never_the_value(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    apply(
        kubectl,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s"},
            "data": {"pw": SECRET_B64},
        },
    )
    p = await preview(
        agent, "k8s_patch", namespace, kind="secret", name="s", patch={"stringData": {"pw": "x"}}
    )
    text = p.model_dump_json()
    assert SECRET_VALUE not in text and SECRET_B64 not in text
    assert [(c.path, c.before, c.after) for c in p.changes] == [
        ("data.pw", tools.REDACTED, tools.REDACTED)
    ]


async def test_delete_previews_the_pod_its_owner_and_its_replacement(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    pods_can_be_created(kubectl, namespace)
    deployment(kubectl, namespace)
    apply(kubectl, namespace, pod("lonely"))
    wait_for(
        "a pod of the deployment",
        lambda: bool(get(kubectl, namespace, "pods", "-l", "app=web")["items"]),
    )
    owned = get(kubectl, namespace, "pods", "-l", "app=web")["items"][0]["metadata"]["name"]
    p = await preview(agent, "k8s_delete_pod", namespace, name=owned)
    assert p.operation == "delete" and p.replaced is True
    assert p.owner is not None and p.owner.startswith("ReplicaSet/web-")
    assert p.summary == f"delete pod {owned} ({p.owner} replaces it)"
    p = await preview(agent, "k8s_delete_pod", namespace, name="lonely")
    assert (p.owner, p.replaced, p.summary) == (None, False, "delete pod lonely")
    assert get(kubectl, namespace, "pod", "lonely")["metadata"].get("deletionTimestamp") is None


async def test_apply_of_a_new_object_previews_a_creation(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    p = await preview(agent, "k8s_apply", namespace, manifest=configmap("fresh", a="1"))
    assert (p.operation, p.summary) == ("create", "create configmap fresh")
    assert p.target is not None and p.target.uid is None
    assert ("data.a", None, '"1"') in [(c.path, c.before, c.after) for c in p.changes]
    missing = kubectl("get", "cm", "fresh", "-n", namespace, check=False)
    assert missing.returncode != 0, "a dry-run apply created the object"


async def test_a_dry_run_the_api_server_refuses_is_refused_naming_why(
    kube: kubeapi.Kube, agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    deployment(kubectl, namespace)
    # RBAC: the default account may not patch deployments.
    nobody = kube.as_service_account(namespace=namespace, name="default")
    with pytest.raises(tools.PreviewRefused, match="forbidden"):
        await preview(nobody, "k8s_scale", namespace, kind="deploy", name="web", replicas=2)
    # Validation: the server refuses the patched object.
    with pytest.raises(tools.PreviewRefused, match=r"refused a dry run.*spec\.replicas"):
        await preview(
            agent,
            "k8s_patch",
            namespace,
            kind="deploy",
            name="web",
            patch={"spec": {"replicas": -1}},
        )


# -- bound execution: the write goes only to the version people approved -------------------


RUNNERS: list[kubeapi.BoundKube] = []  # the last bound_call's runner is RUNNERS[-1]


async def bound_call(
    agent: kubeapi.ServiceAccountKube,
    tool: str,
    namespace: str,
    target: models.PreviewTarget,
    between: Any = None,
    /,
    **arguments: Any,
) -> tools.ToolOutcome:
    """The call as the operator runs an approved one: checked against ``target``, then
    written bound to the version the check read (``between`` runs in the gap)."""
    shown = target.model_dump(by_alias=True, exclude_none=True)

    async def check() -> tools.Bound:
        return await tools.check_bound(
            agent, name=tool, arguments=arguments, namespace=namespace, target=shown
        )

    bound = await check()
    assert bound.why is None and bound.path is not None, bound

    async def fresh() -> str | None:
        again = await check()
        return None if again.why else again.resource_version

    runner = agent.bound(
        path=bound.path, uid=bound.uid, resource_version=bound.resource_version, fresh=fresh
    )
    RUNNERS.append(runner)
    if between is not None:
        done = between()
        if inspect.isawaitable(done):
            await done
    return await tools.run_tool(
        runner,
        name=tool,
        arguments=arguments,
        namespace=namespace,
        call_id=new_call_id(),
        max_bytes=16384,
    )


async def test_a_bound_write_is_refused_when_the_object_changes_after_the_check(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    apply(kubectl, namespace, configmap("cfg", a="1"))
    p = await preview(
        agent, "k8s_patch", namespace, kind="ConfigMap", name="cfg", patch={"data": {"a": "2"}}
    )
    assert p.target is not None

    def edit() -> None:
        kubectl("patch", "cm", "cfg", "-n", namespace, "--type=merge", "-p", '{"data":{"b":"x"}}')

    outcome = await bound_call(
        agent,
        "k8s_patch",
        namespace,
        p.target,
        edit,
        kind="ConfigMap",
        name="cfg",
        patch={"data": {"a": "2"}},
    )
    assert outcome.status == "failed" and outcome.error is not None
    assert "409" in outcome.error or "modified" in outcome.error, outcome.error
    assert get(kubectl, namespace, "cm", "cfg")["data"] == {"a": "1", "b": "x"}, "it did not land"
    assert RUNNERS[-1].changed, "the refusal says the object changed (the approval is Stale)"
    # A JSON patch is bound too (test operations ahead of it).
    p = await preview(
        agent,
        "k8s_patch",
        namespace,
        kind="ConfigMap",
        name="cfg",
        patch=[{"op": "replace", "path": "/data/a", "value": "3"}],
        patchType="json",
    )
    assert p.target is not None

    def edit_again() -> None:
        kubectl("patch", "cm", "cfg", "-n", namespace, "--type=merge", "-p", '{"data":{"c":"y"}}')

    outcome = await bound_call(
        agent,
        "k8s_patch",
        namespace,
        p.target,
        edit_again,
        kind="ConfigMap",
        name="cfg",
        patch=[{"op": "replace", "path": "/data/a", "value": "3"}],
        patchType="json",
    )
    assert outcome.status == "failed", outcome
    assert get(kubectl, namespace, "cm", "cfg")["data"]["a"] == "1"


async def test_status_churn_between_check_and_write_does_not_refuse_it(
    kube: kubeapi.Kube, agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    deployment(kubectl, namespace)
    p = await preview(agent, "k8s_scale", namespace, kind="deploy", name="web", replicas=3)
    assert p.target is not None
    rt = await kube.resolve(kind="deployments", api_version="apps/v1")

    async def status_write() -> None:
        # What a controller does all day: a status write moves resourceVersion only.
        before = get(kubectl, namespace, "deploy", "web")["metadata"]["resourceVersion"]
        await kube.request(
            "PATCH",
            rt.path(namespace=namespace, name="web", subresource="status"),
            body={"status": {"conditions": [{"type": "Churn", "status": "True"}]}},
            content_type="application/merge-patch+json",
        )
        after = get(kubectl, namespace, "deploy", "web")["metadata"]
        assert after["resourceVersion"] != before and after["generation"] == 1

    outcome = await bound_call(
        agent, "k8s_scale", namespace, p.target, status_write, kind="deploy", name="web", replicas=3
    )
    assert outcome.status == "succeeded", outcome.error
    assert get(kubectl, namespace, "deploy", "web")["spec"]["replicas"] == 3
    assert not RUNNERS[-1].changed, "a status write is not a change"


async def test_an_approved_create_never_overwrites_an_object_that_appeared_meanwhile(
    agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    p = await preview(agent, "k8s_apply", namespace, manifest=configmap("new", a="1"))
    assert p.target is not None and p.target.uid is None

    def someone_creates() -> None:
        apply(kubectl, namespace, configmap("new", theirs="x"))

    outcome = await bound_call(
        agent, "k8s_apply", namespace, p.target, someone_creates, manifest=configmap("new", a="1")
    )
    assert outcome.status == "failed" and "already exists" in (outcome.error or ""), outcome
    assert get(kubectl, namespace, "cm", "new")["data"] == {"theirs": "x"}
    assert RUNNERS[-1].changed, "AlreadyExists: it changed after the approval"
    p = await preview(agent, "k8s_apply", namespace, manifest=configmap("newer", a="1"))
    assert p.target is not None
    outcome = await bound_call(
        agent, "k8s_apply", namespace, p.target, manifest=configmap("newer", a="1")
    )
    assert outcome.status == "succeeded", outcome.error
    assert get(kubectl, namespace, "cm", "newer")["data"] == {"a": "1"}


async def test_a_webhook_without_dry_run_support_gives_an_approximate_preview(
    cluster: Any, agent: kubeapi.ServiceAccountKube, kubectl: Kubectl, namespace: str
) -> None:
    # Only admissionregistration v1beta1 (gone in 1.22) can declare side effects on dry run;
    # such a webhook makes the API server refuse every dry run it matches.
    if cluster.version() >= (1, 22):
        pytest.skip("webhooks with side effects on dry run cannot be registered since 1.22")
    kubectl("label", "namespace", namespace, "agentrun-test/side-effects=on")
    name = f"side-effects-{namespace}"
    hook = {
        "apiVersion": "admissionregistration.k8s.io/v1beta1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "side-effects.agentrun.test",
                "clientConfig": {"url": "https://127.0.0.1:1/validate"},
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["UPDATE"],
                        "resources": ["configmaps"],
                    }
                ],
                "sideEffects": "Unknown",
                "failurePolicy": "Ignore",
                "namespaceSelector": {"matchLabels": {"agentrun-test/side-effects": "on"}},
                "admissionReviewVersions": ["v1beta1"],
            }
        ],
    }
    apply(kubectl, namespace, configmap("cfg", a="1"))
    kubectl("apply", "-f", "-", input=json.dumps(hook))
    try:
        p = await preview(
            agent, "k8s_patch", namespace, kind="ConfigMap", name="cfg", patch={"data": {"a": "2"}}
        )
        assert p.approximate, p
        assert [(c.path, c.before, c.after) for c in p.changes] == [("data.a", '"1"', '"2"')]
        assert get(kubectl, namespace, "cm", "cfg")["data"] == {"a": "1"}
    finally:
        kubectl("delete", "validatingwebhookconfiguration", name, check=False)
