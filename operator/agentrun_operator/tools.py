"""The ``k8s_*`` tools the agent calls, executed as the run's service account.

Owns: each tool's arguments (a pydantic model per tool, which is also the JSON Schema the
model sees), running a call through :class:`kube.ServiceAccountKube`, the compact result
forms, redaction of Secret data, the size cap, and exactly-once support for mutating tools:
each stamps ``agentrun.dev/last-call-id`` on the object it changes in the same request as
the change, and :func:`landed` reads the stamp back after a crash.

Never: raises for anything the model or the cluster did (bad arguments, unknown kinds,
403/404...): those are ``failed`` outcomes whose message names the argument to fix; lets a
Secret's ``data``/``stringData`` out; writes anything from a read-only tool; acts with the
operator's own identity.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from agentrun_operator import approvals, models
from agentrun_operator import kube as kubeapi

logger = logging.getLogger(__name__)

STAMP = "agentrun.dev/last-call-id"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
REDACTED = "<redacted>"
MAX_LIST = 500  # objects fetched per k8s_list; the summary of more would not fit anyway
MAX_DESCRIBE_EVENTS = 20

Status = Literal["succeeded", "failed", "unknown"]


@dataclass
class ToolOutcome:
    status: Status
    result: Any = None  # JSON-able, redacted and capped
    error: str | None = None


class ArgumentError(Exception):
    """An argument the model gave is wrong; the message names it."""

    def __init__(self, argument: str, detail: str, *, message: str | None = None) -> None:
        super().__init__(message or f"argument '{argument}': {detail}")
        self.argument = argument


# -- arguments ------------------------------------------------------------------------------

_NS_HELP = "Namespace. Default: the run's own namespace. Ignored for cluster-scoped kinds."
_KIND_HELP = (
    "Resource kind as kubectl accepts it: Kind (Deployment), plural (deployments), "
    "singular or short name (deploy), case-insensitive; 'deployments.apps' names the group."
)


def _not_dots(value: str) -> str:
    # "." and ".." are path segments, not names: they would address another URL.
    if value in (".", ".."):
        raise ValueError("is not a valid name")
    return value


Kind = Annotated[str, Field(min_length=1, max_length=253, description=_KIND_HELP)]
Name = Annotated[
    str,
    Field(
        min_length=1,
        max_length=253,
        pattern=r"^[^/%\s]+$",
        description="Object name.",
    ),
    AfterValidator(_not_dots),
]
Namespace = Annotated[
    str | None,
    Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description=_NS_HELP,
    ),
]
ApiVersion = Annotated[
    str | None,
    Field(
        default=None,
        max_length=253,
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?v[0-9]+((alpha|beta)[0-9]+)?$",
        description="Optional group/version (e.g. apps/v1) when a kind exists in several "
        "groups. Default: the server's preferred version.",
    ),
]


class _Args(BaseModel):
    # camelCase only (as the model sees them); anything else is an unknown argument.
    model_config = ConfigDict(alias_generator=to_camel, extra="forbid", str_strip_whitespace=True)


class GetArgs(_Args):
    kind: Kind
    name: Name
    namespace: Namespace = None
    api_version: ApiVersion = None


class ListArgs(_Args):
    kind: Kind
    namespace: Namespace = None
    label_selector: str | None = Field(
        default=None, max_length=1024, description="Label selector, e.g. 'app=web,tier!=db'."
    )
    field_selector: str | None = Field(
        default=None,
        max_length=1024,
        description="Field selector, e.g. 'status.phase=Running' (the fields each kind supports).",
    )
    api_version: ApiVersion = None


class DescribeArgs(_Args):
    kind: Kind
    name: Name
    namespace: Namespace = None


class LogsArgs(_Args):
    pod: Name = Field(description="Pod name.")
    namespace: Namespace = None
    container: str | None = Field(
        default=None, max_length=253, description="Container name; needed when the pod has several."
    )
    tail_lines: StrictInt = Field(
        default=200, ge=1, le=5000, description="How many of the most recent lines."
    )
    previous: StrictBool = Field(
        default=False, description="Logs of the previous (crashed) container instance."
    )


class EventsArgs(_Args):
    namespace: Namespace = None
    kind: Kind | None = Field(default=None, description="Only events about objects of this kind.")
    name: Name | None = Field(default=None, description="Only events about objects of this name.")


class ScaleArgs(_Args):
    kind: Kind = Field(description="Deployment, StatefulSet or ReplicaSet.")
    name: Name
    namespace: Namespace = None
    replicas: StrictInt = Field(ge=0, le=10000, description="The desired number of replicas.")


class RolloutRestartArgs(_Args):
    kind: Kind = Field(description="Deployment, StatefulSet or DaemonSet.")
    name: Name
    namespace: Namespace = None


class DeletePodArgs(_Args):
    name: Name = Field(description="Pod name.")
    namespace: Namespace = None


class PatchArgs(_Args):
    kind: Kind
    name: Name
    namespace: Namespace = None
    patch: dict[str, Any] | list[dict[str, Any]] = Field(
        description="The patch: an object for 'merge' and 'strategic', a list of "
        "RFC 6902 operations ({op, path, value}) for 'json'."
    )
    patch_type: Literal["merge", "strategic", "json"] = Field(
        default="merge",
        description="'merge' (JSON merge patch, default), 'strategic' (built-in kinds "
        "only; merges lists by key) or 'json' (RFC 6902).",
    )

    @field_validator("patch", mode="before")
    @classmethod
    def _parse_patch(cls, value: Any) -> Any:
        if isinstance(value, str):  # models sometimes send the JSON as a string
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("must be a JSON object or list, not a string") from None
        if not isinstance(value, dict | list):
            raise ValueError(f"must be an object or a list, not {type(value).__name__}")
        if isinstance(value, list) and not all(isinstance(op, dict) for op in value):
            raise ValueError("each operation of a json patch must be an object {op, path, value}")
        return value

    @model_validator(mode="after")
    def _patch_fits_type(self) -> PatchArgs:
        if self.patch_type == "json" and not isinstance(self.patch, list):
            raise ValueError("argument 'patch': patchType 'json' needs a list of operations")
        if self.patch_type != "json" and not isinstance(self.patch, dict):
            raise ValueError(f"argument 'patch': patchType '{self.patch_type}' needs an object")
        return self


class ApplyArgs(_Args):
    manifest: str | dict[str, Any] = Field(
        description="One object, YAML or JSON, with apiVersion, kind and metadata.name. "
        "metadata.namespace defaults to the run's own namespace."
    )

    @field_validator("manifest")
    @classmethod
    def _parse_manifest(cls, value: str | dict[str, Any]) -> dict[str, Any]:
        if isinstance(value, str):
            try:
                docs = [d for d in yaml.safe_load_all(value) if d is not None]
            except yaml.YAMLError as e:
                raise ValueError(f"not valid YAML or JSON: {e}") from None
            if len(docs) != 1:
                raise ValueError(f"must hold exactly one object, found {len(docs)}")
            value = docs[0]
        if not isinstance(value, dict):
            raise ValueError("must be one object (a mapping)")
        missing = [
            f
            for f, v in (
                ("apiVersion", value.get("apiVersion")),
                ("kind", value.get("kind")),
                ("metadata.name", (value.get("metadata") or {}).get("name")),
            )
            if not isinstance(v, str) or not v
        ]
        if missing:
            raise ValueError(f"needs {', '.join(missing)}")
        return value


# -- tool bodies ----------------------------------------------------------------------------

Runner = Callable[[kubeapi.ServiceAccountKube, Any, str, str], Awaitable[Any]]


@dataclass(frozen=True)
class _Tool:
    args: type[_Args]
    description: str
    run: Runner
    mutating: bool


async def _resolve(
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


def _only(rt: kubeapi.ResourceType, kinds: tuple[str, ...], tool: str) -> None:
    if rt.group != "apps" or rt.kind not in kinds:
        raise ArgumentError("kind", f"{tool} works on {', '.join(kinds)}, not {rt.kind}")


async def _get(kube: kubeapi.ServiceAccountKube, a: GetArgs, ns: str, _: str) -> Any:
    rt = await _resolve(kube, a.kind, a.api_version)
    obj = await kube.get_object(
        kind=rt.plural, api_version=rt.api_version, name=a.name, namespace=ns
    )
    return clean(obj, rt)


async def _list(kube: kubeapi.ServiceAccountKube, a: ListArgs, ns: str, _: str) -> Any:
    rt = await _resolve(kube, a.kind, a.api_version)
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


async def _describe(kube: kubeapi.ServiceAccountKube, a: DescribeArgs, ns: str, _: str) -> Any:
    rt = await _resolve(kube, a.kind)
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


async def _logs(kube: kubeapi.ServiceAccountKube, a: LogsArgs, ns: str, _: str) -> Any:
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


async def _events(kube: kubeapi.ServiceAccountKube, a: EventsArgs, ns: str, _: str) -> Any:
    kind = (await _resolve(kube, a.kind)).kind if a.kind else None
    found = await kube.list_events(namespace=ns, kind=kind, name=a.name)
    return {"namespace": ns, "count": len(found), "events": [compact_event(e) for e in found]}


class _MaybeLanded(Exception):
    """A write whose answer was lost (no connection, server error): it may have landed."""

    def __init__(self, error: kubeapi.KubeError) -> None:
        super().__init__(str(error))
        self.error = error


async def _write(call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await call
    except kubeapi.KubeError as e:
        if e.status == 0 or e.status >= 500:
            raise _MaybeLanded(e) from e
        raise


def _stamped(call_id: str, patch: dict[str, Any] | None = None) -> dict[str, Any]:
    return merge(patch or {}, {"metadata": {"annotations": {STAMP: call_id}}})


async def _scale(kube: kubeapi.ServiceAccountKube, a: ScaleArgs, ns: str, call_id: str) -> Any:
    rt = await _resolve(kube, a.kind)
    _only(rt, ("Deployment", "StatefulSet", "ReplicaSet"), "k8s_scale")
    # spec.replicas on the object itself, not the scale subresource: one request carries
    # both the change and the stamp (so the account needs `patch` on the kind).
    obj = await _write(
        kube.patch_object(
            kind=rt.plural,
            api_version=rt.api_version,
            name=a.name,
            namespace=ns,
            patch=_stamped(call_id, {"spec": {"replicas": a.replicas}}),
        )
    )
    return summarize(obj, kind=rt.kind)


async def _rollout_restart(
    kube: kubeapi.ServiceAccountKube, a: RolloutRestartArgs, ns: str, call_id: str
) -> Any:
    rt = await _resolve(kube, a.kind)
    _only(rt, ("Deployment", "StatefulSet", "DaemonSet"), "k8s_rollout_restart")
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    template = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}}
    obj = await _write(
        kube.patch_object(
            kind=rt.plural,
            api_version=rt.api_version,
            name=a.name,
            namespace=ns,
            patch=_stamped(call_id, template),
        )
    )
    result = summarize(obj, kind=rt.kind) | {"restartedAt": now}
    if (obj.get("spec") or {}).get("paused"):
        result["note"] = "the Deployment is paused: the restart rolls out when it is resumed"
    return result


async def _delete_pod(
    kube: kubeapi.ServiceAccountKube, a: DeletePodArgs, ns: str, call_id: str
) -> Any:
    # Stamp first, then delete exactly the pod that carries the stamp (uid precondition),
    # so after a crash a terminating or vanished stamped pod tells that this call landed.
    pod = await _write(
        kube.patch_object(
            kind="pods", api_version="v1", name=a.name, namespace=ns, patch=_stamped(call_id)
        )
    )
    meta = pod.get("metadata") or {}
    await _write(
        kube.delete_object(
            kind="pods", api_version="v1", name=a.name, namespace=ns, uid=meta.get("uid")
        )
    )
    result: dict[str, Any] = {"kind": "Pod", "name": a.name, "namespace": ns, "deleted": True}
    owners = [f"{o.get('kind')}/{o.get('name')}" for o in meta.get("ownerReferences") or []]
    if owners:
        result["note"] = f"owned by {', '.join(owners)}, which will likely replace it"
    return result


async def _patch(kube: kubeapi.ServiceAccountKube, a: PatchArgs, ns: str, call_id: str) -> Any:
    rt = await _resolve(kube, a.kind)
    if rt.kind == "Secret" and rt.group == "" and isinstance(a.patch, list):
        # `copy`/`move` would carry a value out of data into fields that are shown (an
        # annotation), and `test` would confirm guesses: both defeat the redaction.
        for op in a.patch:
            source = op.get("from") if op.get("op") in ("copy", "move") else op.get("path")
            if op.get("op") in ("copy", "move", "test") and _touches_data(source):
                raise ArgumentError(
                    "patch",
                    f"'{op.get('op')}' on a Secret's data is not allowed: it would reveal it",
                )
    if isinstance(a.patch, dict):
        patched = await _write(
            kube.patch_object(
                kind=rt.plural,
                api_version=rt.api_version,
                name=a.name,
                namespace=ns,
                patch=_stamped(call_id, a.patch),
                patch_type=a.patch_type,
            )
        )
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
            patched = await _write(
                kube.patch_object(
                    kind=rt.plural,
                    api_version=rt.api_version,
                    name=a.name,
                    namespace=ns,
                    patch=ops,
                    patch_type="json",
                )
            )
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
    key = STAMP.replace("~", "~0").replace("/", "~1")
    if has_map:
        return [
            *ops,
            {"op": "add", "path": f"/metadata/annotations/{key}", "value": call_id},
        ], False
    guard = {"op": "test", "path": "/metadata/resourceVersion", "value": _rv(current)}
    add = {"op": "add", "path": "/metadata/annotations", "value": {STAMP: call_id}}
    return [guard, *ops, add], True


_SERVER_OWNED = (
    "managedFields",
    "resourceVersion",
    "uid",
    "creationTimestamp",
    "generation",
    "selfLink",
)


async def _apply(kube: kubeapi.ServiceAccountKube, a: ApplyArgs, ns: str, call_id: str) -> Any:
    manifest = copy.deepcopy(a.manifest)
    assert isinstance(manifest, dict)  # the validator parsed it
    rt = await _resolve(kube, manifest["kind"], manifest["apiVersion"])
    # Fields the server owns would make the apply fail or act as stale preconditions when
    # the model applies back an object it read.
    manifest.pop("status", None)
    meta = manifest.setdefault("metadata", {})
    for field in _SERVER_OWNED:
        meta.pop(field, None)
    manifest = _stamped(call_id, manifest)
    applied = await _write(kube.apply_object(manifest=manifest, namespace=ns))
    return clean(applied, rt)


_TOOLS: dict[str, _Tool] = {
    "k8s_get": _Tool(
        GetArgs,
        "Read one Kubernetes object (without managedFields; Secret data is redacted).",
        _get,
        False,
    ),
    "k8s_list": _Tool(
        ListArgs,
        "List objects of a kind in a namespace as a compact summary (name, namespace, "
        "kind and key status fields). Use k8s_get for a full object.",
        _list,
        False,
    ),
    "k8s_describe": _Tool(
        DescribeArgs,
        "Read one object plus the recent Events about it, like kubectl describe.",
        _describe,
        False,
    ),
    "k8s_logs": _Tool(
        LogsArgs,
        "Read the most recent log lines of a pod's container.",
        _logs,
        False,
    ),
    "k8s_events": _Tool(
        EventsArgs,
        "List the Events of a namespace, oldest first, optionally only those about "
        "objects of a kind and/or name.",
        _events,
        False,
    ),
    "k8s_scale": _Tool(
        ScaleArgs,
        "Set the replicas of a Deployment, StatefulSet or ReplicaSet. Like every "
        "changing tool, it marks the object with annotation agentrun.dev/last-call-id.",
        _scale,
        True,
    ),
    "k8s_rollout_restart": _Tool(
        RolloutRestartArgs,
        "Restart the pods of a Deployment, StatefulSet or DaemonSet with a rolling "
        "update, like kubectl rollout restart.",
        _rollout_restart,
        True,
    ),
    "k8s_delete_pod": _Tool(
        DeletePodArgs,
        "Delete one pod (its controller, if any, creates a replacement).",
        _delete_pod,
        True,
    ),
    "k8s_patch": _Tool(
        PatchArgs,
        "Patch one object: merge (default), strategic or json patch.",
        _patch,
        True,
    ),
    "k8s_apply": _Tool(
        ApplyArgs,
        "Create or update one object by server-side apply (field manager 'agentrun'). "
        "Fields this tool applied before and the manifest leaves out are removed.",
        _apply,
        True,
    ),
}
assert set(_TOOLS) == set(models.ALL_TOOLS)
assert {n for n, t in _TOOLS.items() if t.mutating} == set(models.MUTATING_TOOLS)


# -- the API the workflow uses --------------------------------------------------------------


def openai_tools(names: Sequence[str]) -> list[dict[str, Any]]:
    """OpenAI function-tool specs for the named tools (unknown names: ValueError)."""
    unknown = [n for n in names if n not in _TOOLS]
    if unknown:
        raise ValueError(f"unknown tools: {', '.join(unknown)}")
    return [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": _TOOLS[name].description,
                "parameters": _schema(_TOOLS[name].args),
            },
        }
        for name in names
    ]


def _schema(model: type[_Args]) -> dict[str, Any]:
    # pydantic's schema, minus what only costs tokens: titles, `anyOf [X, null]` for
    # optional arguments (leaving one out is how the model says "none"), null defaults.
    def tidy(node: Any) -> Any:
        if isinstance(node, list):
            return [tidy(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {k: tidy(v) for k, v in node.items() if k != "title"}
        options = out.get("anyOf")
        if isinstance(options, list):
            kept = [o for o in options if o != {"type": "null"}]
            if len(kept) == 1:
                del out["anyOf"]
                out = {**kept[0], **out}
            else:
                out["anyOf"] = kept
        if "default" in out and out["default"] is None:
            del out["default"]
        return out

    schema: dict[str, Any] = tidy(model.model_json_schema(by_alias=True))
    return schema


def parse_arguments(name: str, arguments: Any) -> BaseModel:
    """The validated arguments of a call, or ArgumentError naming what to fix."""
    tool = _TOOLS.get(name)
    if tool is None:
        raise ArgumentError("name", f"unknown tool {name!r}; tools: {', '.join(_TOOLS)}")
    if not isinstance(arguments, dict):
        raise ArgumentError("arguments", "must be a JSON object")
    # Deeper than a ToolApproval may hold: no person could be asked about it, and no real
    # patch or manifest needs it.
    path = approvals.deeper_than(arguments, approvals.MAX_ARGUMENT_NESTING)
    if path is not None:
        raise ArgumentError(
            path[0],
            f"nested deeper than {approvals.MAX_ARGUMENT_NESTING} levels; send a flatter value",
        )
    try:
        return tool.args.model_validate(arguments)
    except ValidationError as e:
        raise _explain(e, tool.args) from None


def _explain(error: ValidationError, model: type[_Args]) -> ArgumentError:
    allowed = ", ".join(f.alias or n for n, f in model.model_fields.items())
    messages: dict[str, str] = {}
    for e in error.errors():
        where = str(e["loc"][0]) if e["loc"] else ""
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown argument '{where}' (arguments: {allowed})"
        elif e["type"] == "missing":
            msg = f"argument '{where}' is required"
        elif where:
            msg = f"argument '{where}': {msg}"
        messages.setdefault(where, msg)
    first = next(iter(messages))
    return ArgumentError(first or "arguments", "", message="; ".join(messages.values()))


async def run_tool(
    kube: kubeapi.ServiceAccountKube,
    *,
    name: str,
    arguments: dict[str, Any],
    namespace: str,
    call_id: str,
    max_bytes: int = 16384,
) -> ToolOutcome:
    """Run one call as ``kube``'s service account. Never raises for what the model or the
    cluster did: those are ``failed`` outcomes, with a message the model can act on."""
    try:
        args = parse_arguments(name, arguments)
    except ArgumentError as e:
        return ToolOutcome("failed", None, f"{name}: {e}")
    tool = _TOOLS[name]
    ns = getattr(args, "namespace", None) or namespace
    try:
        result = await tool.run(kube, args, ns, call_id)
    except ArgumentError as e:
        return ToolOutcome("failed", None, f"{name}: {e}")
    except _MaybeLanded as lost:
        # The write may have been carried out though its answer was lost: read the stamp.
        why = f"{name}: {_explain_kube(kube, tool, lost.error)}"
        verdict = await landed(
            kube, name=name, arguments=arguments, namespace=namespace, call_id=call_id
        )
        if verdict:
            note = "the answer was lost, but the object carries this call's id: it landed"
            return ToolOutcome("succeeded", {"landed": True, "note": note}, None)
        if verdict is None:
            why += "; whether the change was made cannot be told: check before retrying"
            return ToolOutcome("unknown", None, why)
        return ToolOutcome("failed", None, why + "; the change was not made")
    except kubeapi.KubeError as e:
        return ToolOutcome("failed", None, f"{name}: {_explain_kube(kube, tool, e)}")
    except Exception as e:  # a bug here must not end the run
        logger.exception("tool %s failed unexpectedly", name)
        return ToolOutcome("failed", None, f"{name}: internal error: {type(e).__name__}: {e}")
    return ToolOutcome("succeeded", cap(redact(result), max_bytes), None)


def _explain_kube(kube: kubeapi.ServiceAccountKube, tool: _Tool, e: kubeapi.KubeError) -> str:
    text = f"{e.reason} ({e.status}): {e.message}"
    if e.status == 403:
        return (
            f"{text} (forbidden: the run acts as service account {kube.namespace}/{kube.name}, "
            "which lacks this right)"
        )
    if e.status == 404:
        fields = tool.args.model_fields
        what = "pod" if "pod" in fields else "name" if "name" in fields else "manifest"
        return f"{text} (check the arguments '{what}' and 'namespace')"
    if e.status == 415:
        return f"{text} (strategic merge patch works on built-in kinds only: use patchType 'merge')"
    if e.status == 400 and tool.args is ListArgs:
        return f"{text} (check the arguments 'labelSelector' and 'fieldSelector')"
    return text


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
    tool = _TOOLS.get(name)
    if tool is None or not tool.mutating:
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
        rt = await _resolve(kube, kind, api_version)
        obj = await kube.get_object(
            kind=rt.plural, api_version=rt.api_version, name=target, namespace=ns
        )
    except kubeapi.KubeError as e:
        return False if e.status == 404 else None
    except (ArgumentError, KeyError):
        return None
    return _annotations(obj).get(STAMP) == call_id


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
    if _annotations(pod).get(STAMP) == call_id:
        return bool(meta.get("deletionTimestamp"))  # stamped but not deleted: safe to rerun
    created = _time(meta.get("creationTimestamp"))
    if started_at is not None and created is not None:
        return created >= started_at.replace(microsecond=0)  # a replacement came meanwhile
    owners = {o.get("kind") for o in meta.get("ownerReferences") or []}
    # Only a StatefulSet recreates a pod under the same name: then it cannot be told.
    return None if "StatefulSet" in owners else False


def _time(value: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _annotations(obj: dict[str, Any]) -> dict[str, Any]:
    annotations = (obj.get("metadata") or {}).get("annotations")
    return annotations if isinstance(annotations, dict) else {}


# -- shaping results (pure) -----------------------------------------------------------------


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in recursively (``extra`` wins); inputs untouched."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _is_secret(obj: dict[str, Any]) -> bool:
    return obj.get("kind") == "Secret" and obj.get("apiVersion", "v1") == "v1"


def redact_secret(secret: dict[str, Any]) -> dict[str, Any]:
    """A Secret with every value of data/stringData (and kubectl's last-applied copy of
    them) replaced; the keys stay, so the model can see which exist."""
    out = dict(secret)
    for field in ("data", "stringData"):
        value = out.get(field)
        if isinstance(value, dict):
            out[field] = dict.fromkeys(value, REDACTED)
        elif value is not None:
            out[field] = REDACTED
    meta = out.get("metadata")
    if isinstance(meta, dict) and LAST_APPLIED in _annotations(out):
        out["metadata"] = {**meta, "annotations": {**meta["annotations"], LAST_APPLIED: REDACTED}}
    return out


def redact(value: Any) -> Any:
    """``value`` with the data of every Secret in it redacted, however deep (lists too)."""
    if isinstance(value, list):
        return [redact(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: redact(v) for k, v in value.items()}
    if _is_secret(value):
        out = redact_secret(out)
    if value.get("kind") == "SecretList" and isinstance(out.get("items"), list):
        # Items of a List carry no kind of their own.
        out["items"] = [redact_secret(i) if isinstance(i, dict) else i for i in out["items"]]
    return out


def redacted_arguments(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments fit for the event stream: Secret data the model wrote into a
    k8s_apply manifest or a k8s_patch of a Secret is redacted."""
    if name == "k8s_apply":
        manifest = arguments.get("manifest")
        if isinstance(manifest, str):
            try:
                manifest = yaml.safe_load(manifest)
            except yaml.YAMLError:
                # Unreadable (several documents, bad YAML): the call fails, but its text
                # is still shown; if it may hold a Secret, none of it is.
                if "secret" in manifest.lower():
                    return {**arguments, "manifest": REDACTED}
                return arguments
        if isinstance(manifest, dict) and _is_secret(manifest):
            return {**arguments, "manifest": redact_secret(manifest)}
        return arguments
    if name == "k8s_patch" and str(arguments.get("kind", "")).lower().split(".")[0] in (
        "secret",
        "secrets",
    ):
        patch = arguments.get("patch")
        if isinstance(patch, dict):
            return {**arguments, "patch": redact_secret({"kind": "Secret", **patch})}
        if isinstance(patch, list):
            ops = [
                {**op, "value": REDACTED}
                if isinstance(op, dict) and "value" in op and _touches_data(op.get("path"))
                else op
                for op in patch
            ]
            return {**arguments, "patch": ops}
        return {**arguments, "patch": REDACTED}
    return arguments


