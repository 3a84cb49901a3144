"""The AgentRun and ToolApproval resources as pydantic models: the one source of truth.

The CRDs in ``crds/`` are generated from these models (``make crds``, see ``crdgen``), so a
field, its description, bounds, enum and default are written once, here. The operator
parses ``spec`` with these models and builds ``status`` patches from them.

Pure: no I/O, no kopf, no Kubernetes client, no Redis.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from agentrun_operator import contract

GROUP = contract.GROUP
VERSION = contract.VERSION
API_VERSION = contract.API_VERSION

ToolName = Literal[
    "k8s_get",
    "k8s_list",
    "k8s_describe",
    "k8s_logs",
    "k8s_events",
    "k8s_scale",
    "k8s_rollout_restart",
    "k8s_delete_pod",
    "k8s_patch",
    "k8s_apply",
]

READ_ONLY_TOOLS: tuple[ToolName, ...] = (
    "k8s_get",
    "k8s_list",
    "k8s_describe",
    "k8s_logs",
    "k8s_events",
)
MUTATING_TOOLS: tuple[ToolName, ...] = (
    "k8s_scale",
    "k8s_rollout_restart",
    "k8s_delete_pod",
    "k8s_patch",
    "k8s_apply",
)
ALL_TOOLS: tuple[ToolName, ...] = READ_ONLY_TOOLS + MUTATING_TOOLS
MCP_PREFIX = "mcp:"
# A built-in tool, or a tool of an MCPServer of the run's namespace: mcp:<server>/<tool>,
# or mcp:<server>/* for all the tools the MCPServer offers.
TOOL_REF_PATTERN = (
    r"^(" + "|".join(ALL_TOOLS) + r"|mcp:[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/"
    r"([A-Za-z0-9_.-]{1,128}|\*))$"
)
ToolRef = Annotated[str, Field(pattern=TOOL_REF_PATTERN, max_length=200)]

RunPhase = Literal["Pending", "Running", "AwaitingApproval", "Succeeded", "Failed", "Stopped"]
FINISHED_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed", "Stopped"})
Decision = Literal["Approved", "Denied"]
ApprovalState = Literal["Pending", "Approved", "Denied", "Expired", "Cancelled", "Stale"]

# Go's time.ParseDuration units that make sense for a run: "90s", "1h30m", "250ms".
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
# RFC 1123 subdomain, as Kubernetes requires for object names.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# Operator-minted call ids: "c-" and 12 hex characters.
CALL_ID_PATTERN = r"^c-[0-9a-f]{12}$"
MAX_RUN_NAME = 63
MAX_POLICIES = 100
MAX_MCP_TOOLS = 500
MAX_RESULT_BYTES = 4096


def duration_seconds(text: str) -> float:
    """Go-style duration ("1h30m", "90s", "250ms") in seconds; the CRD pattern checked it."""
    total, number = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text[i : i + 2] == "ms" else ch
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    return total


_SET: JsonDict = {"x-kubernetes-list-type": "set"}
# Marks a field whose default the CRD must not carry (crdgen drops it).
NO_CRD_DEFAULT = "x-agentrun-no-crd-default"
_FREE_FORM: JsonDict = {"x-kubernetes-preserve-unknown-fields": True}


class _Model(BaseModel):
    # camelCase on the wire (Kubernetes convention), snake_case in Python.
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        use_attribute_docstrings=False,
    )


class SecretKeyRef(_Model):
    """A key of a Secret in the run's namespace, read as the run's service account."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="Name of the Secret, in the run's namespace.",
    )
    key: str = Field(
        min_length=1,
        max_length=253,
        description="Key within the Secret whose value is the API key.",
    )


class ModelSpec(_Model):
    """The LLM the run talks to; fields left out take the operator's defaults."""

    provider: Literal["openai"] = Field(
        default="openai",
        description="API flavour. 'openai' means any OpenAI-compatible chat endpoint "
        "(OpenAI, vLLM, Ollama, LiteLLM).",
    )
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Model name sent to the endpoint. Default: the operator's AGENTRUN_MODEL_NAME.",
    )
    base_url: str | None = Field(
        default=None,
        alias="baseURL",
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
        description="Base URL of the OpenAI-compatible API, e.g. http://vllm.ai:8000/v1. "
        "Must match the operator's allow-list (AGENTRUN_MODEL_BASE_URL_ALLOW). "
        "Default: the operator's AGENTRUN_MODEL_BASE_URL.",
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret holding the API key, read with the rights of the run's "
        "service account. Default: the operator's AGENTRUN_MODEL_API_KEY.",
    )
    temperature: float | None = Field(
        default=None,
        ge=0,
        le=2,
        description="Sampling temperature, 0 to 2. Default: the endpoint's own.",
    )


