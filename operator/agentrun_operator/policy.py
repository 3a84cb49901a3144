"""AgentPolicy and ClusterAgentPolicy, judged: which apply where, what they make of a run's
settings, and what their rules say about one tool call.

Owns the policy semantics of DESIGN.md ("AgentPolicy"): a run can only tighten what its
namespace's policies allow (``tighten``, at admission and when the operator first sees a
run), and each tool call is judged by the rules as they are now (``judge``: deny beats
require beats allow; a rule that fails to evaluate counts as require, never allow).
CEL is Google's cel-cpp (``cel_expr_python``): expressions are type-checked when a policy is
admitted (``check``), and evaluation is bounded by the library's iteration budget (10,000
comprehension steps), its recursion limit (32), RE2 regular expressions, the expression
length (``models.MAX_RULE_EXPRESSION``) and the size of what a rule sees (``MAX_ARGS_BYTES``).
Pure: no I/O, no kopf, no Kubernetes client, no Redis.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cel_expr_python import cel

from agentrun_operator import approvals, models

KINDS = ("AgentPolicy", "ClusterAgentPolicy")
# A call whose arguments are bigger than this is judged with them missing (a rule reading
# them errors, and an error counts as require): no rule ever walks an unbounded value.
MAX_ARGS_BYTES = 16384

_T = cel.Type
VARIABLES = {
    "tool": _T.STRING,
    "args": _T.Map(_T.STRING, _T.DYN),
    "run": _T.Map(_T.STRING, _T.DYN),
    "target": _T.DYN,
    # Not "namespace": a reserved word in CEL. Named and shaped as in Kubernetes'
    # ValidatingAdmissionPolicy: namespaceObject.metadata.{name, labels}.
    "namespaceObject": _T.Map(_T.STRING, _T.DYN),
    "now": _T.TIMESTAMP,
}


@functools.cache
def _env() -> cel.Env:
    return cel.NewEnv(variables=VARIABLES)


class RuleError(Exception):
    """A rule's expression does not compile, or is not a condition."""


@functools.lru_cache(maxsize=4096)
def compile_rule(expression: str) -> cel.Expression:
    """The compiled, type-checked expression; RuleError says what is wrong, where."""
    if len(expression) > models.MAX_RULE_EXPRESSION:
        raise RuleError(
            f"is {len(expression)} characters; at most {models.MAX_RULE_EXPRESSION} are allowed"
        )
    try:
        compiled = _env().compile(expression)
    except RuntimeError as e:
        raise RuleError(_cel_message(e)) from None
    kind = compiled.return_type()
    if kind != _T.BOOL and kind != _T.DYN:
        raise RuleError(f"is of type {kind.name().lower()}; a rule's 'when' must be a bool")
    return compiled


def _cel_message(e: BaseException) -> str:
    """cel-cpp's error without its status codes and source excerpts: 'at 1:4: ...'."""
    text = str(e)
    for prefix in ("INVALID_ARGUMENT: ", "CANCELLED: ", "INTERNAL: ", "UNKNOWN: "):
        text = text.removeprefix(prefix)
    said = [
        line.removeprefix("ERROR: ").replace("<input>:", "at ").replace(" (in container '')", "")
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("|")
    ]
    text = "; ".join(said)
    for code in ("INVALID_ARGUMENT", "CANCELLED", "INTERNAL", "UNKNOWN", "NOT_FOUND"):
        text = text.replace(f" [{code}]", "")
    return " ".join(text.split())[:500]


def check(spec: Mapping[str, Any]) -> list[str]:
    """What is wrong with a policy's spec (empty: nothing), each naming the field and rule."""
    problems: list[str] = []
    seen: set[str] = set()
    for i, rule in enumerate(spec.get("rules") or []):
        if not isinstance(rule, Mapping):
            continue  # the schema refuses it, naming the field
        name = str(rule.get("name") or "")
        where = f"spec.rules[{i}] ({name})" if name else f"spec.rules[{i}]"
        if name in seen:
            problems.append(f"{where}: the name is used by another rule of this policy")
        seen.add(name)
        try:
            compile_rule(str(rule.get("when") or ""))
        except RuleError as e:
            problems.append(f"{where}.when {e}")
        action = rule.get("action")
        for key in ("minApprovals", "approvers"):
            if rule.get(key) is not None and action != "require":
                problems.append(f"{where}.{key} applies only to action 'require' (not {action})")
    return problems