def _touches_data(path: Any) -> bool:
    return isinstance(path, str) and (
        path in ("", "/") or path.startswith(("/data", "/stringData", "/metadata"))
    )


def clean(obj: dict[str, Any], rt: kubeapi.ResourceType) -> dict[str, Any]:
    """An object as a tool returns it: no managedFields, no last-applied copy, redacted."""
    out = {"apiVersion": rt.api_version, "kind": rt.kind, **obj}
    meta = dict(out.get("metadata") or {})
    meta.pop("managedFields", None)
    if LAST_APPLIED in _annotations(out):
        meta["annotations"] = {**meta["annotations"], LAST_APPLIED: "<omitted>"}
    out["metadata"] = meta
    return redact_secret(out) if rt.kind == "Secret" and rt.group == "" else out


def summarize(obj: dict[str, Any], *, kind: str) -> dict[str, Any]:
    """The compact form of one object in a list: identity plus the status fields that
    `kubectl get` would show for its kind."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    out: dict[str, Any] = {"name": meta.get("name"), "kind": kind}
    if meta.get("namespace"):
        out["namespace"] = meta["namespace"]
    out["created"] = meta.get("creationTimestamp")
    if meta.get("deletionTimestamp"):
        out["terminating"] = True
    if kind == "Pod":
        containers = status.get("containerStatuses") or []
        out["phase"] = status.get("phase")
        out["ready"] = (
            f"{sum(1 for c in containers if c.get('ready'))}/{len(spec.get('containers') or [])}"
        )
        out["restarts"] = sum(int(c.get("restartCount") or 0) for c in containers)
        if spec.get("nodeName"):
            out["node"] = spec["nodeName"]
        reasons = [
            (c.get("state") or {}).get(s, {}).get("reason")
            for c in containers
            for s in ("waiting", "terminated")
        ]
        reason = next((r for r in reasons if r), status.get("reason"))
        if reason:
            out["reason"] = reason
    elif kind in ("Deployment", "StatefulSet", "ReplicaSet"):
        out["replicas"] = spec.get("replicas")
        for field in ("readyReplicas", "updatedReplicas", "availableReplicas"):
            out[field.removesuffix("Replicas")] = status.get(field, 0)
    elif kind == "DaemonSet":
        for field in ("desiredNumberScheduled", "numberReady", "numberAvailable"):
            out[field] = status.get(field, 0)
    elif kind == "Job":
        for field in ("active", "succeeded", "failed"):
            out[field] = status.get(field, 0)
    elif kind == "CronJob":
        out["schedule"] = spec.get("schedule")
        out["suspend"] = spec.get("suspend", False)
        out["lastSchedule"] = status.get("lastScheduleTime")
    elif kind == "Service":
        out["type"] = spec.get("type")
        out["clusterIP"] = spec.get("clusterIP")
        out["ports"] = [
            f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports") or []
        ]
    elif kind in ("Secret", "ConfigMap"):
        if kind == "Secret":
            out["type"] = obj.get("type")
        out["keys"] = sorted({*(obj.get("data") or {}), *(obj.get("binaryData") or {})})
    elif kind == "Event":
        return compact_event(obj)
    elif kind == "Node" and spec.get("unschedulable"):
        out["unschedulable"] = True
    if "phase" in status and "phase" not in out:
        out["phase"] = status["phase"]
    conditions = status.get("conditions")
    if isinstance(conditions, list) and conditions:
        out["conditions"] = [
            f"{c.get('type')}={c.get('status')}" + (f" ({c['reason']})" if c.get("reason") else "")
            for c in conditions[:8]
            if isinstance(c, dict)
        ]
    return out


def compact_event(event: dict[str, Any]) -> dict[str, Any]:
    involved = event.get("involvedObject") or {}
    out = {
        "type": event.get("type"),
        "reason": event.get("reason"),
        "object": f"{involved.get('kind')}/{involved.get('name')}",
        "message": event.get("message"),
        "count": event.get("count") or 1,
        "last": event.get("lastTimestamp")
        or event.get("eventTime")
        or (event.get("metadata") or {}).get("creationTimestamp"),
    }
    source = (event.get("source") or {}).get("component") or event.get("reportingComponent")
    if source:
        out["source"] = source
    return out


def size(value: Any) -> int:
    """Bytes of ``value`` as JSON with Python's defaults (ASCII, spaced): no other common
    serialization is longer, so a result within the cap stays within it in any of them."""
    return len(json.dumps(value))


def cap(result: Any, max_bytes: int) -> Any:
    """``result`` cut to at most ``max_bytes`` of JSON, saying so when cut: lists keep as
    many items as fit (the newest events, the first objects), logs keep their last lines,
    anything else becomes ``{"truncated": true, "json": <the start of its JSON text>}``."""
    if size(result) <= max_bytes:
        return result
    if isinstance(result, dict):
        for key, newest_last in (("items", False), ("events", True)):
            if isinstance(result.get(key), list):
                trimmed = _trim_list(result, key, max_bytes, keep_tail=newest_last)
                if trimmed is not None:
                    return trimmed
        if isinstance(result.get("lines"), str):
            trimmed = _trim_text(result, "lines", max_bytes)
            if trimmed is not None:
                return trimmed
    text = json.dumps(result)
    note = f"the result was {len(text)} bytes, over the {max_bytes}-byte limit: its JSON is cut"
    cut = _trim_text({"truncated": True, "note": note, "json": text}, "json", max_bytes, tail=False)
    return cut if cut is not None else {"truncated": True}


def _largest(fits: Callable[[int], bool], upper: int) -> int | None:
    """The largest n in 0..upper with fits(n), for fits monotone decreasing; None if none."""
    if not fits(0):
        return None
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _trim_list(result: dict[str, Any], key: str, max_bytes: int, *, keep_tail: bool) -> Any:
    items = result[key]
    total = len(items)

    def build(n: int) -> dict[str, Any]:
        kept = items[total - n :] if keep_tail else items[:n]
        which = "newest" if keep_tail else "first"
        note = f"showing the {which} {n} of {total}: narrow the query to see the rest"
        return {**result, key: kept, "truncated": True, "note": note}

    n = _largest(lambda n: size(build(n)) <= max_bytes, total)
    return None if n is None else build(n)


def _trim_text(
    result: dict[str, Any], key: str, max_bytes: int, *, tail: bool = True
) -> dict[str, Any] | None:
    text: str = result[key]

    def build(n: int) -> dict[str, Any]:
        kept = text[len(text) - n :] if tail else text[:n]
        extra = (
            {} if "truncated" in result else {"truncated": True, "note": "only the last lines fit"}
        )
        return {**result, key: kept, **extra}

    n = _largest(lambda n: size(build(n)) <= max_bytes, len(text))
    if n is None:
        return None
    if tail and 0 < n < len(text) and "\n" in text[len(text) - n :]:
        # Start at a line boundary rather than mid-line.
        start = text.index("\n", len(text) - n) + 1
        return build(len(text) - start)
    return build(n)