class Approvers(_Model):
    """Who may decide this run's ToolApprovals. Both empty: anyone RBAC lets patch them."""

    users: list[str] = Field(
        default_factory=list,
        max_length=100,
        json_schema_extra=_SET,
        description="User names (as the API server authenticates them) allowed to decide.",
    )
    groups: list[str] = Field(
        default_factory=list,
        max_length=100,
        json_schema_extra=_SET,
        description="Groups whose members are allowed to decide.",
    )


class ApprovalPolicy(_Model):
    """Which tool calls wait for a human, who decides, and what happens on timeout."""

    required: list[ToolRef] = Field(
        default=list(MUTATING_TOOLS),
        max_length=200,
        # No default in the CRD: the API server would write it into the stored spec, and a
        # run that leaves the list unset lets AgentPolicy allow rules waive it.
        json_schema_extra={**_SET, NO_CRD_DEFAULT: True},
        description="Tools whose every call needs an approved ToolApproval before it runs. "
        "Default: every mutating tool (then AgentPolicy allow rules may waive some calls; a "
        "list written here only adds to the policies).",
    )
    approvers: Approvers = Field(
        default_factory=Approvers,
        description="Who may decide. Empty: anyone RBAC lets patch toolapprovals.",
    )
    min_approvals: int = Field(
        default=1,
        ge=1,
        le=10,
        description="Distinct approvers that must approve before a call runs; any denial denies.",
    )
    timeout: str = Field(
        default="1h",
        pattern=DURATION_PATTERN,
        max_length=32,
        description="How long an approval waits for a decision, as a duration like "
        "'30m' or '1h30m'.",
    )
    on_timeout: Literal["deny", "stop"] = Field(
        default="deny",
        description="What an expired approval does: 'deny' continues without the tool, "
        "'stop' stops the run.",
    )
    allow_self_approval: bool = Field(
        default=False,
        description="Whether the run's creator may decide its approvals.",
    )


class Limits(_Model):
    """Bounds on a run; reaching one fails the run with a reason."""

    max_steps: int = Field(
        default=25,
        ge=1,
        le=1000,
        description="Most plan/act/verify steps before the run fails.",
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Most tokens (input plus output, all LLM calls) before the run fails.",
    )
    max_cost_usd: float | None = Field(
        default=None,
        alias="maxCostUSD",
        ge=0,
        description="Most spend in US dollars (from the operator's price table) before the "
        "run fails.",
    )
    timeout: str = Field(
        default="30m",
        pattern=DURATION_PATTERN,
        max_length=32,
        description="Wall-clock bound on the run, excluding time spent waiting for "
        "approval, as a duration like '10m'.",
    )


class RunSettings(_Model):
    """What a run is: everything in its spec but 'stop'. Fixed when the operator first sees
    the run (status.effective); later changes are ignored."""

    goal: str = Field(
        min_length=1,
        max_length=16384,
        description="What the agent should achieve, in plain language.",
    )
    model: ModelSpec = Field(
        default_factory=ModelSpec,
        description="The LLM endpoint and model. Fields left out take operator defaults.",
    )
    tools: list[ToolRef] = Field(
        default=list(READ_ONLY_TOOLS),
        max_length=200,
        json_schema_extra=_SET,
        description="Tools the agent may call: built-in ones (k8s_get, k8s_list, "
        "k8s_describe, k8s_logs, k8s_events, k8s_scale, k8s_rollout_restart, "
        "k8s_delete_pod, k8s_patch, k8s_apply) and MCP tools of an MCPServer of this "
        "namespace (mcp:<server>/<tool>, or mcp:<server>/* for all it offers). Default: "
        "the read-only built-in set.",
    )
    approval: ApprovalPolicy = Field(
        default_factory=ApprovalPolicy,
        description="Which tool calls need a human decision, and who gives it.",
    )
    service_account_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="ServiceAccount in the run's namespace whose rights the tools use "
        "(the operator impersonates it). Empty: the namespace's 'default' account.",
    )
    limits: Limits = Field(
        default_factory=Limits,
        description="Step, token, cost and time bounds.",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        description="Delete the run (and its event stream) this many seconds after it "
        "finishes. Unset: keep it.",
    )


class AgentRunSpec(RunSettings):
    """Desired state of an agent run, written by people or GitOps; only 'stop' may change."""

    stop: bool = Field(
        default=False,
        description="Set true to stop the run at once. The only field that may change "
        "after creation.",
    )


