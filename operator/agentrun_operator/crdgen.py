"""Generate the CRDs from the pydantic models in ``models``.

``python -m agentrun_operator.crdgen`` (``make crds``) writes ``crds/*.yaml`` and the chart's
copy; ``--check`` fails when the committed files differ from what the models say.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3 schema valid
on 1.20: no ``$ref``, no ``anyOf`` around nullables, no ``title``, free-form objects marked
``x-kubernetes-preserve-unknown-fields``, and every field described so ``kubectl explain``
teaches. Pure apart from the file writes in ``main``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from agentrun_operator import models

Schema = dict[str, Any]

# Not "agentrun": kubectl expands a category before it looks up resource names, so a
# category equal to the singular name would turn `kubectl get agentrun NAME` into a get of
# both kinds ("you must specify only one resource"). `kubectl get agentrun-all` lists both.
CATEGORY = "agentrun-all"

_KEEP = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "enum",
    "default",
    "format",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
    "additionalProperties",
}


def _resolve(node: Any, defs: dict[str, Schema]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = _resolve(defs[node.pop("$ref").rsplit("/", 1)[-1]], defs)
        # A field's own description wins over the model's docstring.
        node = {**target, **{k: v for k, v in node.items() if k != "title"}}
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**_resolve(node.pop("allOf")[0], defs), **node}
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express union {options} in a structural schema")
        node = {**_resolve(options[0], defs), **node}
    return {k: _resolve(v, defs) for k, v in node.items()}


def _structural(node: Schema, where: str) -> Schema:
    out: Schema = {}
    if "const" in node:  # a one-value Literal; Kubernetes knows enums, not const
        node = {**node, "enum": [node["const"]]}
    if node.get(models.NO_CRD_DEFAULT):
        node = {k: v for k, v in node.items() if k != "default"}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            out[key] = value
        elif key in _KEEP:
            out[key] = value
    # No default for None, and none for "": the 1.20 API server reads an empty-string
    # default as null and rejects the CRD.
    if out.get("default", object()) in (None, ""):
        del out["default"]
    if "properties" in out:
        out["properties"] = {
            name: _structural(sub, f"{where}.{name}") for name, sub in out["properties"].items()
        }
    if "items" in out:
        out["items"] = _structural(out["items"], f"{where}[]")
        # Item descriptions only repeat the list's; kubectl explain shows the list's.
        out["items"].pop("description", None)
    typed = out.get("additionalProperties")
    if out.get("type") == "object" and isinstance(typed, dict) and typed.get("type"):
        # A map of one type (labels: string to string): Kubernetes checks its values.
        out["additionalProperties"] = {k: v for k, v in typed.items() if k in _KEEP}
    elif out.get("type") == "object" and "properties" not in out:
        out.pop("additionalProperties", None)
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("format") == "date-time":
        out["type"] = "string"
    if "description" not in out and not where.endswith("[]"):
        raise ValueError(f"{where} has no description; kubectl explain would show nothing")
    return out


def schema_of(model: type[BaseModel], where: str) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    resolved = _resolve(raw, defs)
    return _structural(resolved, where)


def _add_object_defaults(node: Schema) -> None:
    for sub in node.get("properties", {}).values():
        _add_object_defaults(sub)
        if sub.get("type") == "object" and any(
            "default" in p for p in sub.get("properties", {}).values()
        ):
            sub.setdefault("default", {})


def _crd(
    *,
    kind: str,
    plural: str,
    short: str,
    spec: type[BaseModel],
    status: type[BaseModel] | None,
    description: str,
    columns: list[Schema],
    metadata_schema: Schema,
    scope: str = "Namespaced",
) -> Schema:
    spec_schema = schema_of(spec, f"{kind}.spec")
    # Only spec objects default to {}: status is the operator's, and stays as it wrote it.
    _add_object_defaults(spec_schema)
    properties: Schema = {
        "apiVersion": {
            "type": "string",
            "description": f"APIVersion of this object: {models.API_VERSION}.",
        },
        "kind": {"type": "string", "description": f"Kind of this object: {kind}."},
        "metadata": metadata_schema,
        "spec": spec_schema,
    }
    version: Schema = {"name": models.VERSION, "served": True, "storage": True}
    if status is not None:
        status_schema = schema_of(status, f"{kind}.status")
        # kopf keeps its own progress and diff-base here (never in annotations), so GitOps
        # tools that compare metadata and spec see no drift.
        status_schema["properties"]["kopf"] = {
            "type": "object",
            "description": "The operator's own bookkeeping (kopf progress); do not edit.",
            "x-kubernetes-preserve-unknown-fields": True,
        }
        properties["status"] = status_schema
        version["subresources"] = {"status": {}}
    version["additionalPrinterColumns"] = columns
    version["schema"] = {
        "openAPIV3Schema": {
            "type": "object",
            "description": description,
            "required": ["spec"],
            "properties": properties,
        }
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{models.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "agentrun"},
        },
        "spec": {
            "group": models.GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": [CATEGORY],
            },
            "versions": [version],
        },
    }


def agentrun_crd() -> Schema:
    return _crd(
        kind="AgentRun",
        plural="agentruns",
        short="ar",
        spec=models.AgentRunSpec,
        status=models.AgentRunStatus,
        description="An AI agent run: a goal the operator pursues with an LLM and Kubernetes "
        "tools, streamed live, paused for approval of risky calls, stoppable at once.",
        metadata_schema={
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": models.MAX_RUN_NAME},
            },
        },
        columns=[
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
            {"name": "Approvals", "type": "integer", "jsonPath": ".status.pendingApprovalCount"},
            {"name": "Tokens", "type": "integer", "jsonPath": ".status.usage.totalTokens"},
            {"name": "Cost", "type": "number", "jsonPath": ".status.usage.costUSD"},
            {"name": "Worker", "type": "string", "jsonPath": ".status.worker", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def toolapproval_crd() -> Schema:
    return _crd(
        kind="ToolApproval",
        plural="toolapprovals",
        short="ta",
        spec=models.ToolApprovalSpec,
        status=models.ToolApprovalStatus,
        description="A risky tool call of an AgentRun waiting for a human decision. Decide "
        'with kubectl patch ta NAME --type merge -p \'{"spec":{"decision":"Approved"}}\'.',
        metadata_schema={"type": "object"},
        columns=[
            {"name": "Run", "type": "string", "jsonPath": ".spec.runName"},
            {"name": "Tool", "type": "string", "jsonPath": ".spec.tool"},
            {"name": "State", "type": "string", "jsonPath": ".status.state"},
            {"name": "Decided-By", "type": "string", "jsonPath": ".status.decidedBy.username"},
            {"name": "Votes", "type": "integer", "jsonPath": ".status.approvals"},
            {"name": "Needed", "type": "integer", "jsonPath": ".status.approvalsNeeded"},
            {
                "name": "Change",
                "type": "string",
                "jsonPath": ".status.preview.summary",
                "priority": 1,
            },
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def _policy_crd(kind: str, plural: str, short: str, scope: str) -> Schema:
    cluster = scope == "Cluster"
    return _crd(
        kind=kind,
        plural=plural,
        short=short,
        spec=models.ClusterAgentPolicySpec if cluster else models.AgentPolicySpec,
        status=None,
        scope=scope,
        description=(
            "Rules cluster admins set for the agent runs of every namespace its "
            "namespaceSelector matches"
            if cluster
            else "Rules namespace admins set for the agent runs of this namespace"
        )
        + ": allowed tools, endpoints and service accounts, approval floors, limit caps, "
        "and CEL rules judged for every tool call. A run can only tighten it. Written by "
        "the agentrun-policy-admin role, never by agentrun-editor.",
        metadata_schema={"type": "object"},
        columns=[
            {"name": "Min-Approvals", "type": "integer", "jsonPath": ".spec.approval.minApprovals"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def agentpolicy_crd() -> Schema:
    return _policy_crd("AgentPolicy", "agentpolicies", "ap", "Namespaced")


def clusteragentpolicy_crd() -> Schema:
    return _policy_crd("ClusterAgentPolicy", "clusteragentpolicies", "cap", "Cluster")


def mcpserver_crd() -> Schema:
    return _crd(
        kind="MCPServer",
        plural="mcpservers",
        short="mcp",
        spec=models.MCPServerSpec,
        status=models.MCPServerStatus,
        description="A Model Context Protocol tool server whose tools the runs of this "
        "namespace may use (spec.tools: mcp:<server>/<tool>), behind agentrun's approvals, "
        "stream and stop. Written by the agentrun-mcp-admin role only.",
        metadata_schema={
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 63}},
        },
        columns=[
            {"name": "URL", "type": "string", "jsonPath": ".spec.url"},
            {
                "name": "Ready",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
            },
            {"name": "Tools", "type": "integer", "jsonPath": ".status.toolCount"},
            {"name": "Error", "type": "string", "jsonPath": ".status.lastError", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


HEADER = "# Generated by `make crds` from operator/agentrun_operator/models.py. Do not edit.\n"


def render(crd: Schema) -> str:
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=100)


def outputs(root: Path) -> dict[Path, str]:
    files: dict[Path, str] = {}
    for crd in (
        agentrun_crd(),
        toolapproval_crd(),
        agentpolicy_crd(),
        clusteragentpolicy_crd(),
        mcpserver_crd(),
    ):
        text = render(crd)
        name = f"{crd['metadata']['name']}.yaml"
        files[root / "crds" / name] = text
        files[root / "charts" / "agentrun" / "crds" / name] = text
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root")
    parser.add_argument("--check", action="store_true", help="fail if committed files drift")
    args = parser.parse_args(argv)
    drift = []
    for path, text in outputs(args.root).items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            drift.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if drift:
        names = ", ".join(str(p) for p in drift)
        print(f"CRDs drifted from models.py: {names}. Run `make crds` and commit.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
