"""What each ``k8s_*`` tool accepts: one pydantic model per tool (also the JSON Schema the
model sees), and the validation that turns a bad call into an error naming the argument.

Owns the argument models, ``ARGUMENTS`` (tool name -> model), ``parse_arguments`` and the
``ToolOutcome``/``ArgumentError`` types. Never: does I/O.
"""

from __future__ import annotations

import json
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

from agentrun_operator import approvals

Status = Literal["succeeded", "failed", "unknown", "cancelled"]


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


class Args(BaseModel):
    # camelCase only (as the model sees them); anything else is an unknown argument.
    model_config = ConfigDict(alias_generator=to_camel, extra="forbid", str_strip_whitespace=True)


class GetArgs(Args):
    kind: Kind
    name: Name
    namespace: Namespace = None
    api_version: ApiVersion = None


class ListArgs(Args):
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


class DescribeArgs(Args):
    kind: Kind
    name: Name
    namespace: Namespace = None


class LogsArgs(Args):
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


class EventsArgs(Args):
    namespace: Namespace = None
    kind: Kind | None = Field(default=None, description="Only events about objects of this kind.")
    name: Name | None = Field(default=None, description="Only events about objects of this name.")


class ScaleArgs(Args):
    kind: Kind = Field(description="Deployment, StatefulSet or ReplicaSet.")
    name: Name
    namespace: Namespace = None
    replicas: StrictInt = Field(ge=0, le=10000, description="The desired number of replicas.")


class RolloutRestartArgs(Args):
    kind: Kind = Field(description="Deployment, StatefulSet or DaemonSet.")
    name: Name
    namespace: Namespace = None


class DeletePodArgs(Args):
    name: Name = Field(description="Pod name.")
    namespace: Namespace = None


class PatchArgs(Args):
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


class ApplyArgs(Args):
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


ARGUMENTS: dict[str, type[Args]] = {
    "k8s_get": GetArgs,
    "k8s_list": ListArgs,
    "k8s_describe": DescribeArgs,
    "k8s_logs": LogsArgs,
    "k8s_events": EventsArgs,
    "k8s_scale": ScaleArgs,
    "k8s_rollout_restart": RolloutRestartArgs,
    "k8s_delete_pod": DeletePodArgs,
    "k8s_patch": PatchArgs,
    "k8s_apply": ApplyArgs,
}


def parse_arguments(name: str, arguments: Any) -> BaseModel:
    """The validated arguments of a call, or ArgumentError naming what to fix."""
    model = ARGUMENTS.get(name)
    if model is None:
        raise ArgumentError("name", f"unknown tool {name!r}; tools: {', '.join(ARGUMENTS)}")
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
        return model.model_validate(arguments)
    except ValidationError as e:
        raise _explain(e, model) from None


def _explain(error: ValidationError, model: type[Args]) -> ArgumentError:
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