class EffectiveApproval(ApprovalPolicy):
    """The run's approval settings after the AgentPolicies of its namespace."""

    required_by_run: bool = Field(
        default=True,
        description="Whether the run's spec listed approval.required itself (then policy "
        "allow rules cannot waive it); false: the default list, which allow rules may waive.",
    )
    waivable: list[ToolRef] = Field(
        default_factory=list,
        max_length=MAX_MCP_TOOLS,
        json_schema_extra=_SET,
        description="The part of required that AgentPolicy allow rules may waive: the "
        "default list, never what the run listed itself.",
    )
    always_required: list[ToolRef] = Field(
        default_factory=list,
        max_length=MAX_MCP_TOOLS,
        json_schema_extra=_SET,
        description="Tools a policy always gates (tools.requireApproval): no allow rule "
        "waives them.",
    )
    policy_approvers: list[Approvers] = Field(
        default_factory=list,
        max_length=MAX_POLICIES,
        description="Approver lists of the policies; each vote must match every one (and "
        "approvers above).",
    )


class EffectiveSettings(RunSettings):
    """The settings the operator fixed when it first saw the run (spec after defaults and
    the AgentPolicies of its namespace), and the only ones it and the approval webhook use
    from then on."""

    approval: EffectiveApproval = Field(
        default_factory=EffectiveApproval,
        description="Which tool calls need a human decision, and who gives it.",
    )
    policies: list[PolicyRef] = Field(
        default_factory=list,
        max_length=MAX_POLICIES,
        description="The AgentPolicies and ClusterAgentPolicies applied (names, generations).",
    )
    mcp_tools: list[PinnedMCPTool] = Field(
        default_factory=list,
        max_length=MAX_MCP_TOOLS,
        description="The MCP tools the run may call, as their servers offered them when the "
        "run was first seen (a tool whose schema changed since is not offered).",
    )

    service_account_name: str | None = Field(
        default="default",
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="ServiceAccount whose rights the tools use ('default' when the spec left "
        "it empty).",
    )
    generation: int | None = Field(
        default=None, ge=1, description="The spec generation these settings were taken from."
    )


def effective_spec(body: Mapping[str, Any]) -> AgentRunSpec:
    """The run's spec as the operator uses it: status.effective where it was recorded (any
    later edit ignored), else the live spec; 'stop' always from the live spec."""
    spec = body.get("spec") or {}
    effective = (body.get("status") or {}).get("effective")
    if not isinstance(effective, Mapping):
        return AgentRunSpec.model_validate(spec)
    fixed = {k: v for k, v in effective.items() if k != "generation"}
    return AgentRunSpec.model_validate({**fixed, "stop": bool(spec.get("stop"))})


def effective_approval(body: Mapping[str, Any]) -> EffectiveApproval:
    """The run's approval settings as fixed in status.effective (with what its policies
    added), else from the live spec (a run not yet seen: no policy applied yet)."""
    effective = (body.get("status") or {}).get("effective")
    if isinstance(effective, Mapping):
        return EffectiveApproval.model_validate(effective.get("approval") or {})
    return EffectiveApproval.model_validate(((body.get("spec") or {}).get("approval")) or {})


def effective_mcp_tools(body: Mapping[str, Any]) -> list[PinnedMCPTool]:
    """The MCP tools pinned in status.effective when the run was first seen."""
    effective = (body.get("status") or {}).get("effective")
    if not isinstance(effective, Mapping):
        return []
    return [PinnedMCPTool.model_validate(t) for t in effective.get("mcpTools") or []]


def effective_settings(spec: AgentRunSpec, *, generation: int | None) -> dict[str, Any]:
    """status.effective for a spec: every setting after defaults, as JSON."""
    fixed = spec.model_dump(by_alias=True, mode="json", exclude={"stop"}, exclude_none=True)
    fixed["serviceAccountName"] = spec.service_account_name or "default"
    return {**fixed, "generation": generation}


class Condition(_Model):
    """A standard Kubernetes condition."""

    type: str = Field(max_length=316, description="Type of condition, e.g. Ready.")
    status: Literal["True", "False", "Unknown"] = Field(
        description="Status of the condition: True, False or Unknown."
    )
    reason: str = Field(
        default="",
        max_length=1024,
        description="One-word CamelCase reason for the last transition.",
    )
    message: str = Field(
        default="",
        max_length=32768,
        description="Human-readable detail about the last transition.",
    )
    last_transition_time: datetime | None = Field(
        default=None, description="When the status last changed."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The spec generation this condition reflects."
    )


