"""The approval gate: a run's calls that need people become ToolApprovals, and the run goes
on only once every one is settled.

Owns creating, reading, settling, reporting (events, Kubernetes Events, notifications, the
audit log) and cancelling a run's ToolApprovals, the AwaitingApproval status, and the bound
check of an approved call's object (changed since its preview: the approval is Stale, and
people are asked once more as NAME-2 with a fresh preview). Idempotent:
it runs again after a restart, a vote or an expiry, and creates, reports and settles each
approval once.
Never: counts a vote itself (``approvals`` judges votes, the webhook admits them), runs a
tool, or finishes a run (it says so, and the task finishes it).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from langgraph.types import Command

from agentrun_operator import approvals, contract, events, models, tools, workflow
from agentrun_operator import metrics as prom
from agentrun_operator.engine.binding import argument_error, mark_stale
from agentrun_operator.engine.common import RunRef, Services, audit, is_waiting
from agentrun_operator.engine.emitter import Emitter, StatusWriter
from agentrun_operator.engine.judging import changed, dry_run, rejudge

log = logging.getLogger("agentrun.gate")

_STATE = {"approved": "Approved", "denied": "Denied", "expired": "Expired"}


@dataclass
class GateOutcome:
    """What the run does next: resume with the decisions, stop (an approval expired and the
    policy says stop), or wait for people (neither; ``expires`` is the earliest deadline)."""

    resume: Command[Any] | None = None
    stop: bool = False
    expires: dt.datetime | None = None


def _twice_stale(tool: str, ta: Mapping[str, Any], why: str = "") -> workflow.Decision:
    """The call's second approval went Stale too: the call fails, nobody is asked again."""
    why = why or str((ta.get("status") or {}).get("message") or "its object changed")
    return {
        "decision": "refused",
        "by": "agentrun",
        "comment": f"{tool}: nothing ran: {why} after it was approved a second time (approval "
        f"{ta['metadata']['name']} is Stale); look at the object again and call the tool "
        "again if still needed",
    }


