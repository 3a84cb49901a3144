"""Request bodies and path parameters of the API: their pydantic models and how a body is read.

Owns: reading a JSON body (415 for another content type, 413 past the size limit, 422
naming the field for anything else wrong) and the shapes of the chat, approval and login
bodies. The nested run settings (model, approval, limits) are passed through as objects:
the AgentRun CRD's schema is their one source of truth and the API server judges them with
it (its 422 names the field), so this module does not copy it.
Never: does I/O beyond reading the request, or talks to Kubernetes or Redis.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from agentrun_operator import contract

M = TypeVar("M", bound=BaseModel)

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A label value (call ids are labels on their ToolApproval).
LABEL_VALUE = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
RUN_NAME_MAX = 63
# A bearer token: visible ASCII, as an HTTP header can carry it.
TOKEN_PATTERN = r"^[\x21-\x7e]+$"
# No body of this API nests deeper than a few levels; a deeper one is refused before it can
# reach json.dumps or pydantic (recursion) on its way to the API server.
MAX_NESTING = 32


class BodyError(Exception):
    """A request the API refuses before doing anything: 413, 415 or 422."""

    def __init__(self, status: int, detail: str | list[dict[str, Any]]) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ChatRequest(_Body):
    """A new AgentRun: its goal and where it runs; the rest as in the AgentRun spec."""

    goal: str = Field(min_length=1, max_length=16384, description="What the agent should do.")
    namespace: str = Field(
        min_length=1, max_length=63, pattern=DNS_LABEL, description="Namespace of the run."
    )
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=RUN_NAME_MAX,
        pattern=DNS_SUBDOMAIN,
        description="Name of the run. Default: generated ('chat-' and a suffix).",
    )
    model: dict[str, Any] | None = Field(
        default=None, description="spec.model of the AgentRun (provider, name, baseURL...)."
    )
    tools: list[str] | None = Field(
        default=None, max_length=64, description="spec.tools: tool names the agent may call."
    )
    approval: dict[str, Any] | None = Field(default=None, description="spec.approval.")
    limits: dict[str, Any] | None = Field(default=None, description="spec.limits.")
    service_account_name: str | None = Field(
        default=None,
        alias="serviceAccountName",
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="spec.serviceAccountName: the identity the tools act as.",
    )

    def agentrun(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"goal": self.goal}
        for key, value in (
            ("model", self.model),
            ("tools", self.tools),
            ("approval", self.approval),
            ("limits", self.limits),
            ("serviceAccountName", self.service_account_name),
        ):
            if value is not None:
                spec[key] = value
        metadata: dict[str, Any] = {"namespace": self.namespace}
        if self.name:
            metadata["name"] = self.name
        else:
            metadata["generateName"] = "chat-"
        return {
            "apiVersion": contract.API_VERSION,
            "kind": "AgentRun",
            "metadata": metadata,
            "spec": spec,
        }


class ApprovalRequest(_Body):
    """A person's decision on a ToolApproval."""

    namespace: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=DNS_LABEL,
        description="Namespace of the run (required on /agent/approvals).",
    )
    decision: Literal["approve", "deny"] = Field(description="approve or deny.")
    comment: str | None = Field(
        default=None, max_length=2048, description="Optional note passed to the agent."
    )

    @property
    def k8s_decision(self) -> str:
        return "Approved" if self.decision == "approve" else "Denied"


class LoginRequest(_Body):
    token: str = Field(
        min_length=1,
        max_length=16384,
        pattern=TOKEN_PATTERN,
        description="A Kubernetes bearer token.",
    )


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _errors(e: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": ["body", *e_["loc"]], "msg": e_["msg"], "type": e_["type"]}
        for e_ in e.errors(include_url=False, include_input=False)
    ]


async def read(request: Request, model: type[M], *, form: bool = False) -> M:
    """The body as ``model``: JSON (or, with ``form``, a urlencoded form too)."""
    media = _media_type(request)
    allowed = ["application/json"] + (["application/x-www-form-urlencoded"] if form else [])
    if media not in allowed:
        raise BodyError(415, f"Content-Type must be {' or '.join(allowed)}, not {media!r}")
    raw = await request.body()
    data: Any
    if media == "application/x-www-form-urlencoded":
        fields = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        data = {k: v[-1] for k, v in fields.items()}
    else:
        try:
            data = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise BodyError(
                422, [{"loc": ["body"], "msg": f"invalid JSON: {e}", "type": "json_invalid"}]
            ) from None
        except RecursionError:  # the C decoder's own guard, ~1000 levels down
            raise BodyError(422, [_too_deep([])]) from None
        where = _deeper_than(data, MAX_NESTING)
        if where is not None:
            raise BodyError(422, [_too_deep(where[:1])])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise BodyError(422, _errors(e)) from None


def _too_deep(loc: list[str | int]) -> dict[str, Any]:
    return {
        "loc": ["body", *loc],
        "msg": f"nested deeper than {MAX_NESTING} levels",
        "type": "json_too_deep",
    }


def _deeper_than(data: Any, most: int) -> list[str | int] | None:
    """The path to the first value nested deeper than ``most`` levels, or None.

    Iterative, so it cannot itself run out of stack.
    """
    todo: list[tuple[Any, list[str | int]]] = [(data, [])]
    while todo:
        value, path = todo.pop()
        if len(path) > most:
            return path
        if isinstance(value, dict):
            todo.extend((v, [*path, str(k)]) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((v, [*path, i]) for i, v in enumerate(value))
    return None


def check_path(*, where: str = "path", **params: tuple[str, str, int]) -> None:
    """Each path (or query) parameter against its (value, pattern, max length); 422 naming it."""
    problems = []
    for name, (value, pattern, most) in params.items():
        # fullmatch: with re.match, "$" also matches before a trailing newline ("ns\n").
        if len(value) > most or not re.fullmatch(pattern, value):
            problems.append(
                {
                    "loc": [where, name],
                    "msg": f"must match {pattern} and be at most {most} characters",
                    "type": "value_error",
                }
            )
    if problems:
        raise BodyError(422, problems)