class Usage(_Model):
    """Token, cost and latency totals of the run's LLM and tool calls."""

    input_tokens: int = Field(default=0, ge=0, description="Prompt tokens, all LLM calls.")
    output_tokens: int = Field(default=0, ge=0, description="Completion tokens, all LLM calls.")
    total_tokens: int = Field(default=0, ge=0, description="Input plus output tokens.")
    cached_tokens: int = Field(
        default=0, ge=0, description="Prompt tokens the endpoint served from its cache."
    )
    cost_usd: float = Field(
        default=0, alias="costUSD", ge=0, description="Spend in US dollars, from the price table."
    )
    ttft_ms: int | None = Field(
        default=None,
        ge=0,
        description="Time to first token of the first LLM call, in milliseconds.",
    )
    llm_calls: int = Field(default=0, ge=0, description="LLM calls made.")
    tool_calls: int = Field(default=0, ge=0, description="Tool calls made.")

    def add_call(self, call: CallUsage) -> None:
        """Count one LLM call in the totals."""
        self.input_tokens += call.input_tokens
        self.output_tokens += call.output_tokens
        self.total_tokens = self.input_tokens + self.output_tokens
        self.cached_tokens += call.cached_tokens
        self.cost_usd = round(self.cost_usd + call.cost_usd, 8)
        self.llm_calls += 1
        if self.ttft_ms is None:
            self.ttft_ms = call.ttft_ms

    def as_status(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)

    @classmethod
    def from_status(cls, body: Mapping[str, Any] | None) -> Usage:
        """The totals a status (or a metrics event's ``total``) carries; zero when absent
        or unreadable."""
        body = body or {}

        def number(key: str, kind: type[int] | type[float]) -> Any:
            try:
                return max(kind(body.get(key) or 0), 0)
            except (TypeError, ValueError):
                return kind(0)

        ttft = body.get("ttftMs")
        usage = cls(
            input_tokens=number("inputTokens", int),
            output_tokens=number("outputTokens", int),
            cached_tokens=number("cachedTokens", int),
            cost_usd=number("costUSD", float),
            ttft_ms=ttft if isinstance(ttft, int) and ttft >= 0 else None,
            llm_calls=number("llmCalls", int),
            tool_calls=number("toolCalls", int),
        )
        usage.total_tokens = usage.input_tokens + usage.output_tokens
        return usage


@dataclass
class CallUsage:
    """One LLM call's figures, as its `metrics` event carries them (``Usage`` adds them up)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    ttft_ms: int | None = None
    ttr_ms: int = 0


class AgentRunStatus(_Model):
    """Observed state of the run, written only by the operator."""

    phase: RunPhase | None = Field(
        default=None,
        description="Pending, Running, AwaitingApproval, Succeeded, Failed or Stopped.",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="Standard conditions (Queued, Running, AwaitingApproval, Finished...).",
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The spec generation the operator last acted on."
    )
    started_at: datetime | None = Field(default=None, description="When the run started.")
    finished_at: datetime | None = Field(default=None, description="When the run finished.")
    step: int | None = Field(default=None, ge=0, description="Current workflow step.")
    pending_approvals: list[str] = Field(
        default_factory=list,
        description="Names of the ToolApprovals this run is waiting for.",
    )
    pending_approval_count: int | None = Field(
        default=None, ge=0, description="How many ToolApprovals this run is waiting for."
    )
    usage: Usage | None = Field(default=None, description="Token, cost and latency totals.")
    effective: EffectiveSettings | None = Field(
        default=None,
        description="The settings fixed when the operator first saw the run; the operator "
        "and the approval webhook use only these (later spec edits are ignored).",
    )
    created_by: str | None = Field(
        default=None, description="User who created the run, as the API server authenticated."
    )
    stopped_by: str | None = Field(
        default=None, description="User who set spec.stop, as the API server authenticated."
    )
    last_event_id: str | None = Field(
        default=None, description="Id of the last event written to the run's stream."
    )
    stream_path: str | None = Field(
        default=None, description="Path of the run's SSE stream on the agentrun server."
    )
    worker: str | None = Field(
        default=None,
        max_length=253,
        description="The operator process (AGENTRUN_OPERATOR_ID: a worker's pod name) that "
        "executes the run now or did last.",
    )
    trace_id: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{32}$",
        description="The run's OpenTelemetry trace id (when the operator exports traces): "
        "one trace for the whole run, also across operator restarts.",
    )
    result: str | None = Field(
        default=None,
        max_length=MAX_RESULT_BYTES,
        description="The agent's final answer (at most 4 KiB; the full text is in the stream).",
    )
    message: str | None = Field(
        default=None, max_length=32768, description="Human-readable summary of the state."
    )


class UserInfo(_Model):
    """An identity as the API server authenticated it (from an admission request)."""

    username: str = Field(description="User name.")
    groups: list[str] = Field(default_factory=list, description="Groups of the user.")


class Vote(_Model):
    """One person's decision on a ToolApproval, recorded by the admission webhook."""

    username: str = Field(description="Who decided, as the API server authenticated.")
    groups: list[str] = Field(default_factory=list, description="Their groups.")
    decision: Decision = Field(description="Approved or Denied.")
    comment: str = Field(default="", max_length=2048, description="Their note to the agent.")
    at: datetime = Field(description="When the decision was admitted.")


