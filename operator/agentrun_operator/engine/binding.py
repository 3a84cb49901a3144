"""A run's LLM and tools, bound to it: ``RunDeps`` implements ``workflow.Deps`` for one run
(the model it streams from, its budgets, its tools as its service account, exactly-once
tool calls), and ``resolve_model`` picks and checks its model endpoint.

Never: decides the workflow's path (``workflow`` does), asks people (the gate does), or acts
with the operator's own identity (tools and the model's key Secret go through the run's
service account).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, cast

import openai
from langchain_core.messages import AIMessage, BaseMessage
from langgraph.errors import GraphBubbleUp

from agentrun_operator import (
    approvals,
    config,
    events,
    kube,
    llm,
    models,
    tools,
    tracing,
    workflow,
)
from agentrun_operator import metrics as prom
from agentrun_operator.engine.common import RunFailed, RunRef, short
from agentrun_operator.engine.emitter import Emitter, StatusWriter
from agentrun_operator.engine.judging import Judge
from agentrun_operator.engine.mcptools import Toolset
from agentrun_operator.store import RunStore


def argument_error(name: str, arguments: dict[str, Any]) -> str | None:
    """What makes a built-in call's arguments unable to ever run (as the model sees it), or
    None (also for an MCP tool: ``RunDeps`` checks those against the tool's schema)."""
    if name not in tools.TOOLS:
        return None
    try:
        tools.parse_arguments(name, arguments)
    except tools.ArgumentError as e:
        return f"{name}: {e}"
    return None


async def mark_stale(
    k8s: kube.Kube,
    emitter: Emitter,
    *,
    namespace: str,
    approval: str,
    call_id: str,
    tool: str,
    shown: dict[str, Any],
    why: str,
) -> None:
    """An approval no longer holds (its object changed since people saw it): its status and
    the stream say so. Nothing runs on it."""
    if approval:
        with contextlib.suppress(kube.KubeError):
            await k8s.patch_toolapproval_status(
                namespace=namespace, name=approval, status={"state": "Stale", "message": why}
            )
    await emitter.approval(
        call_id=call_id, approval=approval, tool=tool, arguments=shown, state="stale"
    )


async def resolve_model(
    spec: models.AgentRunSpec, settings: config.Settings, sa_kube: kube.ServiceAccountKube
) -> llm.ModelConfig:
    """The run's model endpoint (on the operator's allow-list) and key (read as the run's
    service account); RunFailed saying what to fix otherwise."""
    m = spec.model
    base_url = (m.base_url or settings.model_base_url).rstrip("/")
    allowed = [u.rstrip("/") for u in settings.allowed_base_urls]
    if not approvals.base_url_allowed(base_url, allowed):
        raise RunFailed(
            "ModelEndpointNotAllowed",
            f"spec.model.baseURL {base_url} is not in the operator's allow-list "
            f"(AGENTRUN_MODEL_BASE_URL_ALLOW: {', '.join(allowed)}); use one of those "
            "or ask the operator's admin to allow it",
        )
    api_key = settings.model_api_key
    if m.api_key_secret_ref is not None:
        ref = m.api_key_secret_ref
        try:
            api_key = await sa_kube.read_secret_key(name=ref.name, key=ref.key)
        except kube.KubeError as e:
            raise RunFailed(
                "ModelSecretUnreadable",
                f"spec.model.apiKeySecretRef: cannot read key {ref.key!r} of Secret "
                f"{ref.name!r} as service account "
                f"{spec.service_account_name or 'default'}: {e}",
            ) from e
    return llm.ModelConfig(
        name=m.name or settings.model_name,
        base_url=base_url,
        api_key=api_key,
        temperature=m.temperature,
    )


def check_price(
    model: llm.ModelConfig, spec: models.AgentRunSpec, settings: config.Settings
) -> None:
    """A cost limit needs a price for the model, or it could never trip."""
    if spec.limits.max_cost_usd is None or llm.price_of(model.name, settings.price_table()):
        return
    raise RunFailed(
        "PriceUnknown",
        f"spec.limits.maxCostUSD is set, but the operator has no price for model "
        f"{model.name}, so the limit could never trip: add one to AGENTRUN_PRICES "
        f'(JSON, US dollars per 1M tokens, e.g. {{"{model.name}": {{"input": 0.5, '
        '"output": 1.5}}) or the chart value operator.prices',
    )


class RunDeps:
    """Implements workflow.Deps for one run: the LLM, events, limits and tools."""

    def __init__(
        self,
        *,
        ref: RunRef,
        spec: models.AgentRunSpec,
        settings: config.Settings,
        chat: Any,
        model_name: str,
        emitter: Emitter,
        statusw: StatusWriter,
        usage: models.Usage,
        sa_kube: kube.ServiceAccountKube,
        k8s: kube.Kube,
        store: RunStore,
        judge: Judge,
        mcp: Toolset | None = None,
        tracer: tracing.Tracing | None = None,
        trace: tracing.RunTrace | None = None,
    ) -> None:
        self.goal = spec.goal
        self.namespace = ref.namespace
        self.max_steps = spec.limits.max_steps
        self._mcp = mcp if mcp is not None else Toolset({})
        builtin = [t for t in spec.tools if t in models.ALL_TOOLS]
        # What the model may call: the built-in tools and the MCP tools as functions.
        self.tools: Sequence[str] = [*builtin, *self._mcp.offered]
        self.required: frozenset[str] = frozenset(spec.approval.required)
        self._ref = ref
        self._spec = spec
        self._settings = settings
        self._chat = chat
        specs = [*tools.openai_tools(builtin), *self._mcp.specs()]
        self._chat_tools = chat.bind_tools(specs) if specs else chat
        self._model_name = model_name
        self._emitter = emitter
        self._status = statusw
        self.usage = usage
        self._kube = sa_kube
        self._k8s = k8s  # the operator's own client: only for the ToolApproval's status
        self._store = store
        self._prices = settings.price_table()
        self._last_input_tokens = 0  # the previous call's prompt, for the budget estimate
        self._judge = judge
        self._tracing = tracer if tracer is not None else tracing.Tracing(environ={})
        self._trace = trace

    async def judge(self, calls: list[dict[str, Any]]) -> dict[str, workflow.Verdict]:
        return await self._judge.calls(calls)

    def mint_call_id(self) -> str:
        return "c-" + secrets.token_hex(6)

    def argument_error(self, name: str, arguments: dict[str, Any]) -> str | None:
        if self._mcp.has(name):
            return self._mcp.argument_error(name, arguments)
        return argument_error(name, arguments)

    async def workflow_event(self, state: str, *, node: str, step: int) -> None:
        await self._emitter.workflow(cast(events.WorkflowState, state), node=node, step=step)
        self._status.progress(step=step)

    def node_span(self, node: str) -> AbstractContextManager[None]:
        # An interrupt (the gate asks people) and a stop end a node without it failing.
        return self._tracing.span(
            f"workflow {node}",
            self._trace,
            attributes={"agentrun.node": node, "agentrun.step": self._emitter.step},
            benign=(GraphBubbleUp, asyncio.CancelledError),
        )

    # -- the model ---------------------------------------------------------------------------
    async def llm(
        self, messages: Sequence[BaseMessage], *, node: str, with_tools: bool
    ) -> AIMessage:
        chat = self._chat_tools if with_tools else self._chat

        async def on_token(text: str) -> None:
            await self._emitter.token(text, node)

        with self._tracing.span(
            f"chat {self._model_name}",
            self._trace,
            client=True,
            attributes=tracing.chat_attributes(self._model_name, self._base_url(), node=node),
            benign=(asyncio.CancelledError,),
        ):
            message, call = await self._stream(chat, messages, on_token)
            finish = str(message.response_metadata.get("finish_reason") or "")
            self._tracing.annotate(tracing.chat_usage_attributes(call, finish_reason=finish))
        await self._emitter.flush()
        self.usage.add_call(call)
        self._last_input_tokens = call.input_tokens
        prom.llm_call(
            namespace=self.namespace,
            model=self._model_name,
            input_tokens=call.input_tokens,
            output_tokens=call.output_tokens,
            cached_tokens=call.cached_tokens,
            cost_usd=call.cost_usd,
            ttft_ms=call.ttft_ms,
            ttr_ms=call.ttr_ms,
        )
        await self._emitter.metrics(node=node, call=call, total=self.usage)
        self._status.progress(usage=self.usage.as_status())
        self._check_budget(self.usage.total_tokens, self.usage.cost_usd, estimated=False)
        return message

    async def _stream(
        self,
        chat: Any,
        messages: Sequence[BaseMessage],
        on_token: Callable[[str], Awaitable[None]],
    ) -> tuple[AIMessage, models.CallUsage]:
        try:
            return await llm.stream_call(
                chat,
                messages,
                on_token=on_token,
                model_name=self._model_name,
                prices=self._prices,
                budget=self._budget_check(),
                # A model server that traces joins the run's trace.
                headers=self._tracing.headers(),
            )
        except openai.APIStatusError as e:
            raise RunFailed(
                "ModelEndpointError",
                f"model endpoint {self._base_url()} answered HTTP {e.status_code}: "
                f"{short(e.message)}",
            ) from e
        except openai.APIConnectionError as e:
            raise RunFailed(
                "ModelEndpointUnreachable",
                f"model endpoint {self._base_url()} unreachable: {short(str(e))}; check "
                "spec.model.baseURL or the operator's AGENTRUN_MODEL_BASE_URL",
            ) from e

    def _budget_check(self) -> Callable[[int], None] | None:
        """A check of spec.limits.maxTokens/maxCostUSD while a call streams, or None."""
        limits = self._spec.limits
        if limits.max_tokens is None and limits.max_cost_usd is None:
            return None
        # The call's input is known only when its usage arrives: until then, count its
        # prompt as at least as long as the previous call's, the best estimate at hand.
        prompt = self._last_input_tokens
        price = llm.price_of(self._model_name, self._prices)

        def check(output: int) -> None:
            cost = self.usage.cost_usd
            if price is not None:
                cost += (prompt * price.input + output * price.output) / 1_000_000
            self._check_budget(self.usage.total_tokens + prompt + output, cost, estimated=True)

        return check

    def _check_budget(self, tokens: int, cost: float, *, estimated: bool) -> None:
        limits = self._spec.limits
        about = "about " if estimated else ""
        how = " (the call was cut while it streamed)" if estimated else ""
        if limits.max_tokens is not None and tokens > limits.max_tokens:
            raise workflow.LimitExceeded(
                "BudgetExceeded",
                f"token limit reached: {about}{tokens} tokens used, "
                f"spec.limits.maxTokens is {limits.max_tokens}{how}",
            )
        if limits.max_cost_usd is not None and cost > limits.max_cost_usd:
            raise workflow.LimitExceeded(
                "BudgetExceeded",
                f"cost limit reached: {about}${cost:.4f} spent, "
                f"spec.limits.maxCostUSD is {limits.max_cost_usd}{how}",
            )

    def _base_url(self) -> str:
        return str(getattr(self._chat, "openai_api_base", "") or "")

    # -- the tools ---------------------------------------------------------------------------
    async def tool_call(
        self,
        *,
        name: str,
        arguments: dict[str, Any],
        call_id: str,
        decision: workflow.Decision | None,
        gated: bool,
    ) -> str:
        mcp = self._mcp.offered[name].pinned if self._mcp.has(name) else None
        with self._tracing.span(
            f"execute_tool {name}",
            self._trace,
            attributes=tracing.tool_attributes(
                name,
                call_id,
                arguments,
                namespace=self.namespace,
                server=mcp.server if mcp else None,
                decision=decision,
            ),
            benign=(asyncio.CancelledError,),
        ):
            return await self._tool_call(
                name=name, arguments=arguments, call_id=call_id, decision=decision, gated=gated
            )

    async def _tool_call(
        self,
        *,
        name: str,
        arguments: dict[str, Any],
        call_id: str,
        decision: workflow.Decision | None,
        gated: bool,
    ) -> str:
        record = await self._store.call_record(self._ref.uid, call_id)
        if record.get("state") == "done":
            return str(record["content"])  # already executed and reported once
        # What people see of the call (stream, call record): Secret values redacted.
        shown = (
            tools.redact_deep(arguments)
            if self._mcp.has(name)
            else tools.redacted_arguments(name, arguments)
        )
        started = time.monotonic()
        if decision is None:
            # Arguments that can never run: no person was asked (the gate skips such calls)
            # and nothing starts; the model gets the error, naming the argument to fix.
            error = self.argument_error(name, arguments)
            if error is not None:
                failed = tools.ToolOutcome("failed", None, error)
                return await self._report(call_id, name, shown, failed, started)
        if (decision or {}).get("decision") == "refused":
            # The dry run before the gate failed: the call fails as that tool error.
            refused = tools.ToolOutcome("failed", None, str((decision or {}).get("comment")))
            return await self._report(call_id, name, shown, refused, started)
        if gated and (decision or {}).get("decision") != "approved":
            d = decision or {
                "decision": "denied",
                "by": "agentrun",
                "comment": "approval is required and none was given",
            }
            result = {
                "error": f"the call was {d.get('decision', 'denied')} by {d.get('by') or 'nobody'}",
                "comment": d.get("comment", ""),
                "hint": "do not retry this call; continue without it",
            }
            content = json.dumps(result)
            await self._emitter.tool(
                call_id=call_id,
                name=name,
                arguments=shown,
                status="denied",
                result=result,
                duration_ms=0,
                record={"state": "done", "content": content},
            )
            prom.TOOL_CALLS.labels(name, "denied").inc()
            self._tracing.annotate(
                {"agentrun.tool.outcome": "denied", "gen_ai.tool.call.arguments": shown},
                error=result["error"],
            )
            return content
        if self._mcp.has(name):
            return await self._mcp_call(call_id, name, arguments, shown, record, started)
        outcome: tools.ToolOutcome | None = None
        crashed = record.get("state") == "started" and name in models.MUTATING_TOOLS
        if crashed:
            # We crashed after starting this call: did it land? Ask the object, not memory.
            outcome = await self._landed_before(name, arguments, call_id)
        runner: kube.ServiceAccountKube = self._kube
        if (
            outcome is None
            and decision is not None
            and decision.get("decision") == "approved"
            and decision.get("target")
        ):
            # Bound to what people approved (also when a crash interrupted it before it
            # landed): if the object changed since, nothing runs; else the write goes only
            # to the version just read.
            check = functools.partial(
                tools.check_bound,
                self._kube,
                name=name,
                arguments=arguments,
                namespace=self.namespace,
                target=decision["target"],
            )
            bound = await check()
            if bound.why is not None:
                failed = await self._stale(call_id, name, shown, decision, bound.why)
                return await self._report(call_id, name, shown, failed, started)
            if bound.path is not None:

                async def fresh() -> str | None:
                    again = await check()
                    return None if again.why is not None else again.resource_version

                runner = self._kube.bound(
                    path=bound.path,
                    uid=bound.uid,
                    resource_version=bound.resource_version,
                    fresh=fresh,
                )

        if not crashed:
            await self._emitter.tool(
                call_id=call_id,
                name=name,
                arguments=shown,
                status="started",
                record={"state": "started"},
            )
        if outcome is None:
            outcome = await tools.run_tool(
                runner,
                name=name,
                arguments=arguments,
                namespace=self.namespace,
                call_id=call_id,
                max_bytes=self._settings.tool_result_max_bytes,
            )
            if isinstance(runner, kube.BoundKube) and runner.changed and decision is not None:
                # The object changed in the moment between the check and the write: the API
                # server refused the write, and the approval no longer holds.
                why = "its object changed just before the write (the API server refused it)"
                outcome = await self._stale(call_id, name, shown, decision, why)
        return await self._report(call_id, name, shown, outcome, started)

    async def _stale(
        self,
        call_id: str,
        name: str,
        shown: dict[str, Any],
        decision: workflow.Decision,
        why: str,
    ) -> tools.ToolOutcome:
        """The approval no longer holds (its object changed): it is Stale, nothing ran, and
        the agent is told."""
        await mark_stale(
            self._k8s,
            self._emitter,
            namespace=self.namespace,
            approval=decision.get("approval") or "",
            call_id=call_id,
            tool=name,
            shown=shown,
            why=why,
        )
        return tools.ToolOutcome(
            "failed",
            None,
            f"{name}: nothing ran: {why}, so the approval no longer holds (it is Stale); look "
            "at the object again and call the tool again if still needed",
        )

    async def _mcp_call(
        self,
        call_id: str,
        name: str,
        arguments: dict[str, Any],
        shown: dict[str, Any],
        record: dict[str, Any],
        started: float,
    ) -> str:
        """An MCP tool call, as the run's service account: progress in the stream; a stop
        cancels it on the server; after a crash a call that may change something is never
        repeated."""
        pinned = self._mcp.offered[name].pinned
        server = pinned.server
        if record.get("state") == "started" and not pinned.read_only:
            unknown = tools.ToolOutcome(
                "unknown",
                None,
                f"{name}: the operator restarted during this call and cannot tell whether it "
                "took effect on the MCP server; it is not repeated: check before calling it "
                "again",
            )
            return await self._report(call_id, name, shown, unknown, started, server=server)
        await self._emitter.tool(
            call_id=call_id,
            name=name,
            arguments=shown,
            status="started",
            record={"state": "started"},
            server=server,
        )

        async def progress(data: dict[str, Any]) -> None:
            await self._emitter.tool(
                call_id=call_id,
                name=name,
                arguments=shown,
                status="progress",
                result=data,
                duration_ms=int((time.monotonic() - started) * 1000),
                server=server,
            )

        try:
            outcome = await self._mcp.call(
                name,
                arguments,
                k8s=self._k8s,
                settings=self._settings,
                namespace=self.namespace,
                account=self._spec.service_account_name or "default",
                on_progress=progress,
                max_bytes=self._settings.tool_result_max_bytes,
                # An MCP server that traces joins the run's trace (under this call's span).
                trace_headers=self._tracing.headers(),
            )
        except asyncio.CancelledError:
            # Stopped mid-call: the client told the server (notifications/cancelled) and
            # closed the connection. Say so, once, whatever else is being cancelled.
            cancelled = tools.ToolOutcome(
                "cancelled", None, f"{name}: the run was stopped during this call"
            )
            with contextlib.suppress(BaseException):
                await asyncio.shield(
                    self._report(call_id, name, shown, cancelled, started, server=server)
                )
            raise
        return await self._report(call_id, name, shown, outcome, started, server=server)

    async def _landed_before(
        self, name: str, arguments: dict[str, Any], call_id: str
    ) -> tools.ToolOutcome | None:
        """The outcome of a call started before a crash, if it can be told it landed (or
        that it cannot be told); None when it did not land and is safe to run."""
        landed = await tools.landed(
            self._kube, name=name, arguments=arguments, namespace=self.namespace, call_id=call_id
        )
        if landed is True:
            note = {"note": "this call took effect before an operator restart"}
            return tools.ToolOutcome(status="succeeded", result=note, error=None)
        if landed is None:
            return tools.ToolOutcome(
                status="unknown",
                result=None,
                error="the operator restarted during this call and cannot tell whether "
                "it took effect; check the object before trying again",
            )
        return None

    async def _report(
        self,
        call_id: str,
        name: str,
        shown: dict[str, Any],
        outcome: tools.ToolOutcome,
        started: float,
        *,
        server: str | None = None,
    ) -> str:
        """A call's outcome as its ``tool`` event and call record, in one step (so a resumed
        run reports it once); the content the model sees."""
        self.usage.tool_calls += 1
        prom.TOOL_CALLS.labels(name, outcome.status).inc()
        self._tracing.annotate(
            {"agentrun.tool.outcome": outcome.status, "gen_ai.tool.call.arguments": shown},
            error=outcome.error if outcome.status != "succeeded" else None,
        )
        result = outcome.result if outcome.error is None else {"error": outcome.error}
        content = json.dumps(result, default=str)
        await self._emitter.tool(
            call_id=call_id,
            name=name,
            arguments=shown,
            status=outcome.status,
            result=result,
            duration_ms=int((time.monotonic() - started) * 1000),
            record={"state": "done", "content": content},
            server=server,
        )
        self._status.progress(usage=self.usage.as_status())
        return content
