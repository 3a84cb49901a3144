"""The tool catalog and dispatch: each tool's description, arguments and body; the OpenAI
function specs the model sees; running one call to a ``ToolOutcome``.

Never raises for anything the model or the cluster did (bad arguments, unknown kinds,
403/404...): those are ``failed`` outcomes whose message names the argument to fix.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agentrun_operator import kube as kubeapi
from agentrun_operator import models
from agentrun_operator.tools.arguments import (
    ApplyArgs,
    Args,
    ArgumentError,
    DeletePodArgs,
    DescribeArgs,
    EventsArgs,
    GetArgs,
    ListArgs,
    LogsArgs,
    PatchArgs,
    RolloutRestartArgs,
    ScaleArgs,
    ToolOutcome,
    parse_arguments,
)
from agentrun_operator.tools.landing import landed
from agentrun_operator.tools.reads import k8s_describe, k8s_events, k8s_get, k8s_list, k8s_logs
from agentrun_operator.tools.results import cap, redact
from agentrun_operator.tools.writes import (
    MaybeLanded,
    k8s_apply,
    k8s_delete_pod,
    k8s_patch,
    k8s_rollout_restart,
    k8s_scale,
)

logger = logging.getLogger(__name__)


Runner = Callable[[kubeapi.ServiceAccountKube, Any, str, str], Awaitable[Any]]


@dataclass(frozen=True)
class Tool:
    args: type[Args]
    description: str
    run: Runner
    mutating: bool


TOOLS: dict[str, Tool] = {
    "k8s_get": Tool(
        GetArgs,
        "Read one Kubernetes object (without managedFields; Secret data is redacted).",
        k8s_get,
        False,
    ),
    "k8s_list": Tool(
        ListArgs,
        "List objects of a kind in a namespace as a compact summary (name, namespace, "
        "kind and key status fields). Use k8s_get for a full object.",
        k8s_list,
        False,
    ),
    "k8s_describe": Tool(
        DescribeArgs,
        "Read one object plus the recent Events about it, like kubectl describe.",
        k8s_describe,
        False,
    ),
    "k8s_logs": Tool(
        LogsArgs,
        "Read the most recent log lines of a pod's container.",
        k8s_logs,
        False,
    ),
    "k8s_events": Tool(
        EventsArgs,
        "List the Events of a namespace, oldest first, optionally only those about "
        "objects of a kind and/or name.",
        k8s_events,
        False,
    ),
    "k8s_scale": Tool(
        ScaleArgs,
        "Set the replicas of a Deployment, StatefulSet or ReplicaSet. Like every "
        "changing tool, it marks the object with annotation agentrun.dev/last-call-id.",
        k8s_scale,
        True,
    ),
    "k8s_rollout_restart": Tool(
        RolloutRestartArgs,
        "Restart the pods of a Deployment, StatefulSet or DaemonSet with a rolling "
        "update, like kubectl rollout restart.",
        k8s_rollout_restart,
        True,
    ),
    "k8s_delete_pod": Tool(
        DeletePodArgs,
        "Delete one pod (its controller, if any, creates a replacement).",
        k8s_delete_pod,
        True,
    ),
    "k8s_patch": Tool(
        PatchArgs,
        "Patch one object: merge (default), strategic or json patch.",
        k8s_patch,
        True,
    ),
    "k8s_apply": Tool(
        ApplyArgs,
        "Create or update one object by server-side apply (field manager 'agentrun'). "
        "Fields this tool applied before and the manifest leaves out are removed.",
        k8s_apply,
        True,
    ),
}


assert set(TOOLS) == set(models.ALL_TOOLS)


assert {n for n, t in TOOLS.items() if t.mutating} == set(models.MUTATING_TOOLS)


def openai_tools(names: Sequence[str]) -> list[dict[str, Any]]:
    """OpenAI function-tool specs for the named tools (unknown names: ValueError)."""
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tools: {', '.join(unknown)}")
    return [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": TOOLS[name].description,
                "parameters": _schema(TOOLS[name].args),
            },
        }
        for name in names
    ]


def _schema(model: type[Args]) -> dict[str, Any]:
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
    tool = TOOLS[name]
    ns = getattr(args, "namespace", None) or namespace
    try:
        result = await tool.run(kube, args, ns, call_id)
    except ArgumentError as e:
        return ToolOutcome("failed", None, f"{name}: {e}")
    except MaybeLanded as lost:
        # The write may have been carried out though its answer was lost: read the stamp.
        why = f"{name}: {explain_kube(kube, tool, lost.error)}"
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
        return ToolOutcome("failed", None, f"{name}: {explain_kube(kube, tool, e)}")
    except Exception as e:  # a bug here must not end the run
        logger.exception("tool %s failed unexpectedly", name)
        return ToolOutcome("failed", None, f"{name}: internal error: {type(e).__name__}: {e}")
    return ToolOutcome("succeeded", cap(redact(result), max_bytes), None)


def explain_kube(kube: kubeapi.ServiceAccountKube, tool: Tool, e: kubeapi.KubeError) -> str:
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