class ToolApprovalSpec(_Model):
    """A tool call waiting for a human decision. Written by the operator, decided by people."""

    run_name: str = Field(
        min_length=1, max_length=MAX_RUN_NAME, description="The AgentRun that made the call."
    )
    call_id: str = Field(
        pattern=CALL_ID_PATTERN,
        description="Operator-minted id of the call ('c-' and 12 hex characters).",
    )
    tool: str = Field(
        pattern=r"^[a-zA-Z0-9_-]{1,64}$",
        description="The tool the agent wants to call: a built-in one (k8s_scale...) or an "
        "MCP tool as the model sees it (<server>__<tool>).",
    )
    server: str | None = Field(
        default=None,
        max_length=63,
        description="For an MCP tool: the MCPServer (in the run's namespace) it belongs to.",
    )
    arguments: dict[str, Any] = Field(
        default_factory=dict,
        json_schema_extra=_FREE_FORM,
        description="The call's arguments, as the agent gave them.",
    )
    reason: str = Field(
        default="", max_length=16384, description="Why the agent wants to make the call."
    )
    decision: Decision | None = Field(
        default=None,
        description="Set to Approved or Denied to decide: kubectl patch ta NAME --type merge "
        '-p \'{"spec":{"decision":"Approved"}}\'.',
    )
    comment: str | None = Field(
        default=None, max_length=2048, description="Optional note passed to the agent."
    )
    decided_by: UserInfo | None = Field(
        default=None,
        description="Who decided; written by the admission webhook, never by clients.",
    )
    votes: list[Vote] = Field(
        default_factory=list,
        max_length=100,
        description="Every decision so far; appended by the admission webhook.",
    )
    rule: RuleMatch | None = Field(
        default=None,
        description="The AgentPolicy rule that asked for this approval, and why (none: the "
        "run's own spec.approval.required did).",
    )


MAX_PREVIEW_CHANGES = 20
MAX_PREVIEW_VALUE = 300


class PreviewTarget(_Model):
    """The object a call changes, as it was when the preview was computed."""

    api_version: str = Field(description="Its apiVersion.")
    kind: str = Field(description="Its kind.")
    namespace: str | None = Field(default=None, description="Its namespace (none: cluster).")
    name: str = Field(description="Its name.")
    uid: str | None = Field(default=None, description="Its uid (none: it does not exist yet).")
    resource_version: str | None = Field(
        default=None, description="Its resourceVersion when the preview was computed."
    )
    generation: int | None = Field(
        default=None, description="Its metadata.generation, where the object keeps one."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Its labels (at most 32), as policy rules see them."
    )


class PreviewChange(_Model):
    """One field the call changes: its JSON path, the value before and after (JSON text,
    capped; Secret values shown as <redacted>; absent: the field does not exist)."""

    path: str = Field(max_length=1024, description="The field, e.g. spec.replicas.")
    before: str | None = Field(
        default=None, max_length=MAX_PREVIEW_VALUE + 16, description="The value now (JSON)."
    )
    after: str | None = Field(
        default=None, max_length=MAX_PREVIEW_VALUE + 16, description="The value after (JSON)."
    )


MAX_RULE_CHANGES = 1000


class Preview(_Model):
    """What the call would change, from a server-side dry run (dryRun=All) as the run's
    service account, computed before anyone is asked."""

    # Every changed field (up to MAX_RULE_CHANGES), for the policy rules: people see the
    # first MAX_PREVIEW_CHANGES; the rules must see what lies beyond them too. Never stored.
    _every_change: list[PreviewChange] | None = PrivateAttr(default=None)

    def every_change(self) -> list[PreviewChange]:
        return self._every_change if self._every_change is not None else self.changes

    def with_every_change(self, changes: list[PreviewChange]) -> Preview:
        self._every_change = changes[:MAX_RULE_CHANGES]
        return self

    summary: str = Field(
        max_length=300, description="One line for people, e.g. 'spec.replicas 1→3'."
    )
    target: PreviewTarget | None = Field(default=None, description="The object it changes.")
    changes: list[PreviewChange] = Field(
        default_factory=list,
        max_length=MAX_PREVIEW_CHANGES,
        description=f"The changed fields (at most {MAX_PREVIEW_CHANGES}).",
    )
    more_changes: int = Field(
        default=0, ge=0, description="How many more fields change than are listed."
    )
    operation: Literal["create", "update", "delete"] = Field(
        description="create (the object does not exist yet), update or delete."
    )
    owner: str | None = Field(
        default=None, description="For a deletion: the controller that owns the object."
    )
    replaced: bool | None = Field(
        default=None,
        description="For a deletion: whether its controller will create a replacement.",
    )
    approximate: bool = Field(
        default=False,
        description="Computed locally: an admission webhook of the cluster does not "
        "support dry run, so the server could not compute it.",
    )


