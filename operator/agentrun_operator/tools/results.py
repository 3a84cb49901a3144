"""Shaping results for the model and the stream (pure): compact object forms, redaction of
Secret data (results and the arguments people see), and the size cap.

Never: does I/O, or lets a Secret's ``data``/``stringData`` out.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import yaml

from agentrun_operator import kube as kubeapi

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


REDACTED = "<redacted>"


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in recursively (``extra`` wins); inputs untouched."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def is_secret(obj: dict[str, Any]) -> bool:
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
    if isinstance(meta, dict) and LAST_APPLIED in annotations_of(out):
        out["metadata"] = {**meta, "annotations": {**meta["annotations"], LAST_APPLIED: REDACTED}}
    return out


def redact(value: Any) -> Any:
    """``value`` with the data of every Secret in it redacted, however deep (lists too)."""
    if isinstance(value, list):
        return [redact(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: redact(v) for k, v in value.items()}
    if is_secret(value):
        out = redact_secret(out)
    if value.get("kind") == "SecretList" and isinstance(out.get("items"), list):
        # Items of a List carry no kind of their own.
        out["items"] = [redact_secret(i) if isinstance(i, dict) else i for i in out["items"]]
    return out


def redact_text(text: str) -> str:
    """A text that may carry Kubernetes objects as JSON or YAML (an MCP server's answer, an
    argument) with the data of every Secret in it redacted; text that holds a Secret but
    cannot be read is withheld whole."""
    if "secret" not in text.lower():
        return text
    try:
        doc = json.loads(text)
    except ValueError:
        pass
    else:
        shown = redact(doc)
        return text if shown == doc else json.dumps(shown)
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError:
        return REDACTED if "data" in text or "stringData" in text else text
    shown_docs = [redact(d) for d in docs]
    if shown_docs == docs:
        return text
    return yaml.safe_dump_all(shown_docs, sort_keys=False)


def redact_deep(value: Any) -> Any:
    """``redact`` that also reads the strings inside ``value`` (MCP results and arguments
    are free-form: a Secret may come as an object or as YAML text)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list):
        return [redact_deep(v) for v in value]
    if isinstance(value, dict):
        return redact({k: redact_deep(v) for k, v in value.items()})
    return value


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
        if isinstance(manifest, dict) and is_secret(manifest):
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
                if isinstance(op, dict) and "value" in op and touches_data(op.get("path"))
                else op
                for op in patch
            ]
            return {**arguments, "patch": ops}
        return {**arguments, "patch": REDACTED}
    return arguments


def touches_data(path: Any) -> bool:
    return isinstance(path, str) and (
        path in ("", "/") or path.startswith(("/data", "/stringData", "/metadata"))
    )


def clean(obj: dict[str, Any], rt: kubeapi.ResourceType) -> dict[str, Any]:
    """An object as a tool returns it: no managedFields, no last-applied copy, redacted."""
    out = {"apiVersion": rt.api_version, "kind": rt.kind, **obj}
    meta = dict(out.get("metadata") or {})
    meta.pop("managedFields", None)
    if LAST_APPLIED in annotations_of(out):
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


def annotations_of(obj: dict[str, Any]) -> dict[str, Any]:
    annotations = (obj.get("metadata") or {}).get("annotations")
    return annotations if isinstance(annotations, dict) else {}
