"""Exactly-once after a crash: did a mutating call already take effect? Reads the stamp
``writes`` left on the object (for a pod deletion, whether the stamped pod is gone).

Never writes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from agentrun_operator import approvals, contract, models
from agentrun_operator import kube as kubeapi
from agentrun_operator.tools.arguments import (
    ApplyArgs,
    ArgumentError,
    DeletePodArgs,
    PatchArgs,
    RolloutRestartArgs,
    ScaleArgs,
    parse_arguments,
)
from agentrun_operator.tools.reads import resolve_kind
from agentrun_operator.tools.results import annotations_of


async def landed(
    kube: kubeapi.ServiceAccountKube,
    *,
    name: str,
    arguments: dict[str, Any],
    namespace: str,
    call_id: str,
    started_at: dt.datetime | None = None,
) -> bool | None:
    """After a crash: did this mutating call already take effect? True: yes (the object
    carries the call id; for k8s_delete_pod the stamped pod is terminating or gone);
    False: no, running it is safe; None: cannot be told (read-only tool, bad arguments, no
    right to read the object...). ``started_at`` (when the call began) tells a StatefulSet's
    replacement pod, which reuses the name, from the pod the call targeted."""
    if name not in models.MUTATING_TOOLS:
        return None
    try:
        args = parse_arguments(name, arguments)
        ns = getattr(args, "namespace", None) or namespace
        if isinstance(args, DeletePodArgs):
            return await _pod_deleted(kube, args.name, ns, call_id, started_at)
        if isinstance(args, ApplyArgs):
            assert isinstance(args.manifest, dict)
            meta = args.manifest.get("metadata") or {}
            kind, api_version = args.manifest["kind"], args.manifest["apiVersion"]
            target, ns = meta["name"], meta.get("namespace") or namespace
        else:
            assert isinstance(args, ScaleArgs | RolloutRestartArgs | PatchArgs)
            kind, api_version, target = args.kind, None, args.name
        rt = await resolve_kind(kube, kind, api_version)
        obj = await kube.get_object(
            kind=rt.plural, api_version=rt.api_version, name=target, namespace=ns
        )
    except kubeapi.KubeError as e:
        return False if e.status == 404 else None
    except (ArgumentError, KeyError):
        return None
    return annotations_of(obj).get(contract.LAST_CALL_ID) == call_id


async def _pod_deleted(
    kube: kubeapi.ServiceAccountKube,
    name: str,
    namespace: str,
    call_id: str,
    started_at: dt.datetime | None,
) -> bool | None:
    try:
        pod = await kube.get_object(kind="pods", api_version="v1", name=name, namespace=namespace)
    except kubeapi.KubeError as e:
        # Gone: whoever deleted it, repeating the call could only fail with "not found".
        return True if e.status == 404 else None
    meta = pod.get("metadata") or {}
    if annotations_of(pod).get(contract.LAST_CALL_ID) == call_id:
        return bool(meta.get("deletionTimestamp"))  # stamped but not deleted: safe to rerun
    created = approvals.parse_time(meta.get("creationTimestamp"))
    if started_at is not None and created is not None:
        return created >= started_at.replace(microsecond=0)  # a replacement came meanwhile
    owners = {o.get("kind") for o in meta.get("ownerReferences") or []}
    # Only a StatefulSet recreates a pod under the same name: then it cannot be told.
    return None if "StatefulSet" in owners else False