class ToolApprovalStatus(_Model):
    """Observed state of the approval, written only by the operator."""

    preview: Preview | None = Field(
        default=None, description="What the call would change (server-side dry run)."
    )

    state: ApprovalState | None = Field(
        default=None,
        description="Pending, Approved, Denied, Expired, Cancelled, or Stale (approved, but "
        "its target changed before the call ran: nothing ran).",
    )
    decided_by: UserInfo | None = Field(default=None, description="Who settled the approval.")
    decided_at: datetime | None = Field(default=None, description="When it was settled.")
    expires_at: datetime | None = Field(
        default=None, description="When it expires if nobody decides."
    )
    approvals: int | None = Field(default=None, ge=0, description="Approving votes so far.")
    approvals_needed: int | None = Field(
        default=None, ge=0, description="Approving votes still needed."
    )
    message: str | None = Field(default=None, description="Human-readable detail.")


# -- AgentPolicy and ClusterAgentPolicy (admin-owned; a run can only tighten them) --------

PolicyAction = Literal["allow", "require", "deny"]
MAX_RULES = 100
MAX_RULE_EXPRESSION = 2048
# A tool name or a pattern with '*' (any characters): k8s_get, k8s_*, mcp:*/read_*.
TOOL_PATTERN = r"^[A-Za-z0-9_:/.*-]{1,200}$"
RULE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
ToolPattern = Annotated[str, Field(pattern=TOOL_PATTERN)]
AccountName = Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]


class PolicyTools(_Model):
    """Which tools runs may use, and which are always gated."""

    allowed: list[ToolPattern] | None = Field(
        default=None,
        max_length=200,
        json_schema_extra=_SET,
        description="Tools runs may list in spec.tools: names or patterns with '*' "
        "(k8s_get, k8s_*, mcp:*/read_*). A run naming any other tool is refused at "
        "admission. Unset: any tool.",
    )
    require_approval: list[ToolPattern] = Field(
        default_factory=list,
        max_length=200,
        json_schema_extra=_SET,
        description="Tools (names or patterns) whose every call needs an approval, whatever "
        "the run's spec.approval.required says and whatever an allow rule says.",
    )


class PolicyApproval(_Model):
    """Floors for the approval settings of runs."""

    min_approvals: int | None = Field(
        default=None,
        ge=1,
        le=10,
        description="Floor for spec.approval.minApprovals: a run asking for fewer gets this.",
    )
    approvers: Approvers | None = Field(
        default=None,
        description="Who may approve here. A run's spec.approval.approvers can only narrow "
        "it: every vote must match both lists. A run whose list cannot overlap is refused.",
    )
    allow_self_approval: bool | None = Field(
        default=None,
        description="false forces spec.approval.allowSelfApproval off for every run here.",
    )
    max_timeout: str | None = Field(
        default=None,
        pattern=DURATION_PATTERN,
        max_length=32,
        description="Cap on spec.approval.timeout, as a duration like '30m'.",
    )


class PolicyLimits(_Model):
    """Caps on the limits of runs: a run asking for more (or for no limit) gets the cap."""

    max_steps: int | None = Field(
        default=None, ge=1, le=1000, description="Cap on spec.limits.maxSteps."
    )
    max_tokens: int | None = Field(default=None, ge=1, description="Cap on spec.limits.maxTokens.")
    max_cost_usd: float | None = Field(
        default=None, alias="maxCostUSD", ge=0, description="Cap on spec.limits.maxCostUSD."
    )
    timeout: str | None = Field(
        default=None,
        pattern=DURATION_PATTERN,
        max_length=32,
        description="Cap on spec.limits.timeout, as a duration like '1h'.",
    )


class PolicyModels(_Model):
    """Which model endpoints runs may talk to."""

    base_urls: list[str] | None = Field(
        default=None,
        alias="baseURLs",
        max_length=50,
        json_schema_extra=_SET,
        description="Allowed prefixes of the model's base URL (scheme, host, port and whole "
        "path segments must match). A run whose endpoint is elsewhere is refused. Unset: "
        "any endpoint the operator allows.",
    )