# -- which policies apply --------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    kind: str
    name: str
    namespace: str | None
    generation: int | None
    spec: models.ClusterAgentPolicySpec

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Policy:
        meta = body.get("metadata") or {}
        return cls(
            kind=str(body.get("kind") or "AgentPolicy"),
            name=str(meta.get("name") or ""),
            namespace=meta.get("namespace"),
            generation=meta.get("generation"),
            spec=models.ClusterAgentPolicySpec.model_validate(body.get("spec") or {}),
        )

    @property
    def label(self) -> str:
        """How messages name it: 'AgentPolicy team-a/guard', 'ClusterAgentPolicy base'."""
        if self.namespace:
            return f"{self.kind} {self.namespace}/{self.name}"
        return f"{self.kind} {self.name}"

    def ref(self) -> models.PolicyRef:
        return models.PolicyRef.model_validate(
            {"kind": self.kind, "name": self.name, "generation": self.generation}
        )


def applicable(
    bodies: Iterable[Mapping[str, Any]], namespace_labels: Mapping[str, str]
) -> list[Policy]:
    """The policies that apply in a namespace: its AgentPolicies (the caller lists those of
    the namespace) and the ClusterAgentPolicies whose namespaceSelector matches its labels."""
    found = []
    for body in bodies:
        policy = Policy.of(body)
        if policy.kind == "ClusterAgentPolicy" and not selects(
            policy.spec.namespace_selector, namespace_labels
        ):
            continue
        found.append(policy)
    return sorted(found, key=lambda p: (p.kind, p.name))


def selects(selector: models.LabelSelector | None, labels: Mapping[str, str]) -> bool:
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in selector.match_labels.items()):
        return False
    for req in selector.match_expressions:
        present = req.key in labels
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
        if req.operator == "In" and labels.get(req.key) not in req.values:
            return False
        if req.operator == "NotIn" and present and labels.get(req.key) in req.values:
            return False
    return True


def tool_matches(tool: str, patterns: Iterable[str]) -> bool:
    """Whether a tool name matches a name or a pattern with '*' (the schema allows no other
    wildcard characters)."""
    return any(fnmatch.fnmatchcase(tool, p) for p in patterns)


# -- static settings: a run can only tighten them ---------------------------------------------


class Refused(Exception):
    """A run asks for what a policy forbids; the message names the field, the policy and
    the fix."""


@dataclass
class Tightened:
    spec: models.AgentRunSpec
    required_by_run: bool
    policy_approvers: list[models.Approvers]
    policies: list[models.PolicyRef]
    always: list[str] = field(default_factory=list)
    waivable: list[str] = field(default_factory=list)
    clamped: list[str] = field(default_factory=list)
    mcp_tools: list[models.PinnedMCPTool] = field(default_factory=list)

    def effective(self, *, generation: int | None) -> dict[str, Any]:
        """status.effective: the tightened settings and what shaped them."""
        fixed = models.effective_settings(self.spec, generation=generation)
        fixed["approval"]["requiredByRun"] = self.required_by_run
        if self.always:
            fixed["approval"]["alwaysRequired"] = list(self.always)
        if self.waivable:
            fixed["approval"]["waivable"] = list(self.waivable)
        if self.policy_approvers:
            fixed["approval"]["policyApprovers"] = [
                a.model_dump(by_alias=True) for a in self.policy_approvers
            ]
        if self.policies:
            fixed["policies"] = [
                p.model_dump(by_alias=True, exclude_none=True) for p in self.policies
            ]
        if self.mcp_tools:
            fixed["mcpTools"] = [
                t.model_dump(by_alias=True, exclude_none=True) for t in self.mcp_tools
            ]
        return fixed


