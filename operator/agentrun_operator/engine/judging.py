"""Judging a run's tool calls before anyone is asked: the dry run of each mutating call (its
preview, which approvers and rules see) and the AgentPolicy rules as they are now.

Owns which calls wait for people, which fail at once (a dry run the API server refuses, a
rule that denies) and which run freely, per DESIGN.md ("Trust model", "AgentPolicy").
Never: asks people (the gate does), runs a tool (``binding`` does), or trusts a rule that
cannot be evaluated or policies that cannot be read (both count as require).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from agentrun_operator import kube, models, policy, tools, workflow
from agentrun_operator.engine.common import RunRef, Services, audit, unavailable
from agentrun_operator.engine.mcptools import Toolset

log = logging.getLogger("agentrun.judging")


async def read_policies(services: Services, namespace: str) -> list[policy.Policy]:
    """The policies that apply to runs of ``namespace`` now (from the watches' cache when it
    is in sync, else from the API server). Raises KubeError."""
    if services.policies is not None:
        found: list[policy.Policy] = await services.policies.for_namespace(namespace)
        return found
    bodies, labels = await services.k8s.policies_for(namespace)
    return policy.applicable(bodies, labels)


async def dry_run(
    k8s: kube.Kube,
    ref: RunRef,
    spec: models.AgentRunSpec,
    name: str,
    args: dict[str, Any],
    call_id: str,
) -> models.Preview | None:
    """What a call would change, by a dry run as the run's service account (None for
    read-only tools). Raises PreviewRefused; KubeError when the API server is away."""
    sa_kube = k8s.as_service_account(namespace=ref.namespace, name=spec.service_account_name)
    try:
        return await tools.preview(
            sa_kube, name=name, arguments=args, namespace=ref.namespace, call_id=call_id
        )
    except (tools.PreviewRefused, kube.KubeError):
        raise
    except Exception:
        # A bug in computing the preview must not stop the run: the call is judged and
        # people are asked without one.
        log.exception("run %s: no preview for call %s", ref.key, call_id)
        return None


async def changed(
    k8s: kube.Kube, ref: RunRef, spec: models.AgentRunSpec, item: Mapping[str, Any], target: Any
) -> str | None:
    """How an approved call's object changed since its preview (read as the run's service
    account), or None."""
    sa_kube = k8s.as_service_account(namespace=ref.namespace, name=spec.service_account_name)
    return await tools.changed_since(
        sa_kube,
        name=item["tool"],
        arguments=item.get("arguments") or {},
        namespace=ref.namespace,
        target=target,
    )


async def rejudge(
    services: Services,
    ref: RunRef,
    spec: models.AgentRunSpec,
    created_by: str,
    item: Mapping[str, Any],
    preview: models.Preview | None,
) -> policy.Verdict:
    """The rules, as the policies are now, on a call asked again with a fresh preview (its
    approval went Stale). Unreadable policies count as require."""
    judge = Judge(services, ref, spec, models.EffectiveApproval(), created_by)
    policies, unreadable = await judge.policies()
    args = dict(item.get("arguments") or {})
    now = dt.datetime.now(dt.UTC)
    return await judge.verdict(str(item["tool"]), args, preview, policies, unreadable, {}, now)


class Judge:
    """Judges the calls of one run (``RunDeps.judge`` delegates here)."""

    def __init__(
        self,
        services: Services,
        ref: RunRef,
        spec: models.AgentRunSpec,
        approval: models.EffectiveApproval,
        created_by: str,
        mcp: Toolset | None = None,
    ) -> None:
        self._s = services
        self._ref = ref
        self._spec = spec
        self._approval = approval
        self._created_by = created_by
        self._mcp = mcp if mcp is not None else Toolset({})

    async def calls(self, calls: list[dict[str, Any]]) -> dict[str, workflow.Verdict]:
        policies, unreadable = await self.policies()
        labels: dict[str, dict[str, str]] = {}
        now = dt.datetime.now(dt.UTC)
        verdicts: dict[str, workflow.Verdict] = {}
        for call in calls:
            verdicts[call["call_id"]] = await self._one(call, policies, unreadable, labels, now)
        return verdicts

    async def policies(self) -> tuple[list[policy.Policy], str | None]:
        """The policies now, or why they could not be read (then every call requires)."""
        try:
            return await read_policies(self._s, self._ref.namespace), None
        except kube.KubeError as e:
            if unavailable(e):
                raise  # the API server is away: the run waits for it, and judges again
            log.error("run %s: cannot read the AgentPolicies: %s", self._ref.key, e)
            return [], f"the AgentPolicies could not be read ({e}); a person decides"

    async def _one(
        self,
        call: Mapping[str, Any],
        policies: list[policy.Policy],
        unreadable: str | None,
        labels: dict[str, dict[str, str]],
        now: dt.datetime,
    ) -> workflow.Verdict:
        name, args, call_id = call["name"], call["args"], call["call_id"]
        # Rules and policies see an MCP call as mcp:<server>/<tool> (target: null).
        tool = self._mcp.ref(name) if self._mcp.has(name) else name
        try:
            preview = await dry_run(self._s.k8s, self._ref, self._spec, name, args, call_id)
        except tools.PreviewRefused as e:
            audit("call-refused", run=self._ref.key, call=call_id, tool=name, why=e.message)
            return {"refused": e.message}
        verdict = await self.verdict(name, args, preview, policies, unreadable, labels, now)
        out: workflow.Verdict = {}
        if self._mcp.has(name):
            out["server"] = self._mcp.offered[name].pinned.server
        if preview is not None:
            out["preview"] = preview.model_dump(by_alias=True, exclude_none=True, mode="json")
        if verdict.matched:
            audit(
                "policy-judged", run=self._ref.key, call=call_id, tool=name, rules=verdict.matched
            )
        if verdict.action == "deny" and verdict.rule is not None:
            rule = verdict.rule
            out["denied"] = {
                "by": f"{rule.policy} (rule {rule.name})",
                "comment": rule.message or "denied by policy",
            }
            return out
        out["gated"] = self._gated(name, tool, verdict)
        if out["gated"] and verdict.action == "require" and verdict.rule is not None:
            out["rule"] = verdict.rule.model_dump(by_alias=True, exclude_none=True)
        return out

    def _gated(self, name: str, tool: str, verdict: policy.Verdict) -> bool:
        if not self._mcp.has(name):
            return policy.gated(tool, verdict, self._approval)
        pinned = self._mcp.offered[name].pinned
        if pinned.approval == "required":
            return True  # the MCPServer's admin says so: no allow rule waives it
        # Default: a tool its server calls read-only runs freely, any other waits, unless
        # the MCPServer says never.
        default = not pinned.read_only and pinned.approval != "never"
        return policy.gated(tool, verdict, self._approval, default=default)

    async def verdict(
        self,
        name: str,
        args: dict[str, Any],
        preview: models.Preview | None,
        policies: list[policy.Policy],
        unreadable: str | None,
        labels: dict[str, dict[str, str]],
        now: dt.datetime,
    ) -> policy.Verdict:
        """What the rules say about one call (``labels``: namespace labels read so far)."""
        if unreadable is not None:
            return policy.Verdict(
                "require",
                models.RuleMatch(policy="AgentPolicy", name="unreadable", message=unreadable),
            )
        if not any(p.spec.rules for p in policies):
            return policy.Verdict()
        # Rules and policies see an MCP call as mcp:<server>/<tool> (target: null).
        tool = self._mcp.ref(name) if self._mcp.has(name) else name
        # Where the call acts: the dry run's object (a manifest names its own), else its
        # arguments, else the run's namespace.
        target_ns = preview.target.namespace if preview and preview.target else None
        where = str(target_ns or args.get("namespace") or self._ref.namespace)
        if where not in labels:
            labels[where] = await self._namespace_labels(where)
        ctx = policy.context(
            tool=tool,
            # Secret values redacted: rules never see them, nor can an error repeat them.
            args=tools.redacted_arguments(name, args)
            if not self._mcp.has(name)
            else tools.redact_deep(args),
            run={
                "namespace": self._ref.namespace,
                "name": self._ref.name,
                "createdBy": self._created_by,
                "serviceAccount": self._spec.service_account_name or "default",
            },
            preview=preview,
            namespace=where,
            namespace_labels=labels[where],
            now=now,
        )
        return policy.judge(policies, ctx)

    async def _namespace_labels(self, namespace: str) -> dict[str, str]:
        try:
            if self._s.policies is not None:
                labels: dict[str, str] = await self._s.policies.namespace_labels(namespace)
                return labels
            return await self._s.k8s.namespace_labels(namespace)
        except kube.KubeError as e:
            if unavailable(e):
                raise
            return {}
