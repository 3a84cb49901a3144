"""What a mutating call would change, before anyone is asked: the call runs as a server-side
dry run (``dryRun=All``) as the run's service account, and its answer is compared with the
object as it is now.

Owns the preview (``models.Preview``): the target's identity and version, the changed fields
(``before`` → ``after``, capped, Secret values redacted), a one-line summary for people, and
``PreviewRefused``, raised when the API server refuses the dry run (RBAC, validation,
admission): the call then fails as a tool error and no person is asked.
Never: persists anything (every write goes through ``kube.DryRunKube``), or shows a Secret's
value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agentrun_operator import contract, models
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
from agentrun_operator.tools.catalog import TOOLS, explain_kube
from agentrun_operator.tools.reads import resolve_kind
from agentrun_operator.tools.results import LAST_APPLIED, REDACTED, is_secret
from agentrun_operator.tools.writes import MaybeLanded

# Fields that change on every write, or that only the server owns: not what people decide.
_SERVER_META = ("labels", "annotations")
_NOISE_ANNOTATIONS = (contract.LAST_CALL_ID, LAST_APPLIED)
# Controllers that create a replacement when one of their pods is deleted.
_REPLACING = ("ReplicaSet", "StatefulSet", "DaemonSet", "Job", "ReplicationController")


class PreviewRefused(Exception):
    """The API server refused the dry run; ``message`` says why, as the model sees it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def preview(
    kube: kubeapi.ServiceAccountKube,
    *,
    name: str,
    arguments: dict[str, Any],
    namespace: str,
    call_id: str,
) -> models.Preview | None:
    """The preview of one call (None for a read-only tool). Raises PreviewRefused when the
    API server refuses it, and KubeError(0) when it cannot be reached."""
    if name not in models.MUTATING_TOOLS:
        return None
    try:
        args = parse_arguments(name, arguments)
        rt, target, ns = await _target(kube, args, namespace)
    except ArgumentError as e:
        raise PreviewRefused(f"{name}: {e}") from None
    except kubeapi.KubeError as e:
        if e.transient:
            raise
        raise PreviewRefused(f"{name}: {e}") from None
    before = await _get(kube, rt, target, ns, tool=name)
    dry = kube.dry_run()
    approximate = False
    try:
        await TOOLS[name].run(dry, args, getattr(args, "namespace", None) or namespace, call_id)
    except MaybeLanded as lost:
        if lost.error.transient:
            raise lost.error from None  # the API server is away: the gate waits for it
        raise _refused(name, explain_kube(kube, TOOLS[name], lost.error)) from None
    except ArgumentError as e:
        raise PreviewRefused(f"{name}: {e}") from None
    except kubeapi.KubeError as e:
        if e.transient:
            raise
        if not _no_dry_run_support(e):
            raise _refused(name, explain_kube(kube, TOOLS[name], e)) from None
        approximate = True
    written = [obj for method, obj in dry.written if method != "DELETE"]
    if isinstance(args, DeletePodArgs):
        return _deletion(rt, before, target, ns, approximate=approximate)
    after = written[-1] if written and not approximate else None
    if approximate:
        after = _locally(args, before)
    return _update(rt, before, after, target, ns, approximate=approximate)


async def _target(
    kube: kubeapi.ServiceAccountKube, args: Any, namespace: str
) -> tuple[kubeapi.ResourceType, str, str]:
    ns = getattr(args, "namespace", None) or namespace
    if isinstance(args, DeletePodArgs):
        return await resolve_kind(kube, "pods", "v1"), args.name, ns
    if isinstance(args, ApplyArgs):
        assert isinstance(args.manifest, dict)  # the validator parsed it
        meta = args.manifest.get("metadata") or {}
        rt = await resolve_kind(kube, args.manifest["kind"], args.manifest["apiVersion"])
        return rt, str(meta.get("name", "")), str(meta.get("namespace") or namespace)
    assert isinstance(args, ScaleArgs | RolloutRestartArgs | PatchArgs)
    return await resolve_kind(kube, args.kind), args.name, ns


async def _get(
    kube: kubeapi.ServiceAccountKube,
    rt: kubeapi.ResourceType,
    name: str,
    namespace: str,
    *,
    tool: str,
) -> dict[str, Any] | None:
    try:
        return await kube.get_object(
            kind=rt.plural, api_version=rt.api_version, name=name, namespace=namespace
        )
    except kubeapi.KubeError as e:
        if e.status == 404:
            return None
        if e.transient:
            raise
        raise _refused(
            tool, f"cannot read {rt.kind} {namespace}/{name} as {kube.username}: {e.message}"
        ) from None