class Gate:
    def __init__(self, services: Services) -> None:
        self._s = services

    async def of_run(self, ref: RunRef) -> list[dict[str, Any]]:
        """This run's ToolApprovals (not those of an earlier run that had the same name)."""
        found = await self._s.k8s.list_toolapprovals(
            namespace=ref.namespace, label_selector=f"{contract.RUN_LABEL}={ref.name}"
        )
        return [
            ta
            for ta in found
            if any(o.get("uid") == ref.uid for o in ta["metadata"].get("ownerReferences") or [])
        ]

    async def settle(
        self,
        ref: RunRef,
        spec: models.AgentRunSpec,
        interrupts: Any,
        emitter: Emitter,
        statusw: StatusWriter,
    ) -> GateOutcome:
        """Create or read the run's ToolApprovals; the resume command once all are settled."""
        items: list[dict[str, Any]] = []
        reason = ""
        for intr in interrupts:
            value = getattr(intr, "value", None) or {}
            items += list(value.get("approvals") or [])
            reason = reason or str(value.get("reason") or "")
        policy = spec.approval
        now = dt.datetime.now(dt.UTC)
        by_call: dict[str, list[dict[str, Any]]] = {}
        for found in await self.of_run(ref):
            by_call.setdefault(str((found.get("spec") or {}).get("callId")), []).append(found)
        existing = {c: contract.current_approval(tas) for c, tas in by_call.items()}
        decisions: dict[str, workflow.Decision] = {}
        waiting: list[tuple[str, dt.datetime | None]] = []
        expired_stop = False
        for item in items:
            call_id = item["callId"]
            ta = existing.get(call_id)
            invalid = argument_error(item["tool"], item.get("arguments") or {})
            # Shown to people (ToolApproval, events, notifications) with Secret values
            # redacted; the call itself runs with the checkpoint's own arguments.
            shown = (
                tools.redact_deep(item.get("arguments") or {})
                if item.get("server")
                else tools.redacted_arguments(item["tool"], item.get("arguments") or {})
            )
            if invalid is not None and (
                ta is None
                or approvals.settle(
                    ta, min_approvals=approvals.needed(ta, policy.min_approvals), now=now
                )
                is None
            ):
                # A call paused before this operator judged arguments at the gate, whose
                # arguments can never run: nobody is asked (any approval still waiting is
                # cancelled), and the call fails as the tool error it is. A decision people
                # already made stands.
                if ta is not None and (ta.get("status") or {}).get("state") in (None, "Pending"):
                    await self.cancel(ref, emitter, ta, f"its arguments can never run: {invalid}")
                continue
            outcome = await self._one(ref, spec, item, ta, shown, reason, emitter, statusw, now)
            if isinstance(outcome, tuple):
                waiting.append(outcome)
                continue
            decisions[call_id] = outcome
            if outcome.get("decision") == "expired" and policy.on_timeout == "stop":
                expired_stop = True
        if expired_stop:
            return GateOutcome(stop=True)
        if waiting:
            await self._awaiting(ref, [n for n, _ in waiting], emitter, statusw)
            expiries = [e for _, e in waiting if e is not None]
            return GateOutcome(expires=min(expiries) if expiries else None)
        await self._s.store.people_answered(ref.uid)
        return GateOutcome(resume=Command(resume=decisions))

    async def _one(
        self,
        ref: RunRef,
        spec: models.AgentRunSpec,
        item: dict[str, Any],
        ta: dict[str, Any] | None,
        shown: dict[str, Any],
        reason: str,
        emitter: Emitter,
        statusw: StatusWriter,
        now: dt.datetime,
    ) -> workflow.Decision | tuple[str, dt.datetime | None]:
        """One call's decision, or (approval name, deadline) while people have not decided.
        An approval whose object changed after people approved it is Stale: the call is
        asked again once (NAME-2, a fresh preview, the rules judged again on it)."""
        call_id, policy = item["callId"], spec.approval
        for _ in range(3):  # the first approval, a Stale one found now, and NAME-2
            state = (ta.get("status") or {}).get("state") if ta is not None else None
            if state == "Cancelled":
                # Cancelled while its call still waits (its dry run was refused after the
                # approval was created): nobody can decide it any more, so the call fails.
                return {
                    "decision": "refused",
                    "by": "agentrun",
                    "comment": str((ta or {}).get("status", {}).get("message") or "")
                    or f"{item['tool']}: the approval was cancelled",
                }
            again = state == "Stale"
            if again and ta is not None and ta["metadata"]["name"].endswith(contract.REASK_SUFFIX):
                return _twice_stale(item["tool"], ta)
            preview: models.Preview | None = None
            if item.get("preview") and not again:
                preview = models.Preview.model_validate(item["preview"])  # judged before
            elif ta is None or not state or again:
                # Asked again, or a call paused before calls were judged: what would it
                # change? A call the API server refuses fails as the tool error it is, and
                # nobody is asked.
                try:
                    preview = await dry_run(
                        self._s.k8s, ref, spec, item["tool"], item.get("arguments") or {}, call_id
                    )
                except tools.PreviewRefused as e:
                    if ta is not None and not again:
                        await self.cancel(ref, emitter, ta, e.message)
                    return {"decision": "refused", "by": "the API server", "comment": e.message}
            if again:
                # The rules, as the policies are now, on what it would change now.
                verdict = await rejudge(
                    self._s, ref, spec, str(statusw.current.get("createdBy") or ""), item, preview
                )
                if verdict.action == "deny" and verdict.rule is not None:
                    return {
                        "decision": "denied",
                        "by": f"{verdict.rule.policy} (rule {verdict.rule.name})",
                        "comment": verdict.rule.message or "denied by policy",
                    }
                rule = verdict.rule if verdict.action == "require" else None
                item = {
                    **item,
                    "rule": rule.model_dump(by_alias=True, exclude_none=True) if rule else None,
                }
            if ta is None or again:
                ta = await self._s.k8s.create_toolapproval(
                    namespace=ref.namespace,
                    body=approvals.toolapproval_body(
                        namespace=ref.namespace,
                        run=ref.name,
                        run_uid=ref.uid,
                        call_id=call_id,
                        tool=item["tool"],
                        arguments=shown,
                        reason=reason,
                        rule=item.get("rule"),
                        again=again,
                        server=item.get("server"),
                    ),
                )
            if not (ta.get("status") or {}).get("state"):
                ta = await self._open(ref, spec, ta, item["tool"], shown, preview, emitter, now)
            settled = approvals.settle(
                ta, min_approvals=approvals.needed(ta, policy.min_approvals), now=now
            )
            if settled is None:
                await self._count(ref, spec, ta)
                return ta["metadata"]["name"], approvals.parse_time(
                    (ta.get("status") or {}).get("expiresAt")
                )
            if (ta.get("status") or {}).get("state") != _STATE[settled.outcome]:
                await self._report(ref, spec, ta, item["tool"], shown, settled, emitter, now)
            decision: workflow.Decision = {
                "decision": settled.outcome,
                "by": settled.by,
                "comment": settled.comment,
                "approval": ta["metadata"]["name"],
            }
            target = ((ta.get("status") or {}).get("preview") or {}).get("target")
            if settled.outcome != "approved" or not isinstance(target, dict):
                return decision
            decision["target"] = target
            why = await changed(self._s.k8s, ref, spec, item, target)
            if why is None:
                return decision
            # Bound to what people saw: the object changed since, so nothing runs on this
            # approval. It is Stale; the loop asks again (once) with a fresh preview.
            await mark_stale(
                self._s.k8s,
                emitter,
                namespace=ref.namespace,
                approval=ta["metadata"]["name"],
                call_id=call_id,
                tool=item["tool"],
                shown=shown,
                why=why,
            )
            ta = {**ta, "status": {**(ta.get("status") or {}), "state": "Stale", "message": why}}
        raise AssertionError("unreachable: an approval is asked at most twice")

    async def _open(
        self,
        ref: RunRef,
        spec: models.AgentRunSpec,
        ta: dict[str, Any],
        tool: str,
        shown: dict[str, Any],
        preview: models.Preview | None,
        emitter: Emitter,
        now: dt.datetime,
    ) -> dict[str, Any]:
        """Open an approval for votes (Pending, with its deadline and the preview of what
        the call would change) and tell people."""
        policy = spec.approval
        name = ta["metadata"]["name"]
        call_id = ta["spec"]["callId"]
        rule = ta["spec"].get("rule")
        expires = now + dt.timedelta(seconds=models.duration_seconds(policy.timeout))
        shown_preview = (
            None if preview is None else preview.model_dump(by_alias=True, exclude_none=True)
        )
        ta = await self._s.k8s.patch_toolapproval_status(
            namespace=ref.namespace,
            name=name,
            status={
                "state": "Pending",
                "expiresAt": approvals.rfc3339(expires),
                "approvals": 0,
                "approvalsNeeded": approvals.needed(ta, policy.min_approvals),
                "preview": shown_preview,
            },
        )
        await emitter.approval(
            call_id=call_id,
            approval=name,
            tool=tool,
            arguments=shown,
            state="pending",
            preview=shown_preview,
            rule=rule,
        )
        change = f" ({preview.summary})" if preview is not None else ""
        if rule:
            change += f"; asked by {rule.get('policy')} rule {rule.get('name')}"
            change += f": {rule['message']}" if rule.get("message") else ""
        self._s.notify(
            ref,
            "approval.pending",
            f"Run {ref.key} wants to call {tool} {json.dumps(shown)}{change}: "
            f"approve or deny {name}",
            approval=name,
            callId=call_id,
            tool=tool,
            state="pending",
            change=preview.summary if preview is not None else "",
        )
        return ta

    async def _count(self, ref: RunRef, spec: models.AgentRunSpec, ta: Mapping[str, Any]) -> None:
        """Show the votes counted so far on an approval still open."""
        needed = approvals.needed(ta, spec.approval.min_approvals)
        approved, _ = approvals.tally(approvals.counted_votes(ta))
        if (ta.get("status") or {}).get("approvals") != len(approved):
            await self._s.k8s.patch_toolapproval_status(
                namespace=ref.namespace,
                name=ta["metadata"]["name"],
                status={
                    "approvals": len(approved),
                    "approvalsNeeded": max(0, needed - len(approved)),
                },
            )

    async def _report(
        self,
        ref: RunRef,
        spec: models.AgentRunSpec,
        ta: Mapping[str, Any],
        tool: str,
        shown: dict[str, Any],
        settled: approvals.Settled,
        emitter: Emitter,
        now: dt.datetime,
    ) -> None:
        """An approval just settled: its status, the stream, people, the audit log."""
        name = ta["metadata"]["name"]
        call_id = (ta.get("spec") or {}).get("callId", "")
        state = _STATE[settled.outcome]
        by = settled.by if settled.outcome != "expired" else ""
        audit(
            "approval",
            run=ref.key,
            approval=name,
            callId=call_id,
            tool=tool,
            outcome=settled.outcome,
            by=settled.by,
            votes=[
                {k: v.get(k) for k in ("username", "decision", "comment")} for v in settled.voters
            ],
        )
        created = approvals.parse_time(ta["metadata"].get("creationTimestamp"))
        waited = max(0.0, (now - created).total_seconds()) if created is not None else 0.0
        if created is not None:
            prom.APPROVAL_WAIT.labels(ref.namespace, tool, settled.outcome).observe(waited)
        approved, _ = approvals.tally(settled.voters)
        # The wait for people as a span of the run's trace, recorded by whoever sees it end
        # (it may have begun in an operator process that is gone), with its real start.
        self._s.tracing.record(
            f"approval {tool}",
            emitter.trace,
            start_ns=int((created or now).timestamp() * 1e9),
            end_ns=int(now.timestamp() * 1e9),
            attributes={
                "agentrun.approval": name,
                "gen_ai.tool.name": tool,
                "gen_ai.tool.call.id": call_id,
                "agentrun.approval.outcome": settled.outcome,
                "agentrun.approval.decided_by": settled.by,
                "agentrun.approval.approvals": len(approved),
                "agentrun.approval.voters": [str(v.get("username")) for v in settled.voters],
                "agentrun.approval.wait_seconds": waited,
                "agentrun.approval.rule": ((ta.get("spec") or {}).get("rule") or {}).get("name"),
            },
        )
        await self._s.k8s.patch_toolapproval_status(
            namespace=ref.namespace,
            name=name,
            status={
                "state": state,
                "decidedBy": settled.decided_by,
                "decidedAt": approvals.rfc3339(now),
                "approvals": len(approved),
                "approvalsNeeded": max(
                    0, approvals.needed(ta, spec.approval.min_approvals) - len(approved)
                ),
                "message": settled.comment or None,
            },
        )
        await emitter.approval(
            call_id=call_id,
            approval=name,
            tool=tool,
            arguments=shown,
            state=settled.outcome,
            decided_by=by,
        )
        self._s.notify(
            ref,
            "approval.expired" if settled.outcome == "expired" else "approval.decided",
            f"{tool} call of run {ref.key} {settled.outcome}" + (f" by {by}" if by else ""),
            approval=name,
            callId=call_id,
            tool=tool,
            state=settled.outcome,
            by=by,
        )
        await self._s.k8s.post_event(
            involved=ref.involved(),
            type="Normal" if settled.outcome == "approved" else "Warning",
            reason=f"Approval{state}",
            message=f"{tool} call {call_id} {settled.outcome}" + (f" by {by}" if by else ""),
        )

    async def _awaiting(
        self, ref: RunRef, names: list[str], emitter: Emitter, statusw: StatusWriter
    ) -> None:
        """The run waits for people on ``names``: its phase, stream and Event say so."""
        message = f"waiting for a decision on {', '.join(names)}"
        if statusw.current.get("phase") != "AwaitingApproval":
            await self._s.store.awaiting_people(ref.uid)
            await emitter.workflow("awaiting_approval", node="gate", step=emitter.step)
            await statusw.phase(
                "AwaitingApproval",
                reason="AwaitingApproval",
                message=message,
                pendingApprovals=names,
                pendingApprovalCount=len(names),
                lastEventId=emitter.last_id,
            )
            await self._s.k8s.post_event(
                involved=ref.involved(), type="Normal", reason="AwaitingApproval", message=message
            )
        elif statusw.current.get("pendingApprovals") != names or is_waiting(statusw.current):
            await statusw.phase(
                "AwaitingApproval",
                reason="AwaitingApproval",
                message=message,
                pendingApprovals=names,
                pendingApprovalCount=len(names),
            )

    async def cancel(
        self, ref: RunRef, emitter: Emitter | None, ta: Mapping[str, Any], why: str
    ) -> None:
        """Nobody may decide this approval any more (``emitter``: say so in the stream)."""
        spec = ta.get("spec") or {}
        await self._s.k8s.patch_toolapproval_status(
            namespace=ref.namespace,
            name=ta["metadata"]["name"],
            status={"state": "Cancelled", "decidedAt": events.now_rfc3339(), "message": why},
        )
        if emitter is not None:
            await emitter.approval(
                call_id=str(spec.get("callId") or ""),
                approval=ta["metadata"]["name"],
                tool=str(spec.get("tool") or ""),
                arguments=spec.get("arguments") or {},
                state="cancelled",
            )

    async def cancel_pending(self, ref: RunRef, emitter: Emitter | None, why: str) -> None:
        for ta in await self.of_run(ref):
            if (ta.get("status") or {}).get("state") in (None, "Pending"):
                await self.cancel(ref, emitter, ta, why)