def tighten(
    raw_spec: Mapping[str, Any],
    policies: list[Policy],
    *,
    default_base_url: str | None = None,
    mcp_tools: list[models.PinnedMCPTool] | None = None,
) -> Tightened:
    """A run's settings after its namespace's policies. Raises Refused for what a policy
    forbids (a tool, a model endpoint, a service account, approvers nobody could match);
    clamps what it asks too little of (approvals, timeouts, limits), and says so."""
    spec = models.AgentRunSpec.model_validate(raw_spec)
    asked = raw_spec.get("approval")
    required_by_run = isinstance(asked, Mapping) and "required" in asked
    out = Tightened(
        spec=spec,
        required_by_run=required_by_run,
        policy_approvers=[],
        policies=[p.ref() for p in policies],
        mcp_tools=list(mcp_tools or []),
    )
    for p in policies:
        _forbidden(spec, p, default_base_url)
    approval = spec.approval
    if not required_by_run:
        # The default list: where the namespace's policies say so, allow rules waive it.
        out.waivable = list(approval.required)
    elif policies:
        # A list the run wrote only adds to what the policies decide (the default list,
        # less what allow rules waive); what it names itself is never waived.
        own = list(approval.required)
        added: list[str] = [t for t in models.MUTATING_TOOLS if not tool_matches(t, own)]
        for t in added:
            if t in spec.tools:
                out.clamped.append(
                    f"spec.approval.required (+{t}) not gated → gated unless a policy rule "
                    "allows it (a run's list only adds to its namespace's policies)"
                )
        approval.required = [*own, *added]
        out.waivable = added
    for p in policies:
        _clamp(out, p)
    return out


def _forbidden(spec: models.AgentRunSpec, p: Policy, default_base_url: str | None) -> None:
    allowed = p.spec.tools.allowed
    if allowed is not None:
        for tool in spec.tools:
            if not tool_matches(tool, allowed):
                raise Refused(
                    f"spec.tools: {tool} is not allowed by {p.label} (tools.allowed: "
                    f"{', '.join(allowed) or 'none'}); remove it from the run or ask the "
                    "policy's admin"
                )
    account = spec.service_account_name or "default"
    if p.spec.service_accounts is not None and account not in p.spec.service_accounts:
        raise Refused(
            f"spec.serviceAccountName: {account} is not allowed by {p.label} "
            f"(serviceAccounts: {', '.join(p.spec.service_accounts) or 'none'}); use one of "
            "those or ask the policy's admin"
        )
    prefixes = p.spec.endpoints.base_urls
    url = spec.model.base_url or default_base_url
    if prefixes is not None and url and not approvals.base_url_allowed(url, prefixes):
        field_name = (
            "spec.model.baseURL" if spec.model.base_url else "the operator's default model endpoint"
        )
        raise Refused(
            f"{field_name} {url} is not allowed by {p.label} (models.baseURLs: "
            f"{', '.join(prefixes) or 'none'}); use one of those or ask the policy's admin"
        )
    mine, theirs = spec.approval.approvers, p.spec.approval.approvers
    if (
        theirs is not None
        and (mine.users or mine.groups)
        and (theirs.users or theirs.groups)
        and not mine.groups
        and not theirs.groups
        and not set(mine.users) & set(theirs.users)
    ):
        raise Refused(
            f"spec.approval.approvers: none of users {mine.users} may approve under {p.label} "
            f"(approval.approvers: users {theirs.users}); a run's approvers can only narrow "
            "the policy's"
        )