def _refused(tool: str, why: str) -> PreviewRefused:
    return PreviewRefused(f"{tool}: the API server refused a dry run of this call: {why}")


def _no_dry_run_support(e: kubeapi.KubeError) -> bool:
    """A third-party admission webhook with side effects refused the dry run (the API server
    answers 400 and names it); the call itself may still be fine."""
    return e.status == 400 and "does not support dry run" in e.message


def _locally(args: Any, before: dict[str, Any] | None) -> dict[str, Any] | None:
    """The object after a merge patch or scale, computed here (approximate previews)."""
    if before is None:
        return None
    if isinstance(args, ScaleArgs):
        return _merged(before, {"spec": {"replicas": args.replicas}})
    if isinstance(args, PatchArgs) and args.patch_type == "merge" and isinstance(args.patch, dict):
        return _merged(before, args.patch)
    return None  # strategic, JSON patch, apply: only the server knows


def _merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _identity(
    rt: kubeapi.ResourceType, obj: dict[str, Any] | None, name: str, namespace: str
) -> models.PreviewTarget:
    meta = (obj or {}).get("metadata") or {}
    generation = meta.get("generation")
    return models.PreviewTarget(
        api_version=rt.api_version,
        kind=rt.kind,
        namespace=namespace if rt.namespaced else None,
        name=name,
        uid=meta.get("uid"),
        resource_version=meta.get("resourceVersion"),
        generation=int(generation) if generation is not None else None,
        labels={str(k): str(v)[:63] for k, v in list((meta.get("labels") or {}).items())[:32]},
    )


def _deletion(
    rt: kubeapi.ResourceType,
    before: dict[str, Any] | None,
    name: str,
    namespace: str,
    *,
    approximate: bool,
) -> models.Preview:
    meta = (before or {}).get("metadata") or {}
    controller = next(
        (o for o in meta.get("ownerReferences") or [] if o.get("controller")),
        None,
    )
    owner = f"{controller.get('kind')}/{controller.get('name')}" if controller else None
    replaced = bool(controller and controller.get("kind") in _REPLACING)
    summary = f"delete {rt.kind.lower()} {name}"
    if owner:
        summary += f" ({owner} {'replaces it' if replaced else 'owns it'})"
    return models.Preview(
        summary=summary,
        target=_identity(rt, before, name, namespace),
        operation="delete",
        owner=owner,
        replaced=replaced,
        approximate=approximate,
    )


def _update(
    rt: kubeapi.ResourceType,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    name: str,
    namespace: str,
    *,
    approximate: bool,
) -> models.Preview:
    secret = is_secret(before or after or {}) or (rt.kind == "Secret" and rt.group == "")
    unknown = approximate and after is None  # only the server could have told
    changed = [] if unknown else _changes(_comparable(before), _comparable(after), secret=secret)
    shown = changed[: models.MAX_PREVIEW_CHANGES]
    if before is None:
        operation = "create"
        summary = f"create {rt.kind.lower()} {name}"
    else:
        operation = "update"
        if not changed:
            summary = "unknown (approximate)" if unknown else "no change"
        else:
            first = changed[0]
            summary = f"{first.path} {first.before or '∅'}→{first.after or '∅'}"
            if len(changed) > 1:
                summary += f" (+{len(changed) - 1} more)"
    return models.Preview(
        summary=_cap(summary, 300),
        target=_identity(rt, before, name, namespace),
        changes=shown,
        more_changes=len(changed) - len(shown),
        operation=operation,
        approximate=approximate,
    ).with_every_change(changed)


def _comparable(obj: dict[str, Any] | None) -> dict[str, Any]:
    """The fields people decide about: everything but status and server-owned metadata."""
    if obj is None:
        return {}
    out = {k: v for k, v in obj.items() if k not in ("status", "metadata", "apiVersion", "kind")}
    meta = obj.get("metadata") or {}
    kept = {k: meta[k] for k in _SERVER_META if isinstance(meta.get(k), dict)}
    if "annotations" in kept:
        kept["annotations"] = {
            k: v for k, v in kept["annotations"].items() if k not in _NOISE_ANNOTATIONS
        }
    if any(kept.values()):
        out["metadata"] = {k: v for k, v in kept.items() if v}
    return out