class PolicyRule(_Model):
    """A rule judged for every tool call: when its CEL expression is true, its action
    applies. Across all matching rules deny beats require beats allow."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=RULE_NAME_PATTERN,
        description="The rule's name, unique in the policy; shown on the ToolApprovals it "
        "asks for (spec.rule).",
    )
    when: str = Field(
        min_length=1,
        max_length=MAX_RULE_EXPRESSION,
        description="A CEL expression of type bool over: tool (string), args (map), run "
        "{namespace, name, createdBy, serviceAccount}, target (the dry run's object: "
        "apiVersion, kind, namespace, name, uid, labels, operation, owner, ownerKind, "
        "approximate, changes [{path, before, after}] with values as JSON text; null for "
        "read-only calls), namespaceObject.metadata {name, labels} (the namespace the call "
        "acts in) and now (timestamp). Compiled when the policy is admitted; an evaluation "
        "error counts as require, never allow.",
    )
    action: PolicyAction = Field(
        description="allow: no person needed (unless another rule or the run asks); require: "
        "a person must approve; deny: the call fails as a tool error and nobody is asked."
    )
    min_approvals: int | None = Field(
        default=None,
        ge=1,
        le=10,
        description="For require: distinct approvals needed (the highest of all matching "
        "rules and the run's own applies).",
    )
    approvers: Approvers | None = Field(
        default=None,
        description="For require: who may approve such calls; each vote must match every "
        "matching rule's approvers.",
    )
    message: str = Field(
        default="",
        max_length=1024,
        description="Why: shown to approvers (ToolApproval spec.rule) and to the agent.",
    )


class AgentPolicySpec(_Model):
    """Rules admins set for the agent runs of a namespace; all policies apply, the strictest
    wins, and a run can only tighten them."""

    tools: PolicyTools = Field(
        default_factory=PolicyTools, description="Allowed and always-gated tools."
    )
    approval: PolicyApproval = Field(
        default_factory=PolicyApproval, description="Floors for the runs' approval settings."
    )
    limits: PolicyLimits = Field(
        default_factory=PolicyLimits, description="Caps on the runs' limits."
    )
    endpoints: PolicyModels = Field(
        default_factory=PolicyModels, alias="models", description="Allowed model endpoints."
    )
    service_accounts: list[AccountName] | None = Field(
        default=None,
        max_length=200,
        json_schema_extra=_SET,
        description="Service accounts runs may act as (spec.serviceAccountName; 'default' "
        "when empty). A run naming another is refused. Unset: any the creator may use.",
    )
    rules: list[PolicyRule] = Field(
        default_factory=list,
        max_length=MAX_RULES,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="Rules judged for every tool call, as the policy is at the time of the call.",
    )


class LabelSelectorRequirement(_Model):
    """One requirement of a label selector."""

    key: str = Field(min_length=1, max_length=317, description="The label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="In, NotIn, Exists or DoesNotExist."
    )
    values: list[str] = Field(
        default_factory=list, max_length=100, description="Values for In and NotIn."
    )


class LabelSelector(_Model):
    """A Kubernetes label selector."""

    match_labels: dict[str, str] = Field(
        default_factory=dict, description="Labels that must all be present with these values."
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=20, description="Requirements that must all hold."
    )


class ClusterAgentPolicySpec(AgentPolicySpec):
    """An AgentPolicy for every namespace its selector matches."""

    namespace_selector: LabelSelector | None = Field(
        default=None,
        description="Namespaces (by their labels) this policy applies to. Unset: all.",
    )


class PolicyRef(_Model):
    """A policy that shaped a run's settings."""

    kind: Literal["AgentPolicy", "ClusterAgentPolicy"] = Field(description="Its kind.")
    name: str = Field(description="Its name (namespaced ones live in the run's namespace).")
    generation: int | None = Field(default=None, description="Its generation when applied.")


class RuleMatch(_Model):
    """The policy rule that asked for an approval, and why."""

    policy: str = Field(
        description="The policy, e.g. 'AgentPolicy guard' or 'ClusterAgentPolicy x'."
    )
    name: str = Field(description="The rule's name.")
    message: str = Field(default="", description="The rule's message.")
    min_approvals: int | None = Field(
        default=None, ge=1, le=10, description="Approvals needed, from the matching rules."
    )
    approvers: list[Approvers] = Field(
        default_factory=list,
        max_length=MAX_RULES,
        description="Approver lists of the matching rules; each vote must match every one.",
    )


# -- MCPServer: a Model Context Protocol tool server runs may use --------------------------

MCP_SERVER_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
HEADER_NAME_PATTERN = r"^[A-Za-z0-9-]{1,128}$"


class PinnedMCPTool(_Model):
    """An MCP tool a run may call, pinned when the run was first seen."""

    server: str = Field(max_length=63, description="The MCPServer (in the run's namespace).")
    name: str = Field(max_length=128, description="The tool's name on the server.")
    function: str = Field(
        max_length=64, description="The function name the model sees: <server>__<tool>."
    )
    schema_hash: str = Field(max_length=80, description="sha256 of its input schema.")
    read_only: bool = Field(default=False, description="The server says it changes nothing.")
    approval: Literal["required", "never"] | None = Field(
        default=None, description="The MCPServer's spec.approval for it, if any."
    )

    @property
    def ref(self) -> str:
        return f"{MCP_PREFIX}{self.server}/{self.name}"