def _clamp(out: Tightened, p: Policy) -> None:
    spec, pol = out.spec, p.spec

    def said(what: str, old: Any, new: Any) -> None:
        out.clamped.append(f"{what} {_shown(old)} → {_shown(new)} ({p.label})")

    approval = spec.approval
    if (
        pol.approval.min_approvals is not None
        and approval.min_approvals < pol.approval.min_approvals
    ):
        said("spec.approval.minApprovals", approval.min_approvals, pol.approval.min_approvals)
        approval.min_approvals = pol.approval.min_approvals
    if pol.approval.allow_self_approval is False and approval.allow_self_approval:
        said("spec.approval.allowSelfApproval", True, False)
        approval.allow_self_approval = False
    if pol.approval.max_timeout is not None and models.duration_seconds(
        approval.timeout
    ) > models.duration_seconds(pol.approval.max_timeout):
        said("spec.approval.timeout", approval.timeout, pol.approval.max_timeout)
        approval.timeout = pol.approval.max_timeout
    theirs = pol.approval.approvers
    if theirs is not None and (theirs.users or theirs.groups):
        out.policy_approvers.append(theirs)
    # Built-in tools, and the MCP tools the run was given (mcp:<server>/<tool>).
    known = [*models.ALL_TOOLS, *(t.ref for t in out.mcp_tools)]
    always = [t for t in known if tool_matches(t, pol.tools.require_approval)]
    for t in always:
        if t not in approval.required and (t in spec.tools or t.startswith(models.MCP_PREFIX)):
            said(f"spec.approval.required (+{t})", "not gated", "gated")
    approval.required = [*approval.required, *(t for t in always if t not in approval.required)]
    out.always += [t for t in always if t not in out.always]
    limits, caps = spec.limits, pol.limits
    if caps.max_steps is not None and limits.max_steps > caps.max_steps:
        said("spec.limits.maxSteps", limits.max_steps, caps.max_steps)
        limits.max_steps = caps.max_steps
    if caps.max_tokens is not None and (
        limits.max_tokens is None or limits.max_tokens > caps.max_tokens
    ):
        said("spec.limits.maxTokens", limits.max_tokens, caps.max_tokens)
        limits.max_tokens = caps.max_tokens
    if caps.max_cost_usd is not None and (
        limits.max_cost_usd is None or limits.max_cost_usd > caps.max_cost_usd
    ):
        said("spec.limits.maxCostUSD", limits.max_cost_usd, caps.max_cost_usd)
        limits.max_cost_usd = caps.max_cost_usd
    if caps.timeout is not None and models.duration_seconds(
        limits.timeout
    ) > models.duration_seconds(caps.timeout):
        said("spec.limits.timeout", limits.timeout, caps.timeout)
        limits.timeout = caps.timeout


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


# -- rules: judged for every tool call -------------------------------------------------------


@dataclass
class Verdict:
    """What the rules say about one call: ``action`` None when no rule matched."""

    action: models.PolicyAction | None = None
    rule: models.RuleMatch | None = None
    matched: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "rule": None
            if self.rule is None
            else self.rule.model_dump(by_alias=True, exclude_none=True),
            "matched": list(self.matched),
        }


def context(
    *,
    tool: str,
    args: Mapping[str, Any],
    run: Mapping[str, Any],
    preview: models.Preview | None,
    namespace: str,
    namespace_labels: Mapping[str, str],
    now: dt.datetime,
) -> dict[str, Any]:
    """What a rule's expression sees of one call (DESIGN.md, AgentPolicy)."""
    target: dict[str, Any] | None = None
    if preview is not None and preview.target is not None:
        t = preview.target
        target = {
            "apiVersion": t.api_version,
            "kind": t.kind,
            "namespace": t.namespace or "",
            "name": t.name,
            "uid": t.uid or "",
            "labels": dict(t.labels),
            "operation": preview.operation,
            "ownerKind": (preview.owner or "/").split("/", 1)[0],
            "owner": preview.owner or "",
            "approximate": preview.approximate,
            "changes": [
                {"path": c.path, "before": c.before or "", "after": c.after or ""}
                for c in preview.every_change()
            ],
            # More changed than rules can be shown (or the preview came from a checkpoint
            # that lists only what people see): judge() then asks a person, whatever the
            # rules say.
            "changesTruncated": len(preview.every_change())
            < len(preview.changes) + preview.more_changes,
        }
    shown = dict(args)
    try:
        too_big = len(json.dumps(shown, default=str)) > MAX_ARGS_BYTES
    except (RecursionError, ValueError):
        too_big = True  # nested beyond what can be judged: hidden, so a rule reading it requires
    if too_big:
        shown = {}
    return {
        "tool": tool,
        "args": _plain(shown),
        "run": dict(run),
        "target": target,
        "namespaceObject": {"metadata": {"name": namespace, "labels": dict(namespace_labels)}},
        "now": now,
    }


