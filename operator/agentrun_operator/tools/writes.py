"""The mutating tools (``k8s_scale``, ``k8s_rollout_restart``, ``k8s_delete_pod``,
``k8s_patch``, ``k8s_apply``), each stamping ``agentrun.dev/last-call-id`` on the object it
changes in the same request as the change (exactly-once; ``landing`` reads it back).

Never: acts with the operator's own identity, or retries a write whose answer was lost (that
is ``MaybeLanded``, which the dispatcher settles by reading the stamp).
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Awaitable
from typing import Any

from agentrun_operator import contract
from agentrun_operator import kube as kubeapi
from agentrun_operator.tools.arguments import (
    ApplyArgs,
    ArgumentError,
    DeletePodArgs,
    PatchArgs,
    RolloutRestartArgs,
    ScaleArgs,
)
from agentrun_operator.tools.reads import require_kind, resolve_kind
from agentrun_operator.tools.results import RESTARTED_AT, clean, merge, summarize, touches_data


class MaybeLanded(Exception):
    """A write whose answer was lost (no connection, server error): it may have landed."""

    def __init__(self, error: kubeapi.KubeError) -> None:
        super().__init__(str(error))
        self.error = error


async def write(call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await call
    except kubeapi.KubeError as e:
        if e.status == 0 or e.status >= 500:
            raise MaybeLanded(e) from e
        raise


def stamped(call_id: str, patch: dict[str, Any] | None = None) -> dict[str, Any]:
    return merge(patch or {}, {"metadata": {"annotations": {contract.LAST_CALL_ID: call_id}}})


async def _patch(
    kube: kubeapi.ServiceAccountKube,
    rt: kubeapi.ResourceType,
    name: str,
    namespace: str,
    patch: dict[str, Any] | list[Any],
    patch_type: kubeapi.PatchType = "merge",
) -> dict[str, Any]:
    """One patch request (the change and the stamp together), as a write."""
    return await write(
        kube.patch_object(
            kind=rt.plural,
            api_version=rt.api_version,
            name=name,
            namespace=namespace,
            patch=patch,
            patch_type=patch_type,
        )
    )


async def k8s_scale(kube: kubeapi.ServiceAccountKube, a: ScaleArgs, ns: str, call_id: str) -> Any:
    rt = await resolve_kind(kube, a.kind)
    require_kind(rt, ("Deployment", "StatefulSet", "ReplicaSet"), "k8s_scale")
    # spec.replicas on the object itself, not the scale subresource: one request carries
    # both the change and the stamp (so the account needs `patch` on the kind).
    obj = await _patch(kube, rt, a.name, ns, stamped(call_id, {"spec": {"replicas": a.replicas}}))
    return summarize(obj, kind=rt.kind)


async def k8s_rollout_restart(
    kube: kubeapi.ServiceAccountKube, a: RolloutRestartArgs, ns: str, call_id: str
) -> Any:
    rt = await resolve_kind(kube, a.kind)
    require_kind(rt, ("Deployment", "StatefulSet", "DaemonSet"), "k8s_rollout_restart")
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    template = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}}
    obj = await _patch(kube, rt, a.name, ns, stamped(call_id, template))
    result = summarize(obj, kind=rt.kind) | {"restartedAt": now}
    if (obj.get("spec") or {}).get("paused"):
        result["note"] = "the Deployment is paused: the restart rolls out when it is resumed"
    return result


async def k8s_delete_pod(
    kube: kubeapi.ServiceAccountKube, a: DeletePodArgs, ns: str, call_id: str
) -> Any:
    # Stamp first, then delete exactly the pod that carries the stamp (uid precondition),
    # so after a crash a terminating or vanished stamped pod tells that this call landed.
    pod = await write(
        kube.patch_object(
            kind="pods", api_version="v1", name=a.name, namespace=ns, patch=stamped(call_id)
        )
    )
    meta = pod.get("metadata") or {}
    await write(
        kube.delete_object(
            kind="pods", api_version="v1", name=a.name, namespace=ns, uid=meta.get("uid")
        )
    )
    result: dict[str, Any] = {"kind": "Pod", "name": a.name, "namespace": ns, "deleted": True}
    owners = [f"{o.get('kind')}/{o.get('name')}" for o in meta.get("ownerReferences") or []]
    if owners:
        result["note"] = f"owned by {', '.join(owners)}, which will likely replace it"
    return result


async def k8s_patch(kube: kubeapi.ServiceAccountKube, a: PatchArgs, ns: str, call_id: str) -> Any:
    rt = await resolve_kind(kube, a.kind)
    if rt.kind == "Secret" and rt.group == "" and isinstance(a.patch, list):
        # `copy`/`move` would carry a value out of data into fields that are shown (an
        # annotation), and `test` would confirm guesses: both defeat the redaction.
        for op in a.patch:
            source = op.get("from") if op.get("op") in ("copy", "move") else op.get("path")
            if op.get("op") in ("copy", "move", "test") and touches_data(source):
                raise ArgumentError(
                    "patch",
                    f"'{op.get('op')}' on a Secret's data is not allowed: it would reveal it",
                )
    if isinstance(a.patch, dict):
        patched = await _patch(kube, rt, a.name, ns, stamped(call_id, a.patch), a.patch_type)
        return clean(patched, rt)
    # JSON patch: one more operation adds the stamp, and how depends on whether the object
    # has annotations, so read it first. Adding the whole map is guarded by a test of
    # resourceVersion (it would otherwise wipe annotations added meanwhile); retry on a race.
    for attempt in range(3):
        current = await kube.get_object(
            kind=rt.plural, api_version=rt.api_version, name=a.name, namespace=ns
        )
        ops, guarded = json_patch_with_stamp(a.patch, current, call_id)
        try:
            patched = await _patch(kube, rt, a.name, ns, ops, "json")
            return clean(patched, rt)
        except kubeapi.KubeError as e:
            if not guarded or e.status not in (409, 422) or attempt == 2:
                raise
            again = await kube.get_object(
                kind=rt.plural, api_version=rt.api_version, name=a.name, namespace=ns
            )
            if _rv(again) == _rv(current):
                raise  # the user's operations failed, not the guard
    raise AssertionError("unreachable")


def _rv(obj: dict[str, Any]) -> Any:
    return (obj.get("metadata") or {}).get("resourceVersion")


def json_patch_with_stamp(
    ops: list[dict[str, Any]], current: dict[str, Any], call_id: str
) -> tuple[list[dict[str, Any]], bool]:
    """The user's RFC 6902 operations plus the stamp; True when a resourceVersion guard
    was needed (the map of annotations is added whole)."""
    has_map = isinstance((current.get("metadata") or {}).get("annotations"), dict)
    for op in ops:
        path, verb = op.get("path"), op.get("op")
        if path == "/metadata/annotations":
            has_map = verb != "remove"
        elif path == "/metadata" and verb in ("add", "replace"):
            has_map = isinstance((op.get("value") or {}).get("annotations"), dict)
    key = contract.LAST_CALL_ID.replace("~", "~0").replace("/", "~1")
    if has_map:
        return [
            *ops,
            {"op": "add", "path": f"/metadata/annotations/{key}", "value": call_id},
        ], False
    guard = {"op": "test", "path": "/metadata/resourceVersion", "value": _rv(current)}
    add = {"op": "add", "path": "/metadata/annotations", "value": {contract.LAST_CALL_ID: call_id}}
    return [guard, *ops, add], True


_SERVER_OWNED = (
    "managedFields",
    "resourceVersion",
    "uid",
    "creationTimestamp",
    "generation",
    "selfLink",
)


async def k8s_apply(kube: kubeapi.ServiceAccountKube, a: ApplyArgs, ns: str, call_id: str) -> Any:
    manifest = copy.deepcopy(a.manifest)
    assert isinstance(manifest, dict)  # the validator parsed it
    rt = await resolve_kind(kube, manifest["kind"], manifest["apiVersion"])
    # Fields the server owns would make the apply fail or act as stale preconditions when
    # the model applies back an object it read.
    manifest.pop("status", None)
    meta = manifest.setdefault("metadata", {})
    for field in _SERVER_OWNED:
        meta.pop(field, None)
    manifest = stamped(call_id, manifest)
    applied = await write(kube.apply_object(manifest=manifest, namespace=ns))
    return clean(applied, rt)