class MCPHeader(_Model):
    """An HTTP header sent to the server, its value from a Secret."""

    name: str = Field(pattern=HEADER_NAME_PATTERN, description="The header's name, e.g. X-Api-Key.")
    secret_key_ref: SecretKeyRef = Field(
        description="The Secret key holding its value, read as the run's service account "
        "(as discoveryServiceAccountName when no run is involved)."
    )


class MCPServerSpec(_Model):
    """A Model Context Protocol server whose tools runs of this namespace may use (named in
    spec.tools as mcp:<server>/<tool> or mcp:<server>/*), behind agentrun's approvals,
    stream and stop. Written by the agentrun-mcp-admin role only: it decides where a run's
    token goes."""

    url: str = Field(
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
        description="The server's endpoint, e.g. http://prometheus-mcp.monitoring:8080/mcp. "
        "Must match the operator's allow-list (AGENTRUN_MCP_URL_ALLOW).",
    )
    transport: Literal["streamable-http", "sse"] = Field(
        default="streamable-http",
        description="streamable-http (the current MCP transport) or sse (the older HTTP+SSE).",
    )
    auth: Literal["none", "serviceAccountToken"] = Field(
        default="none",
        description="none, or serviceAccountToken: each call carries a short-lived token of "
        "the run's service account (TokenRequest, 10 minutes), so a Kubernetes-aware server "
        "acts with exactly the run's rights. Never logged or checkpointed.",
    )
    audiences: list[str] = Field(
        default_factory=list,
        max_length=10,
        json_schema_extra=_SET,
        description="Audiences of the serviceAccountToken. Empty: the API server's own, so "
        "the server can pass the token on to Kubernetes.",
    )
    headers: list[MCPHeader] = Field(
        default_factory=list,
        max_length=20,
        description="Headers sent with every request, their values from Secrets.",
    )
    discovery_service_account_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="The service account whose identity lists the tools when no run is "
        "involved (its token and header Secrets). Empty: the namespace's 'default'.",
    )
    tools: list[ToolPattern] = Field(
        default_factory=lambda: ["*"],
        max_length=200,
        json_schema_extra=_SET,
        description="Which of the server's tools runs may use: names or patterns with '*'. "
        "Default: all.",
    )
    approval: dict[str, Literal["required", "never"]] = Field(
        default_factory=dict,
        description="Per tool (name or pattern): 'required' or 'never', overriding the "
        "server's hints. Default: a tool annotated readOnlyHint runs freely, any other "
        "waits for approval (AgentPolicies may tighten either).",
    )
    timeout: str = Field(
        default="60s",
        pattern=DURATION_PATTERN,
        max_length=32,
        description="How long one tool call may take, as a duration like '2m'.",
    )


class MCPToolAnnotations(_Model):
    """The hints the server gives about a tool (MCP tool annotations)."""

    title: str | None = Field(default=None, max_length=256, description="A human title.")
    read_only_hint: bool | None = Field(default=None, description="It changes nothing.")
    destructive_hint: bool | None = Field(default=None, description="It may destroy data.")
    idempotent_hint: bool | None = Field(default=None, description="Repeating it is harmless.")
    open_world_hint: bool | None = Field(
        default=None, description="It reaches beyond the server's own domain."
    )


class MCPTool(_Model):
    """One tool the server offers."""

    name: str = Field(max_length=128, description="Its name on the server.")
    description: str = Field(default="", max_length=4096, description="What it does.")
    annotations: MCPToolAnnotations = Field(
        default_factory=MCPToolAnnotations, description="The server's hints."
    )
    input_schema: dict[str, Any] = Field(
        default_factory=dict,
        json_schema_extra=_FREE_FORM,
        description="The JSON Schema of its arguments.",
    )
    schema_hash: str = Field(
        max_length=80, description="sha256 of its input schema: runs pin it at first sight."
    )


class MCPServerStatus(_Model):
    """What the operator found at the server."""

    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="Ready: the server answered and listed its tools.",
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The spec generation the status reflects."
    )
    tools: list[MCPTool] = Field(
        default_factory=list,
        max_length=MAX_MCP_TOOLS,
        description="The tools runs may use (the server's, filtered by spec.tools).",
    )
    tool_count: int | None = Field(default=None, ge=0, description="How many tools there are.")
    server_name: str | None = Field(
        default=None, max_length=256, description="The name and version the server reports."
    )
    last_error: str | None = Field(
        default=None, max_length=4096, description="The last failure to reach or list it."
    )
    refreshed_at: datetime | None = Field(
        default=None, description="When the tools were last listed."
    )
