"""The read-only tools (``k8s_get``, ``k8s_list``, ``k8s_describe``, ``k8s_logs``,
``k8s_events``) and the kind resolution every tool shares.

Never writes anything, and always acts as the run's service account.
"""

from __future__ import annotations

from typing import Any

from agentrun_operator import kube as kubeapi
from agentrun_operator.tools.arguments import (
    ArgumentError,
    DescribeArgs,
    EventsArgs,
    GetArgs,
    ListArgs,
    LogsArgs,
)
from agentrun_operator.tools.results import clean, compact_event, summarize

MAX_LIST = 500  # objects fetched per k8s_list; the summary of more would not fit anyway


MAX_DESCRIBE_EVENTS = 20


async def resolve_kind(
    kube: kubeapi.ServiceAccountKube, kind: str, api_version: str | None = None
) -> kubeapi.ResourceType:
    try:
        return await kube.resolve(kind=kind, api_version=api_version)
    except kubeapi.UnknownKindError as e:
        raise ArgumentError(
            "kind",
            f"{e.message}; give a Kind (Deployment), its plural (deployments) or a short "
            "name (deploy), and apiVersion for a kind outside the core and apps groups",
        ) from None


def require_kind(rt: kubeapi.ResourceType, kinds: tuple[str, ...], tool: str) -> None:
    if rt.group != "apps" or rt.kind not in kinds:
        raise ArgumentError("kind", f"{tool} works on {', '.join(kinds)}, not {rt.kind}")


async def k8s_get(kube: kubeapi.ServiceAccountKube, a: GetArgs, ns: str, _: str) -> Any:
    rt = await resolve_kind(kube, a.kind, a.api_version)
    obj = await kube.get_object(
        kind=rt.plural, api_version=rt.api_version, name=a.name, namespace=ns
    )
    return clean(obj, rt)


async def k8s_list(kube: kubeapi.ServiceAccountKube, a: ListArgs, ns: str, _: str) -> Any:
    rt = await resolve_kind(kube, a.kind, a.api_version)
    found = await kube.list_objects(
        kind=rt.plural,
        api_version=rt.api_version,
        namespace=ns if rt.namespaced else None,
        label_selector=a.label_selector,
        field_selector=a.field_selector,
        limit=MAX_LIST,
    )
    items = [summarize(i, kind=rt.kind) for i in found.get("items") or []]
    result: dict[str, Any] = {"kind": rt.kind, "apiVersion": rt.api_version}
    if rt.namespaced:
        result["namespace"] = ns
    result |= {"count": len(items), "items": items}
    if (found.get("metadata") or {}).get("continue"):
        result["more"] = f"over {MAX_LIST} match: narrow with labelSelector or fieldSelector"
    return result


async def k8s_describe(kube: kubeapi.ServiceAccountKube, a: DescribeArgs, ns: str, _: str) -> Any:
    rt = await resolve_kind(kube, a.kind)
    obj = await kube.get_object(
        kind=rt.plural, api_version=rt.api_version, name=a.name, namespace=ns
    )
    uid = (obj.get("metadata") or {}).get("uid")
    events: Any
    try:
        # Events about cluster-scoped objects (Nodes...) are recorded in "default".
        found = await kube.list_events(namespace=ns if rt.namespaced else "default", uid=uid)
        events = [compact_event(e) for e in found[-MAX_DESCRIBE_EVENTS:]]
    except kubeapi.KubeError as e:
        events = f"not available: {e.reason} ({e.status})"
    return {"object": clean(obj, rt), "events": events}


async def k8s_logs(kube: kubeapi.ServiceAccountKube, a: LogsArgs, ns: str, _: str) -> Any:
    text = await kube.pod_logs(
        name=a.pod,
        namespace=ns,
        container=a.container,
        tail_lines=a.tail_lines,
        previous=a.previous,
    )
    if not text:
        # The API server answers an empty 200, not an error, for a pod that no node runs
        # (1.20 does): say why there is nothing, so the model does not wait for lines.
        try:
            pod = await kube.get_object(kind="pods", api_version="v1", name=a.pod, namespace=ns)
        except kubeapi.KubeError:
            pod = {}
        if pod and not (pod.get("spec") or {}).get("nodeName"):
            phase = (pod.get("status") or {}).get("phase")
            raise kubeapi.KubeError(
                400,
                "NoLogs",
                f"pod {a.pod} has no logs: it is not scheduled to a node (phase {phase}), "
                "so no container has run; k8s_describe shows why",
            )
    return {"pod": a.pod, "namespace": ns, "container": a.container, "lines": text}


async def k8s_events(kube: kubeapi.ServiceAccountKube, a: EventsArgs, ns: str, _: str) -> Any:
    kind = (await resolve_kind(kube, a.kind)).kind if a.kind else None
    found = await kube.list_events(namespace=ns, kind=kind, name=a.name)
    return {"namespace": ns, "count": len(found), "events": [compact_event(e) for e in found]}