def _plain(value: Any) -> Any:
    """JSON values as CEL takes them (keys strings; no other types)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return str(value)  # beyond CEL's int: text, never an error that repeats the arguments
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def evaluate(expression: str, ctx: Mapping[str, Any]) -> bool:
    """One rule's verdict on a call; RuleError when it cannot say (counted as require)."""
    compiled = compile_rule(expression)
    try:
        value = compiled.eval(data=ctx)
    except RuntimeError as e:
        raise RuleError(_cel_message(e)) from None
    result = value.value()
    if value.type() == _T.ERROR:
        raise RuleError(_cel_message(Exception(str(result))))
    if not isinstance(result, bool):
        raise RuleError(f"gave {type(result).__name__} {str(result)[:100]!r}, not a bool")
    return result


def judge(policies: list[Policy], ctx: Mapping[str, Any]) -> Verdict:
    """Every matching rule of every policy: deny beats require (the highest minApprovals;
    every matching rule's approvers) beats allow. An error is a require."""
    denies: list[models.RuleMatch] = []
    requires: list[models.RuleMatch] = []
    allows: list[models.RuleMatch] = []
    matched: list[str] = []
    target = ctx.get("target")
    if (
        isinstance(target, Mapping)
        and target.get("changesTruncated")
        and any(p.spec.rules for p in policies)
    ):
        requires.append(
            models.RuleMatch(
                policy="agentrun",
                name="changes-truncated",
                message="the call changes more fields than the preview lists, so the rules "
                "could not see them all; a person decides",
            )
        )
    for p in policies:
        for rule in p.spec.rules:
            try:
                hit = evaluate(rule.when, ctx)
            except RuleError as e:
                requires.append(
                    models.RuleMatch(
                        policy=p.label,
                        name=rule.name,
                        message=f"the rule could not be evaluated ({e}); a person decides",
                    )
                )
                matched.append(f"{p.label}/{rule.name} (error)")
                continue
            if not hit:
                continue
            matched.append(f"{p.label}/{rule.name}")
            match = models.RuleMatch(
                policy=p.label,
                name=rule.name,
                message=rule.message,
                min_approvals=rule.min_approvals if rule.action == "require" else None,
                approvers=[rule.approvers] if rule.action == "require" and rule.approvers else [],
            )
            {"deny": denies, "require": requires, "allow": allows}[rule.action].append(match)
    if denies:
        return Verdict("deny", denies[0], matched)
    if requires:
        top = max(requires, key=lambda r: r.min_approvals or 0)
        combined = top.model_copy(
            update={
                "min_approvals": max((r.min_approvals or 0) for r in requires) or None,
                "approvers": [a for r in requires for a in r.approvers],
            }
        )
        return Verdict("require", combined, matched)
    if allows:
        return Verdict("allow", allows[0], matched)
    return Verdict(None, None, matched)


def gated(
    tool: str,
    verdict: Verdict,
    approval: models.EffectiveApproval,
    *,
    default: bool | None = None,
) -> bool:
    """Whether a call waits for people: a require rule, or a tool a policy always gates,
    always; an allow rule waives only the waivable part of the run's list (the default,
    never what the run listed itself). For built-in tools that list is the default; for an
    MCP tool (``default`` given: not read-only and not waived by its MCPServer) the
    default is ``default``, and the run's own list adds to it."""
    if verdict.action == "require" or tool_matches(tool, approval.always_required):
        return True
    listed = tool_matches(tool, approval.required)
    waivable = tool_matches(tool, approval.waivable)
    if default is not None:
        if listed and not waivable:
            return True
        return False if verdict.action == "allow" else default
    if not listed:
        return False
    return not (verdict.action == "allow" and waivable)