def _changes(
    before: Any, after: Any, *, secret: bool, path: str = ""
) -> list[models.PreviewChange]:
    is_map = isinstance(before, dict), isinstance(after, dict)
    if any(is_map) and all(m or v is _ABSENT for m, v in zip(is_map, (before, after), strict=True)):
        # A map on either side (absent on the other: created or removed whole): its leaves.
        before = before if is_map[0] else {}
        after = after if is_map[1] else {}
        found: list[models.PreviewChange] = []
        for key in sorted(set(before) | set(after), key=str):
            sub = f"{path}.{key}" if path else str(key)
            found += _changes(
                before.get(key, _ABSENT), after.get(key, _ABSENT), secret=secret, path=sub
            )
        return found
    if (
        isinstance(before, list)
        and isinstance(after, list)
        and len(before) == len(after)
        and before != after
    ):
        found = []
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            found += _changes(b, a, secret=secret, path=f"{path}[{i}]")
        return found
    if before == after:
        return []
    hidden = secret and path.split(".", 1)[0] in ("data", "stringData")
    return [
        models.PreviewChange(
            path=_cap(path, 1024),
            before=_shown(before, hidden),
            after=_shown(after, hidden),
        )
    ]


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT: Any = _Absent()


def _shown(value: Any, hidden: bool) -> str | None:
    if value is _ABSENT:
        return None
    if hidden:
        return REDACTED
    return _cap(json.dumps(value, default=str, ensure_ascii=False), models.MAX_PREVIEW_VALUE)


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Bound:
    """What an approved call may still change: ``why`` it may not (its object changed since
    its preview), else the version to bind its write to (``path`` None: nothing to bind)."""

    why: str | None = None
    path: str | None = None
    uid: str | None = None
    resource_version: str | None = None


async def changed_since(
    kube: kubeapi.ServiceAccountKube,
    *,
    name: str,
    arguments: dict[str, Any],
    namespace: str,
    target: dict[str, Any],
) -> str | None:
    """How the object an approved call targets changed since people approved it, or None."""
    found = await check_bound(
        kube, name=name, arguments=arguments, namespace=namespace, target=target
    )
    return found.why


async def check_bound(
    kube: kubeapi.ServiceAccountKube,
    *,
    name: str,
    arguments: dict[str, Any],
    namespace: str,
    target: dict[str, Any],
) -> Bound:
    """Whether the object an approved call targets is still the version people approved
    (``target`` is its preview's target), read now as the run's account. Status churn does
    not count: objects with a generation compare it (a Deployment's status or a
    crash-looping pod does not bump it), others their resourceVersion, a pod deletion only
    the pod's uid, and a new object only that it still does not exist. When it holds, the
    write is bound to the version just read (its uid and resourceVersion)."""
    try:
        args = parse_arguments(name, arguments)
    except ArgumentError:
        return Bound()  # the call itself fails on them: nothing runs
    try:
        rt, target_name, ns = await _target(kube, args, namespace)
        now = await _get(kube, rt, target_name, ns, tool=name)
    except kubeapi.KubeError as e:
        if e.transient:
            raise  # the API server is away: the run waits for it, and checks again
        return Bound(f"its object could not be checked against the approval ({e.message})")
    except PreviewRefused as e:
        # Fail closed: what cannot be compared with what people approved does not run.
        return Bound(f"its object could not be checked against the approval ({e.message})")
    meta = (now or {}).get("metadata") or {}
    what = f"{rt.kind} {ns}/{target_name}" if rt.namespaced else f"{rt.kind} {target_name}"
    path = rt.path(namespace=ns, name=target_name)
    if not target.get("uid"):
        if now is not None:
            return Bound(f"{what} was created after the approval")
        return Bound(path=path)  # a create: AlreadyExists if it appears meanwhile
    if now is None:
        return Bound(f"{what} was deleted after the approval")
    if meta.get("uid") != target["uid"]:
        return Bound(f"{what} was replaced after the approval (another uid)")
    bound = Bound(path=path, uid=meta.get("uid"), resource_version=meta.get("resourceVersion"))
    if isinstance(args, DeletePodArgs):
        bound.resource_version = None  # its status churns: the uid only
        return bound
    if target.get("generation") is not None:
        if meta.get("generation") != target["generation"]:
            return Bound(
                f"{what} changed after the approval (generation {target['generation']} → "
                f"{meta.get('generation')})"
            )
        return bound
    if meta.get("resourceVersion") != target.get("resourceVersion"):
        return Bound(f"{what} changed after the approval (resourceVersion)")
    return bound
