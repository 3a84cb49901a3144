"""The registry of running runs: start, resume, stop and finish AgentRuns as asyncio tasks.

Owns one task per run uid (not kopf daemons: a daemon that ends is not restarted, and kopf
applies a daemon's patches only when it exits), the concurrency limit with its queue
(oldest first), each run's Redis lease, its event writer, its status writes (phase changes
at once, progress at most every AGENTRUN_STATUS_INTERVAL_SECONDS, never per token), and
exactly-once tool calls. Never writes ``spec``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import openai
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import RunnableConfig
from langgraph.types import Command
from redis import asyncio as aioredis
from redis import exceptions as redis_errors

from agentrun_operator import (
    approvals,
    config,
    events,
    kube,
    llm,
    models,
    notify,
    status,
    tools,
    workflow,
)
from agentrun_operator import metrics as prom

log = logging.getLogger("agentrun.runs")
audit_log = logging.getLogger("agentrun.audit")


def audit(action: str, **fields: Any) -> None:
    """One structured JSON line per decision and stop, for log pipelines."""
    audit_log.info(json.dumps({"audit": action, "at": events.now_rfc3339(), **fields}))


def _parse_duration(text: str) -> float:
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


@dataclass
class RunRef:
    namespace: str
    name: str
    uid: str
    generation: int | None
    created: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> RunRef:
        meta = body["metadata"]
        return cls(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            generation=meta.get("generation"),
            created=meta.get("creationTimestamp", ""),
        )

    def involved(self) -> dict[str, Any]:
        return {
            "apiVersion": models.API_VERSION,
            "kind": "AgentRun",
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid},
        }


class RunFailed(Exception):
    """The run cannot go on; ``code`` is the reason, ``message`` says what to fix."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    ttft_ms: int | None = None
    llm_calls: int = 0
    tool_calls: int = 0

    def add(self, m: llm.CallMetrics) -> None:
        self.input_tokens += m.input_tokens
        self.output_tokens += m.output_tokens
        self.cached_tokens += m.cached_tokens
        self.cost_usd = round(self.cost_usd + m.cost_usd, 8)
        self.llm_calls += 1
        if self.ttft_ms is None:
            self.ttft_ms = m.ttft_ms

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def as_status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
            "totalTokens": self.total_tokens,
            "cachedTokens": self.cached_tokens,
            "costUSD": self.cost_usd,
            "llmCalls": self.llm_calls,
            "toolCalls": self.tool_calls,
        }
        if self.ttft_ms is not None:
            body["ttftMs"] = self.ttft_ms
        return body

    @classmethod
    def from_status(cls, body: Mapping[str, Any] | None) -> Usage:
        body = body or {}
        return cls(
            input_tokens=int(body.get("inputTokens", 0)),
            output_tokens=int(body.get("outputTokens", 0)),
            cached_tokens=int(body.get("cachedTokens", 0)),
            cost_usd=float(body.get("costUSD", 0.0)),
            ttft_ms=body.get("ttftMs"),
            llm_calls=int(body.get("llmCalls", 0)),
            tool_calls=int(body.get("toolCalls", 0)),
        )


class StatusWriter:
    """Phase changes go out at once; progress at most every ``interval`` seconds."""

    def __init__(self, k: kube.Kube, ref: RunRef, *, current: dict[str, Any], interval: float):
        self._kube = k
        self._ref = ref
        self.current = dict(current)
        self._interval = interval
        self._pending: dict[str, Any] = {}
        self._task: asyncio.Task[None] | None = None
        self.writes = 0

    async def _send(self, patch: dict[str, Any]) -> None:
        for attempt in range(5):
            try:
                await self._kube.patch_agentrun_status(
                    namespace=self._ref.namespace, name=self._ref.name, status=patch
                )
                self.writes += 1
                self.current.update(patch)
                return
            except kube.KubeError as e:
                if e.status == 404:
                    return  # deleted meanwhile: nothing to report to
                if attempt == 4:
                    raise
            except Exception:  # network trouble talking to the API server: retry a bit
                if attempt == 4:
                    raise
            await asyncio.sleep(min(0.2 * 2**attempt, 3))

    async def phase(
        self, phase: str, *, reason: str, message: str, **fields: Any
    ) -> dict[str, Any]:
        patch = status.phase_patch(
            current=self.current,
            phase=phase,
            reason=reason,
            message=message,
            generation=self._ref.generation,
            now=events.now_rfc3339(),
            **fields,
        )
        patch = {**self._pending, **patch}
        self._pending = {}
        await self._send(patch)
        return patch

    def progress(self, **fields: Any) -> None:
        self._pending.update({k: v for k, v in fields.items() if v is not None})
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._interval)
        if self._pending:
            patch, self._pending = self._pending, {}
            with contextlib.suppress(Exception):
                await self._send(patch)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class Emitter:
    """A run's events in order: tokens coalesced into short batches, everything else at once."""

    def __init__(self, writer: events.EventWriter, statusw: StatusWriter, *, flush_ms: int) -> None:
        self._writer = writer
        self._status = statusw
        self._flush_s = flush_ms / 1000
        self._lock = asyncio.Lock()
        self._buf = ""
        self._buf_node = ""
        self._timer: asyncio.TimerHandle | None = None
        self._flusher: asyncio.Task[None] | None = None  # keeps the timer's task alive
        # A timed flush that failed (Redis away): the run's next call raises it, so the
        # failure is neither lost in a background task nor the tokens with it.
        self._failed: Exception | None = None
        self.step = 0

    async def emit(
        self,
        type: events.EventType,
        data: Mapping[str, Any],
        *,
        call: tuple[str, dict[str, Any]] | None = None,
    ) -> str:
        """Append an event; ``call`` (call id, record) is stored with it atomically."""
        record = None if call is None else (call[0], json.dumps(call[1]))
        async with self._lock:
            await self._flush_tokens_locked()
            event_id = await self._writer.append(type, data, call=record)
        if type != "token":
            self._status.progress(lastEventId=event_id)
        return event_id

    async def token(self, text: str, node: str) -> None:
        async with self._lock:
            self._raise_failed()
            if self._buf and node != self._buf_node:
                await self._flush_tokens_locked()
            self._buf += text
            self._buf_node = node
            if len(self._buf) >= 256 or self._flush_s == 0:
                await self._flush_tokens_locked()
            elif self._timer is None:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self._flush_s, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        self._flusher = asyncio.create_task(self._flush_in_background())

    async def _flush_in_background(self) -> None:
        try:
            await self.flush()
        except Exception as e:
            self._failed = e

    async def flush(self) -> None:
        async with self._lock:
            await self._flush_tokens_locked()

    def _raise_failed(self) -> None:
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed

    async def _flush_tokens_locked(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._raise_failed()
        if self._buf:
            await self._writer.append("token", {"text": self._buf, "node": self._buf_node})
            self._buf = ""  # only once it is in the stream

    @property
    def last_id(self) -> str | None:
        return self._writer.last_id

    async def workflow(self, state: str, *, node: str, step: int) -> None:
        self.step = step
        await self.emit("workflow", {"state": state, "node": node, "step": step})

    async def fault(self, message: str, *, code: str, fatal: bool) -> None:
        await self.emit("fault", {"message": message, "code": code, "fatal": fatal})


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
        usage: Usage,
        sa_kube: kube.ServiceAccountKube,
        redis: aioredis.Redis,
    ) -> None:
        self.goal = spec.goal
        self.namespace = ref.namespace
        self.max_steps = spec.limits.max_steps
        self.tools: Sequence[str] = list(spec.tools)
        self.required: frozenset[str] = frozenset(spec.approval.required)
        self._ref = ref
        self._spec = spec
        self._settings = settings
        self._chat = chat
        self._chat_tools = chat.bind_tools(tools.openai_tools(self.tools)) if self.tools else chat
        self._model_name = model_name
        self._emitter = emitter
        self._status = statusw
        self.usage = usage
        self._kube = sa_kube
        self._redis = redis
        self._prices = settings.price_table()
        self._last_input_tokens = 0  # the previous call's prompt, for the budget estimate

    def mint_call_id(self) -> str:
        return "c-" + secrets.token_hex(6)

    def argument_error(self, name: str, arguments: dict[str, Any]) -> str | None:
        return _argument_error(name, arguments)

    async def workflow_event(self, state: str, *, node: str, step: int) -> None:
        await self._emitter.workflow(state, node=node, step=step)
        self._status.progress(step=step)

    async def llm(
        self, messages: Sequence[BaseMessage], *, node: str, with_tools: bool
    ) -> AIMessage:
        chat = self._chat_tools if with_tools else self._chat

        async def on_token(text: str) -> None:
            await self._emitter.token(text, node)

        try:
            message, metrics = await llm.stream_call(
                chat,
                messages,
                on_token=on_token,
                model_name=self._model_name,
                prices=self._prices,
                budget=self._budget_check(),
            )
        except openai.APIStatusError as e:
            raise RunFailed(
                "ModelEndpointError",
                f"model endpoint {self._base_url()} answered HTTP {e.status_code}: "
                f"{_short(e.message)}",
            ) from e
        except openai.APIConnectionError as e:
            raise RunFailed(
                "ModelEndpointUnreachable",
                f"model endpoint {self._base_url()} unreachable: {_short(str(e))}; check "
                "spec.model.baseURL or the operator's AGENTRUN_MODEL_BASE_URL",
            ) from e
        await self._emitter.flush()
        self.usage.add(metrics)
        self._last_input_tokens = metrics.input_tokens
        prom.llm_call(
            namespace=self.namespace,
            model=self._model_name,
            input_tokens=metrics.input_tokens,
            output_tokens=metrics.output_tokens,
            cached_tokens=metrics.cached_tokens,
            cost_usd=metrics.cost_usd,
            ttft_ms=metrics.ttft_ms,
            ttr_ms=metrics.ttr_ms,
        )
        await self._emitter.emit(
            "metrics",
            {
                "node": node,
                "inputTokens": metrics.input_tokens,
                "outputTokens": metrics.output_tokens,
                "cachedTokens": metrics.cached_tokens,
                "costUSD": metrics.cost_usd,
                "ttftMs": metrics.ttft_ms,
                "ttrMs": metrics.ttr_ms,
                "total": self.usage.as_status(),
            },
        )
        self._status.progress(usage=self.usage.as_status())
        self._check_budget(self.usage.total_tokens, self.usage.cost_usd, estimated=False)
        return message

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

    async def tool_call(
        self,
        *,
        name: str,
        arguments: dict[str, Any],
        call_id: str,
        decision: workflow.Decision | None,
    ) -> str:
        key = events.calls_key(self._ref.uid)
        raw = await self._redis.hget(key, call_id)
        record: dict[str, Any] = json.loads(raw) if raw else {}
        if record.get("state") == "done":
            return str(record["content"])  # already executed and reported once
        # What people see of the call (stream, call record): Secret values redacted.
        base = {
            "callId": call_id,
            "name": name,
            "arguments": tools.redacted_arguments(name, arguments),
        }
        started = time.monotonic()
        if decision is None:
            # Arguments that can never run: no person was asked (the gate skips such calls)
            # and nothing starts; the model gets the error, naming the argument to fix.
            error = self.argument_error(name, arguments)
            if error is not None:
                return await self._report(base, tools.ToolOutcome("failed", None, error), started)
        if name in self.required and (decision or {}).get("decision") != "approved":
            d = decision or {
                "decision": "denied",
                "by": "agentrun",
                "comment": "approval is required and none was given",
            }
            content = json.dumps(
                {
                    "error": f"the call was {d.get('decision', 'denied')} by "
                    f"{d.get('by') or 'nobody'}",
                    "comment": d.get("comment", ""),
                    "hint": "do not retry this call; continue without it",
                }
            )
            await self._emitter.emit(
                "tool",
                {**base, "status": "denied", "result": json.loads(content), "durationMs": 0},
                call=(call_id, {"state": "done", "content": content}),
            )
            prom.TOOL_CALLS.labels(name, "denied").inc()
            return content
        outcome: tools.ToolOutcome | None = None
        if record.get("state") == "started" and name in models.MUTATING_TOOLS:
            # We crashed after starting this call: did it land? Ask the object, not memory.
            landed = await tools.landed(
                self._kube,
                name=name,
                arguments=arguments,
                namespace=self.namespace,
                call_id=call_id,
            )
            if landed is True:
                outcome = tools.ToolOutcome(
                    status="succeeded",
                    result={"note": "this call took effect before an operator restart"},
                    error=None,
                )
            elif landed is None:
                outcome = tools.ToolOutcome(
                    status="unknown",
                    result=None,
                    error="the operator restarted during this call and cannot tell whether "
                    "it took effect; check the object before trying again",
                )
        else:
            await self._emitter.emit(
                "tool", {**base, "status": "started"}, call=(call_id, {"state": "started"})
            )
        if outcome is None:
            outcome = await tools.run_tool(
                self._kube,
                name=name,
                arguments=arguments,
                namespace=self.namespace,
                call_id=call_id,
                max_bytes=self._settings.tool_result_max_bytes,
            )
        return await self._report(base, outcome, started)

    async def _report(
        self, base: dict[str, Any], outcome: tools.ToolOutcome, started: float
    ) -> str:
        """A call's outcome as its ``tool`` event and call record, in one step (so a resumed
        run reports it once); the content the model sees."""
        self.usage.tool_calls += 1
        prom.TOOL_CALLS.labels(base["name"], outcome.status).inc()
        payload: dict[str, Any] = {
            **base,
            "status": outcome.status,
            "result": outcome.result if outcome.error is None else {"error": outcome.error},
            "durationMs": int((time.monotonic() - started) * 1000),
        }
        content = json.dumps(payload["result"], default=str)
        await self._emitter.emit(
            "tool", payload, call=(base["callId"], {"state": "done", "content": content})
        )
        self._status.progress(usage=self.usage.as_status())
        return content


def _argument_error(name: str, arguments: dict[str, Any]) -> str | None:
    """What makes a call's arguments unable to ever run (as the model sees it), or None."""
    try:
        tools.parse_arguments(name, arguments)
    except tools.ArgumentError as e:
        return f"{name}: {e}"
    return None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# A status message written while a run waits for Redis or the API server; the run's next
# status write replaces it.
WAITING = "Waiting: "


def unavailable(e: BaseException) -> str | None:
    """What could not be reached, past the clients' own retries ("Redis", "the Kubernetes
    API"), or None when ``e`` is not about reaching something."""
    if isinstance(e, kube.KubeError):
        # 0: no connection; 429: "storage is (re)initializing" while kube-apiserver starts.
        return "the Kubernetes API" if e.status in (0, 429, 502, 503, 504) else None
    if isinstance(e, redis_errors.ConnectionError | redis_errors.TimeoutError):
        return "Redis"  # BusyLoadingError (Redis loading its AOF) is a ConnectionError
    return None


def _waiting(st: Mapping[str, Any]) -> bool:
    return str(st.get("message") or "").startswith(WAITING)


@dataclass
class _Slot:
    ref: RunRef
    task: asyncio.Task[None]
    stop_by: str | None = None
    stopping: bool = False
    finishing: bool = False
    deleted: bool = False
    recheck: bool = False  # a vote came while the task ran: look at the approvals again
    enforcer: asyncio.Task[None] | None = None
    emitter: Emitter | None = None  # the run's stream while its task holds the lease


@dataclass
class Registry:
    """Every run this operator process executes, keyed by uid."""

    settings: config.Settings
    k8s: kube.Kube
    redis: aioredis.Redis
    saver: Any
    notifier: notify.Notifier | None = None
    running: dict[str, _Slot] = field(default_factory=dict)
    queued: dict[str, RunRef] = field(default_factory=dict)
    ttl_tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    expiries: dict[str, tuple[dt.datetime, RunRef]] = field(default_factory=dict)
    # Uids of runs deleted while Redis was unreachable: their keys are deleted once it is back.
    leftovers: set[str] = field(default_factory=set)
    # This cluster's identity (the kube-system namespace's uid), stamped on every run's keys
    # so that the sweep never touches another cluster's runs in a shared Redis. "": no sweep.
    cluster_id: str = ""
    _closing: bool = False

    # -- entry points from handlers -----------------------------------------------------
    async def ensure(self, body: Mapping[str, Any]) -> None:
        """Make sure a run that should be running is (create, resume, operator restart)."""
        ref = RunRef.of(body)
        st = body.get("status") or {}
        spec = body.get("spec") or {}
        phase = st.get("phase")
        if phase in models.FINISHED_PHASES:
            with contextlib.suppress(ValueError):  # a spec the models refuse: no TTL to keep
                self._schedule_ttl(ref, models.effective_spec(body), st)
            return
        if spec.get("stop"):
            await self.stop(body, by=_stopped_by(body))
            return
        if not isinstance(st.get("effective"), Mapping):
            fixed = await self._fix_settings(ref, body)
            if fixed is None:
                return
            st = fixed
        if ref.uid in self.running or ref.uid in self.queued:
            return
        # AwaitingApproval holds no task; starting one checks the decisions (made while
        # the operator was down, too) and ends at once if people have not decided yet.
        if len(self.running) >= self.settings.max_concurrent_runs:
            self.queued[ref.uid] = ref
            await self._mark_queued(ref, st)
            return
        self._start(ref)

    async def _fix_settings(self, ref: RunRef, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """The first sight of a run: fix its settings in status.effective (with its creator),
        which the operator and the approval webhook use from then on. Returns the new status,
        or None when the run cannot start.

        A run never seen before whose spec already changed (generation > 1: only a webhook
        outage lets that through) fails, since nobody can tell which settings its creator
        meant. A run seen by an operator from before status.effective existed (it has a
        phase) fixes its settings from its spec now, at its resume."""
        st: dict[str, Any] = dict(body.get("status") or {})
        generation = int((body.get("metadata") or {}).get("generation") or 1)
        if st.get("phase") is None and generation > 1:
            await self._finish_without_task(
                ref,
                st,
                by=None,
                phase="Failed",
                reason="SpecChangedBeforeStart",
                message=(
                    f"the spec changed before the operator first saw the run (generation "
                    f"{generation}), which only an admission webhook outage allows; its "
                    "settings cannot be trusted: create a new AgentRun"
                ),
            )
            return None
        fixed = {
            "effective": self._settings_of(body, generation=generation),
            "createdBy": st.get("createdBy") or _annotation(body, approvals.CREATED_BY),
        }
        await self.k8s.patch_agentrun_status(namespace=ref.namespace, name=ref.name, status=fixed)
        return {**st, **fixed}

    def _settings_of(self, body: Mapping[str, Any], *, generation: int | None) -> dict[str, Any]:
        """status.effective for a run's spec: its settings after defaults, the operator's
        default model included (a later change of the operator's configuration does not
        move a run that already started to another model)."""
        spec = models.AgentRunSpec.model_validate(body.get("spec") or {})
        spec.model.name = spec.model.name or self.settings.model_name
        spec.model.base_url = spec.model.base_url or self.settings.model_base_url
        return models.effective_settings(spec, generation=generation)

    async def spec_changed(self, body: Mapping[str, Any]) -> None:
        """A spec edit after the settings were fixed (the AgentRun webhook refuses it, but
        it fails open so that nothing blocks spec.stop): ignore it, and say so."""
        st = body.get("status") or {}
        effective = st.get("effective")
        if not isinstance(effective, Mapping) or st.get("phase") in models.FINISHED_PHASES:
            return
        ref = RunRef.of(body)
        live = self._settings_of(body, generation=None)
        fixed = {k: v for k, v in effective.items() if k != "generation"}
        live.pop("generation", None)
        changed = sorted(k for k in set(live) | set(fixed) if live.get(k) != fixed.get(k))
        if not changed:
            return
        message = (
            f"ignored a change of {', '.join(f'spec.{k}' for k in changed)} (generation "
            f"{(body.get('metadata') or {}).get('generation')}): a run keeps the settings fixed "
            "when it started (status.effective); only spec.stop takes effect"
        )
        log.warning("run %s: %s", ref.key, message)
        audit("spec-change-ignored", run=ref.key, fields=changed)
        await self.k8s.post_event(
            involved=ref.involved(), type="Warning", reason="SpecChangeIgnored", message=message
        )
        slot = self.running.get(ref.uid)
        if slot is not None and slot.emitter is not None:
            with contextlib.suppress(Exception):
                await slot.emitter.fault(message, code="SpecChangeIgnored", fatal=False)
                return
        if slot is None and ref.uid not in self.queued:
            # Waiting for people, with no task: say it in the stream now. (Never while a
            # task of ours is between leases: borrowing would fence it.)
            async with self._borrowed_stream(ref, dict(st)) as borrowed:
                if borrowed is not None:
                    await borrowed[0].fault(message, code="SpecChangeIgnored", fatal=False)
                    return
        # The task that next runs it (here or in another operator) says it first.
        await self.redis.hset(events.meta_key(ref.uid), "ignored", message)

    async def stop(self, body: Mapping[str, Any], *, by: str | None) -> None:
        ref = RunRef.of(body)
        slot = self.running.get(ref.uid)
        if slot is not None:
            self._cancel(slot, by=by)
            return
        self.queued.pop(ref.uid, None)
        st = body.get("status") or {}
        if st.get("phase") in models.FINISHED_PHASES:
            return
        # Not running here (queued, waiting for approval, or never started): finish it now.
        await self._finish_without_task(ref, st, by=by)

    async def decided(self, approval: Mapping[str, Any]) -> None:
        """Someone voted on a ToolApproval: let its run look at the decisions."""
        namespace = approval["metadata"]["namespace"]
        run = (approval.get("spec") or {}).get("runName")
        body = await self.k8s.get_agentrun(namespace=namespace, name=run) if run else None
        if body is None:
            return
        slot = self.running.get(body["metadata"]["uid"])
        if slot is not None:
            # Its task may have read the approvals just before this vote and be about to
            # end, waiting for it: have it look once more when it ends.
            slot.recheck = True
        elif (body.get("status") or {}).get("phase") not in models.FINISHED_PHASES:
            # Not only AwaitingApproval: the phase read may predate that status write by
            # a task that has ended since. A task started for nothing ends at the gate.
            await self.ensure(body)

    async def stop_uid(self, uid: str, *, by: str | None) -> bool:
        """Stop from the Redis control channel: only a run this process executes."""
        slot = self.running.get(uid)
        if slot is None:
            return False
        self._cancel(slot, by=by)
        return True

    def _cancel(self, slot: _Slot, *, by: str | None) -> None:
        slot.stop_by = slot.stop_by or by or ""
        if slot.stopping:
            # A stop arrives twice when it comes from the UI or API (spec.stop and the
            # control channel): cancelling again could cut the finishing of the first.
            return
        slot.stopping = True
        slot.task.cancel()
        if slot.enforcer is None:
            slot.enforcer = asyncio.create_task(self._enforce_stop(slot))

    async def _enforce_stop(self, slot: _Slot) -> None:
        # Python 3.11's asyncio.wait_for (used inside client libraries) can swallow a
        # cancellation that races with its inner future; a stop must never be lost, so
        # cancel again until the run is finishing.
        for _ in range(150):
            await asyncio.sleep(0.2)
            if slot.task.done() or slot.finishing:
                return
            log.warning("run %s did not stop yet; cancelling again", slot.ref.key)
            slot.task.cancel()

    async def forget(self, body: Mapping[str, Any]) -> None:
        """The AgentRun is being deleted: cancel its task and delete its Redis keys."""
        ref = RunRef.of(body)
        self.queued.pop(ref.uid, None)
        ttl = self.ttl_tasks.pop(ref.uid, None)
        if ttl is not None:
            ttl.cancel()
        slot = self.running.get(ref.uid)
        if slot is not None:
            slot.deleted = True
            self._cancel(slot, by=slot.stop_by or "deletion")
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(slot.task), timeout=10)
        # Its approvals go with it (ownerReferences); until the garbage collector gets
        # there, nobody should see them as decidable.
        with contextlib.suppress(Exception):
            for ta in await self._approvals(ref):
                if (ta.get("status") or {}).get("state") in (None, "Pending"):
                    await self.k8s.patch_toolapproval_status(
                        namespace=ref.namespace,
                        name=ta["metadata"]["name"],
                        status={"state": "Cancelled", "message": "the run was deleted"},
                    )
        await events.delete_run_keys(self.redis, ref.uid)

    async def close(self) -> None:
        """Operator shutdown: cancel tasks without finishing runs, so they resume later."""
        self._closing = True
        for task in self.ttl_tasks.values():
            task.cancel()
        pending = {slot.task for slot in self.running.values()}
        for _ in range(40):  # re-cancel: a cancellation can be swallowed (see _enforce_stop)
            if not pending:
                break
            for task in pending:
                task.cancel()
            _done, pending = await asyncio.wait(pending, timeout=0.5)

    # -- control channel -----------------------------------------------------------------
    async def listen_control(self) -> None:
        backoff = 0.5
        while not self._closing:
            try:
                pubsub = self.redis.pubsub()
                await pubsub.psubscribe(events.CONTROL_PATTERN)
                backoff = 0.5
                async for msg in pubsub.listen():
                    if msg.get("type") != "pmessage":
                        continue
                    channel = msg["channel"]
                    uid = events.uid_from_control_channel(
                        channel.decode() if isinstance(channel, bytes) else str(channel)
                    )
                    try:
                        data = json.loads(msg["data"])
                    except (ValueError, TypeError):
                        log.warning("ignoring a malformed control message on %s", channel)
                        continue
                    if uid and isinstance(data, dict) and data.get("action") == "stop":
                        await self.stop_uid(uid, by=str(data.get("by") or "") or None)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("control channel lost (%s); reconnecting in %.1fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)

    # -- internals ----------------------------------------------------------------------
    def _notify(self, ref: RunRef, event: str, text: str, **fields: Any) -> None:
        if self.notifier is not None:
            self.notifier.publish(
                namespace=ref.namespace, event=event, text=text, run=ref.name, **fields
            )

    def _gauges(self) -> None:
        prom.RUNS_ACTIVE.labels("running").set(len(self.running))
        prom.RUNS_ACTIVE.labels("queued").set(len(self.queued))

    def _start(self, ref: RunRef) -> None:
        task = asyncio.create_task(self._supervise(ref), name=f"agentrun:{ref.key}")
        self.running[ref.uid] = _Slot(ref=ref, task=task)
        self._gauges()
        uid = ref.uid
        task.add_done_callback(lambda t: self._done(uid, t))

    def _done(self, uid: str, task: asyncio.Task[None]) -> None:
        self.running.pop(uid, None)
        self._gauges()
        if not task.cancelled() and task.exception() is not None:
            log.error("run task %s crashed", task.get_name(), exc_info=task.exception())
        if self._closing or not self.queued:
            return
        # Oldest first (creationTimestamp, then name for a stable order).
        nxt = min(self.queued.values(), key=lambda r: (r.created, r.key))
        self.queued.pop(nxt.uid)
        self._start(nxt)

    async def _mark_queued(self, ref: RunRef, st: dict[str, Any]) -> None:
        msg = (
            f"waiting for a free slot: {len(self.running)} runs are executing "
            f"(AGENTRUN_MAX_CONCURRENT_RUNS={self.settings.max_concurrent_runs})"
        )
        w = StatusWriter(self.k8s, ref, current=st, interval=self.settings.status_interval_seconds)
        with contextlib.suppress(Exception):
            await w.phase(
                "Pending",
                reason="Queued",
                message=msg,
                streamPath=events.stream_path(ref.namespace, ref.name),
            )

    async def _acquire(self, ref: RunRef) -> events.Lease:
        """Wait until this process owns the run (another operator may hold it)."""
        delay = 0.2
        while True:
            lease = await events.Lease.acquire(
                self.redis,
                uid=ref.uid,
                operator_id=self.settings.operator_id,
                ttl_seconds=self.settings.lease_seconds,
            )
            if lease is not None:
                await self._stamp(ref)
                return lease
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.lease_seconds / 3)

    async def _stamp(self, ref: RunRef) -> None:
        """Mark the run's keys as this cluster's: only such keys are ever swept."""
        if self.cluster_id:
            await self.redis.hset(events.meta_key(ref.uid), "cluster", self.cluster_id)

    async def _keep_lease(self, lease: events.Lease, main: asyncio.Task[Any]) -> bool:
        """Renew the lease while the run executes; True once it is lost (``main`` cancelled)."""
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            try:
                ok = await lease.renew()
            except Exception as e:
                log.warning("lease renewal of %s failed: %s", lease.uid, e)
                continue
            if not ok:
                log.error("lost the lease of run %s; stopping local execution", lease.uid)
                main.cancel()
                return True

    async def _supervise(self, ref: RunRef) -> None:
        """The task of one run. Redis or the API server unreachable past the clients' own
        retries is not the run's fault: say so in its status, wait, and resume it from its
        checkpoint (exactly-once holds as across an operator restart), rather than leave
        the run without a task until the operator restarts."""
        delay = 1.0
        while True:
            try:
                if not await self._run(ref):
                    slot = self.running.get(ref.uid)
                    if slot is None or not slot.recheck or slot.stopping:
                        return
                    slot.recheck = False
                    continue
                why = "its lease expired while Redis was unreachable"
            except Exception as e:
                what = unavailable(e)
                if what is None or self._closing:
                    raise
                why = f"{what} is unreachable ({_short(str(e), 200)})"
            slot = self.running.get(ref.uid)
            if slot is None or slot.deleted:
                return
            log.warning("run %s: %s; resuming in %.0fs", ref.key, why, delay)
            with contextlib.suppress(Exception):  # the API server may be what is down
                await self.k8s.patch_agentrun_status(
                    namespace=ref.namespace,
                    name=ref.name,
                    status={
                        "message": f"{WAITING}{why}; the run resumes from its checkpoint once "
                        f"it is back (next try in {delay:.0f}s)"
                    },
                )
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                if not slot.stopping:
                    raise
                _uncancel()  # stopped while waiting: the next try finishes it as Stopped
            delay = min(delay * 2, 10.0)

    async def _run(self, ref: RunRef) -> bool:
        """Execute the run until it ends, waits for people or is stopped. True when it must
        be tried again: its lease expired (Redis was away) and nobody else holds it."""
        body = await self.k8s.get_agentrun(namespace=ref.namespace, name=ref.name)
        if body is None or body["metadata"]["uid"] != ref.uid:
            return False
        st: dict[str, Any] = dict(body.get("status") or {})
        slot = self.running.get(ref.uid)
        if slot is not None and slot.stopping:
            # Stopped while it waited for Redis or the API server: finish, do not run it.
            slot.finishing = True
            await self._finish_without_task(
                ref, st, by=slot.stop_by, message=f"stopped by {slot.stop_by or 'a stop request'}"
            )
            return False
        try:
            lease = await self._acquire(ref)
        except asyncio.CancelledError:
            slot = self.running.get(ref.uid)
            if slot is None or not slot.stopping:
                raise
            slot.finishing = True
            _uncancel()
            await self._finish_without_task(ref, st, by=slot.stop_by)
            return False
        me = asyncio.current_task()
        assert me is not None
        keeper = asyncio.create_task(self._keep_lease(lease, me))
        statusw = StatusWriter(
            self.k8s, ref, current=st, interval=self.settings.status_interval_seconds
        )
        writer = events.EventWriter(
            self.redis,
            uid=ref.uid,
            run=ref.key,
            lease=lease,
            maxlen=self.settings.stream_maxlen,
        )
        emitter = Emitter(writer, statusw, flush_ms=self.settings.token_flush_ms)
        if slot is not None:
            slot.emitter = emitter
        fenced = False
        try:
            if not await self._ended_before(ref, statusw):
                await self._execute(ref, body, st, emitter, statusw)
        except events.Fenced:
            fenced = True
            log.warning("run %s: lease lost", ref.key)
        except asyncio.CancelledError:
            slot = self.running.get(ref.uid)
            if slot is None or not slot.stopping:
                lost = keeper.done() and not keeper.cancelled() and keeper.result()
                if not lost or self._closing:
                    raise  # operator shutdown: leave the run as it is, to resume later
                _uncancel()  # the keeper lost the lease: see below who holds it now
                fenced = True
            else:
                slot.finishing = True
                _uncancel()
                try:
                    await emitter.flush()
                    await self._finish(
                        ref,
                        emitter,
                        statusw,
                        phase="Stopped",
                        reason="Stopped",
                        message=f"stopped by {slot.stop_by or 'a stop request'}",
                        stopped_by=slot.stop_by,
                    )
                except events.Fenced:
                    fenced = True  # a retry finishes it (see _run's start) if nobody owns it
        finally:
            if slot is not None:
                slot.emitter = None
            keeper.cancel()
            await statusw.close()
            if not fenced:
                with contextlib.suppress(Exception):
                    await lease.release()
        if not fenced:
            return False
        # Another operator owns it now (it goes on there), or the lease expired while Redis
        # was away and nobody holds it: then it goes on here, from its checkpoint.
        return await self.redis.get(events.owner_key(ref.uid)) is None

    async def _execute(
        self,
        ref: RunRef,
        body: Mapping[str, Any],
        st: dict[str, Any],
        emitter: Emitter,
        statusw: StatusWriter,
    ) -> None:
        spec = models.effective_spec(body)
        last_usage = await self._last_usage(ref)
        usage = last_usage or Usage.from_status(st.get("usage"))
        config_: RunnableConfig = {
            "configurable": {"thread_id": ref.uid},
            "recursion_limit": spec.limits.max_steps * 4 + 20,
        }
        has_history = bool(await self.redis.exists(events.events_key(ref.uid)))
        try:
            sa_kube = self.k8s.as_service_account(
                namespace=ref.namespace, name=spec.service_account_name
            )
            model = await self._resolve_model(spec, sa_kube)
            if (
                spec.limits.max_cost_usd is not None
                and llm.price_of(model.name, self.settings.price_table()) is None
            ):
                raise RunFailed(
                    "PriceUnknown",
                    f"spec.limits.maxCostUSD is set, but the operator has no price for model "
                    f"{model.name}, so the limit could never trip: add one to AGENTRUN_PRICES "
                    f'(JSON, US dollars per 1M tokens, e.g. {{"{model.name}": {{"input": 0.5, '
                    '"output": 1.5}}) or the chart value operator.prices',
                )
            chat = llm.build(
                model,
                timeout=self.settings.llm_timeout_seconds,
                max_retries=self.settings.llm_max_retries,
            )
            deps = RunDeps(
                ref=ref,
                spec=spec,
                settings=self.settings,
                chat=chat,
                model_name=model.name,
                emitter=emitter,
                statusw=statusw,
                usage=usage,
                sa_kube=sa_kube,
                redis=self.redis,
            )
            graph = workflow.build(deps, checkpointer=self.saver)
            snapshot = await graph.aget_state(config_)
            resuming = bool(snapshot.values)
            inp: Any = None if resuming else workflow.initial_state(deps)
            if snapshot.interrupts:
                # Waiting at the approval gate: go on only once every call is settled.
                inp = await self._gate(ref, spec, snapshot.interrupts, emitter, statusw)
                if inp is None:
                    return
            if has_history:
                await emitter.workflow("resumed", node="", step=int(st.get("step") or 0))
            else:
                await emitter.workflow("pending", node="", step=0)
            ignored = await self.redis.hget(events.meta_key(ref.uid), "ignored")
            if ignored:
                text = ignored.decode() if isinstance(ignored, bytes) else str(ignored)
                await emitter.fault(text, code="SpecChangeIgnored", fatal=False)
                await self.redis.hdel(events.meta_key(ref.uid), "ignored")
            if statusw.current.get("phase") != "Running" or _waiting(statusw.current):
                await statusw.phase(
                    "Running",
                    reason="Resumed" if resuming else "Started",
                    message="the agent is working" if not resuming else "resumed from checkpoint",
                    streamPath=events.stream_path(ref.namespace, ref.name),
                    pendingApprovals=[],
                    pendingApprovalCount=0,
                )
                await self.k8s.post_event(
                    involved=ref.involved(),
                    type="Normal",
                    reason="Running",
                    message="run resumed" if resuming else "run started",
                )
            waited = float(await self.redis.hget(events.meta_key(ref.uid), "waited") or 0)
            elapsed = _elapsed_since(statusw.current.get("startedAt")) - waited
            remaining = _parse_duration(spec.limits.timeout) - elapsed
            if remaining <= 0:
                raise workflow.LimitExceeded(
                    "TimeoutExceeded",
                    f"time limit reached: spec.limits.timeout is {spec.limits.timeout}",
                )
            try:
                async with asyncio.timeout(remaining):
                    while True:
                        result = await graph.ainvoke(inp, config_)
                        interrupts = (
                            result.get("__interrupt__") if isinstance(result, dict) else None
                        )
                        if not interrupts:
                            break
                        inp = await self._gate(ref, spec, interrupts, emitter, statusw)
                        if inp is None:
                            return  # waits for people; this task ends, the checkpoint stays
            except TimeoutError:
                raise workflow.LimitExceeded(
                    "TimeoutExceeded",
                    f"time limit reached: spec.limits.timeout is {spec.limits.timeout}",
                ) from None
            answer = str(result.get("result") or "")
            await self._finish(
                ref,
                emitter,
                statusw,
                phase="Succeeded",
                reason="Succeeded",
                message="the agent finished",
                result=answer,
                usage=usage,
            )
        except workflow.LimitExceeded as e:
            await self._fail(ref, emitter, statusw, code=e.code, message=e.message, usage=usage)
        except RunFailed as e:
            await self._fail(ref, emitter, statusw, code=e.code, message=e.message, usage=usage)
        except (events.Fenced, asyncio.CancelledError):
            raise
        except kube.KubeError as e:
            if unavailable(e):
                raise  # not the run's fault: it waits and resumes (see _supervise)
            # The API server refused what the operator itself needed (not a tool call).
            log.exception("run %s: Kubernetes API error", ref.key)
            await self._fail(
                ref,
                emitter,
                statusw,
                code="KubernetesAPIError",
                message=f"the operator could not complete a Kubernetes API call: {e}",
                usage=usage,
            )

    async def _gate(
        self,
        ref: RunRef,
        spec: models.AgentRunSpec,
        interrupts: Any,
        emitter: Emitter,
        statusw: StatusWriter,
    ) -> Command[Any] | None:
        """Create or read the run's ToolApprovals; the resume command once all are settled.

        Idempotent: it runs again after a restart, a decision or an expiry, and creates,
        reports and settles each approval once.
        """
        items: list[dict[str, Any]] = []
        reason = ""
        for intr in interrupts:
            value = getattr(intr, "value", None) or {}
            items += list(value.get("approvals") or [])
            reason = reason or str(value.get("reason") or "")
        policy = spec.approval
        now = dt.datetime.now(dt.UTC)
        existing = {(ta.get("spec") or {}).get("callId"): ta for ta in await self._approvals(ref)}
        decisions: dict[str, workflow.Decision] = {}
        waiting: list[tuple[str, dt.datetime | None]] = []
        expired_stop = False
        for item in items:
            call_id = item["callId"]
            ta = existing.get(call_id)
            invalid = _argument_error(item["tool"], item.get("arguments") or {})
            # Shown to people (ToolApproval, events, notifications) with Secret values
            # redacted; the call itself runs with the checkpoint's own arguments.
            shown = tools.redacted_arguments(item["tool"], item.get("arguments") or {})
            if invalid is not None and (
                ta is None
                or approvals.settle(ta, min_approvals=policy.min_approvals, now=now) is None
            ):
                # A call paused before this operator judged arguments at the gate, whose
                # arguments can never run: nobody is asked (any approval still waiting is
                # cancelled), and the call fails as the tool error it is. A decision people
                # already made stands.
                if ta is not None and (ta.get("status") or {}).get("state") in (None, "Pending"):
                    await self._cancel_approval(
                        ref, emitter, ta, f"its arguments can never run: {invalid}"
                    )
                continue
            if ta is None:
                ta = await self.k8s.create_toolapproval(
                    namespace=ref.namespace,
                    body=approvals.toolapproval_body(
                        namespace=ref.namespace,
                        run=ref.name,
                        run_uid=ref.uid,
                        call_id=call_id,
                        tool=item["tool"],
                        arguments=shown,
                        reason=reason,
                    ),
                )
            name = ta["metadata"]["name"]
            if not (ta.get("status") or {}).get("state"):
                expires = now + dt.timedelta(seconds=_parse_duration(policy.timeout))
                ta = await self.k8s.patch_toolapproval_status(
                    namespace=ref.namespace,
                    name=name,
                    status={
                        "state": "Pending",
                        "expiresAt": approvals.rfc3339(expires),
                        "approvals": 0,
                        "approvalsNeeded": policy.min_approvals,
                    },
                )
                await emitter.emit(
                    "approval",
                    {
                        "callId": call_id,
                        "approval": name,
                        "tool": item["tool"],
                        "arguments": shown,
                        "state": "pending",
                        "decidedBy": "",
                    },
                )
                self._notify(
                    ref,
                    "approval.pending",
                    f"Run {ref.key} wants to call {item['tool']} "
                    f"{json.dumps(shown)}: approve or deny {name}",
                    approval=name,
                    callId=call_id,
                    tool=item["tool"],
                    state="pending",
                )
            settled = approvals.settle(ta, min_approvals=policy.min_approvals, now=now)
            if settled is None:
                approved, _ = approvals.tally(approvals.counted_votes(ta))
                if (ta.get("status") or {}).get("approvals") != len(approved):
                    await self.k8s.patch_toolapproval_status(
                        namespace=ref.namespace,
                        name=name,
                        status={
                            "approvals": len(approved),
                            "approvalsNeeded": max(0, policy.min_approvals - len(approved)),
                        },
                    )
                waiting.append(
                    (name, approvals.parse_time((ta.get("status") or {}).get("expiresAt")))
                )
                continue
            state = {"approved": "Approved", "denied": "Denied", "expired": "Expired"}[
                settled.outcome
            ]
            if (ta.get("status") or {}).get("state") != state:
                audit(
                    "approval",
                    run=ref.key,
                    approval=name,
                    callId=call_id,
                    tool=item["tool"],
                    outcome=settled.outcome,
                    by=settled.by,
                    votes=[
                        {k: v.get(k) for k in ("username", "decision", "comment")}
                        for v in settled.voters
                    ],
                )
                created = approvals.parse_time(ta["metadata"].get("creationTimestamp"))
                if created is not None:
                    prom.APPROVAL_WAIT.labels(ref.namespace, item["tool"], settled.outcome).observe(
                        max(0.0, (now - created).total_seconds())
                    )
                approved, _ = approvals.tally(settled.voters)
                await self.k8s.patch_toolapproval_status(
                    namespace=ref.namespace,
                    name=name,
                    status={
                        "state": state,
                        "decidedBy": settled.decided_by,
                        "decidedAt": approvals.rfc3339(now),
                        "approvals": len(approved),
                        "approvalsNeeded": max(0, policy.min_approvals - len(approved)),
                        "message": settled.comment or None,
                    },
                )
                await emitter.emit(
                    "approval",
                    {
                        "callId": call_id,
                        "approval": name,
                        "tool": item["tool"],
                        "arguments": shown,
                        "state": settled.outcome,
                        "decidedBy": settled.by if settled.outcome != "expired" else "",
                    },
                )
                self._notify(
                    ref,
                    "approval.expired" if settled.outcome == "expired" else "approval.decided",
                    f"{item['tool']} call of run {ref.key} {settled.outcome}"
                    + (f" by {settled.by}" if settled.outcome != "expired" else ""),
                    approval=name,
                    callId=call_id,
                    tool=item["tool"],
                    state=settled.outcome,
                    by=settled.by if settled.outcome != "expired" else "",
                )
                await self.k8s.post_event(
                    involved=ref.involved(),
                    type="Normal" if settled.outcome == "approved" else "Warning",
                    reason=f"Approval{state}",
                    message=f"{item['tool']} call {call_id} {settled.outcome}"
                    + (f" by {settled.by}" if settled.outcome != "expired" else ""),
                )
            if settled.outcome == "expired" and policy.on_timeout == "stop":
                expired_stop = True
            decisions[call_id] = {
                "decision": settled.outcome,
                "by": settled.by,
                "comment": settled.comment,
            }
        meta = events.meta_key(ref.uid)
        if expired_stop:
            await self._finish(
                ref,
                emitter,
                statusw,
                phase="Stopped",
                reason="ApprovalExpired",
                message="an approval expired and spec.approval.onTimeout is stop",
                stopped_by="approval-timeout",
            )
            return None
        if waiting:
            names = [n for n, _ in waiting]
            if statusw.current.get("phase") != "AwaitingApproval":
                await self.redis.hsetnx(meta, "awaiting_since", str(time.time()))
                await emitter.workflow("awaiting_approval", node="gate", step=emitter.step)
                await statusw.phase(
                    "AwaitingApproval",
                    reason="AwaitingApproval",
                    message=f"waiting for a decision on {', '.join(names)}",
                    pendingApprovals=names,
                    pendingApprovalCount=len(names),
                    lastEventId=emitter.last_id,
                )
                await self.k8s.post_event(
                    involved=ref.involved(),
                    type="Normal",
                    reason="AwaitingApproval",
                    message=f"waiting for a decision on {', '.join(names)}",
                )
            elif statusw.current.get("pendingApprovals") != names or _waiting(statusw.current):
                await statusw.phase(
                    "AwaitingApproval",
                    reason="AwaitingApproval",
                    message=f"waiting for a decision on {', '.join(names)}",
                    pendingApprovals=names,
                    pendingApprovalCount=len(names),
                )
            expiries = [e for _, e in waiting if e is not None]
            if expiries:
                self.expiries[ref.uid] = (min(expiries), ref)
            return None
        self.expiries.pop(ref.uid, None)
        since = await self.redis.hget(meta, "awaiting_since")
        if since is not None:
            await self.redis.hincrbyfloat(meta, "waited", max(0.0, time.time() - float(since)))
            await self.redis.hdel(meta, "awaiting_since")
        return Command(resume=decisions)

    async def _approvals(self, ref: RunRef) -> list[dict[str, Any]]:
        """This run's ToolApprovals (not those of an earlier run that had the same name)."""
        found = await self.k8s.list_toolapprovals(
            namespace=ref.namespace, label_selector=f"{approvals.RUN_LABEL}={ref.name}"
        )
        return [
            ta
            for ta in found
            if any(o.get("uid") == ref.uid for o in ta["metadata"].get("ownerReferences") or [])
        ]

    async def _cancel_pending_approvals(self, ref: RunRef, emitter: Emitter) -> None:
        for ta in await self._approvals(ref):
            if (ta.get("status") or {}).get("state") in (None, "Pending"):
                await self._cancel_approval(ref, emitter, ta, "the run finished")

    async def _cancel_approval(
        self, ref: RunRef, emitter: Emitter, ta: Mapping[str, Any], why: str
    ) -> None:
        spec = ta.get("spec") or {}
        await self.k8s.patch_toolapproval_status(
            namespace=ref.namespace,
            name=ta["metadata"]["name"],
            status={"state": "Cancelled", "decidedAt": events.now_rfc3339(), "message": why},
        )
        await emitter.emit(
            "approval",
            {
                "callId": spec.get("callId"),
                "approval": ta["metadata"]["name"],
                "tool": spec.get("tool"),
                "arguments": spec.get("arguments") or {},
                "state": "cancelled",
                "decidedBy": "",
            },
        )

    async def watch_expiries(self) -> None:
        """One loop for all runs waiting on people: wake a run when an approval expires."""
        while not self._closing:
            await asyncio.sleep(1)
            now = dt.datetime.now(dt.UTC)
            for uid, (when, ref) in list(self.expiries.items()):
                if when <= now and uid not in self.running:
                    self.expiries.pop(uid, None)
                    self._start(ref)

    async def sweep_leftovers(self, *, every: float = 5.0) -> None:
        """Delete the keys of runs deleted while Redis was unreachable, once it is back; and
        every ``AGENTRUN_ORPHAN_SWEEP_SECONDS`` (first a minute after start), the keys of any
        run that no longer exists: deleted while Redis was away and this operator restarted
        before it came back, or while no operator ran at all."""
        period = self.settings.orphan_sweep_seconds
        next_sweep = time.monotonic() + min(60.0, period)
        while not self._closing:
            await asyncio.sleep(every)
            if period and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + period
                try:
                    await self.sweep_orphans()
                except Exception as e:  # next time; Redis or the API server is away
                    log.warning("could not look for the keys of deleted runs: %s", e)
            for uid in list(self.leftovers):
                try:
                    await events.delete_run_keys(self.redis, uid)
                except Exception as e:
                    log.warning("Redis keys of deleted run uid %s still there: %s", uid, e)
                    break
                self.leftovers.discard(uid)
                log.info("deleted the Redis keys of run uid %s, deleted while Redis was away", uid)

    async def sweep_orphans(self) -> int:
        """Delete the Redis keys of runs in this operator's namespaces whose AgentRun no
        longer exists. Returns how many runs' keys went.

        Keys are listed before the runs: a run whose keys the scan found existed before the
        list was read, so a uid missing from the list is a deleted run, never a new one. A
        run is told by its event stream, whose every entry names ``ns/name``. Only keys
        stamped with this cluster's identity are candidates, and only in this operator's
        namespaces: runs of another cluster or operator sharing this Redis are left alone.
        """
        if not self.cluster_id:
            return 0
        candidates: dict[str, dict[str, str]] = {}  # namespace -> uid -> name
        async for key in self.redis.scan_iter(match=events.EVENTS_PATTERN, count=500):
            uid = events.uid_from_events_key(key)
            if uid is None or uid in self.running or uid in self.queued:
                continue
            try:
                stamp = await self.redis.hget(events.meta_key(uid), "cluster")
                if (
                    stamp is None
                    or (stamp.decode() if isinstance(stamp, bytes) else str(stamp))
                    != self.cluster_id
                ):
                    continue
                first = await self.redis.xrange(events.events_key(uid), count=1)
                run = str(events.decode_entries(first)[0].get("run", "")) if first else ""
            except (redis_errors.ResponseError, ValueError, IndexError) as e:
                log.warning("sweep: cannot read run uid %s's keys: %s", uid, e)
                continue
            namespace, _, name = run.partition("/")
            if namespace and config.in_namespaces(namespace, self.settings.namespaces):
                candidates.setdefault(namespace, {})[uid] = name
        swept = 0
        for namespace, uids in candidates.items():
            try:
                listed = await self.k8s.list_agentruns(namespace=namespace)
            except kube.KubeError as e:  # e.g. 403: no rights there; the others still go
                log.warning("sweep: cannot list the AgentRuns of %s: %s", namespace, e)
                continue
            alive = {run["metadata"]["uid"] for run in listed}
            for uid, name in uids.items():
                if uid not in alive:
                    await events.delete_run_keys(self.redis, uid)
                    self.leftovers.discard(uid)
                    swept += 1
                    log.info(
                        "deleted the Redis keys of %s/%s (uid %s), a deleted run",
                        namespace,
                        name,
                        uid,
                    )
        return swept

    async def _resolve_model(
        self, spec: models.AgentRunSpec, sa_kube: kube.ServiceAccountKube
    ) -> llm.ModelConfig:
        m = spec.model
        base_url = (m.base_url or self.settings.model_base_url).rstrip("/")
        allowed = [u.rstrip("/") for u in self.settings.allowed_base_urls]
        if not approvals.base_url_allowed(base_url, allowed):
            raise RunFailed(
                "ModelEndpointNotAllowed",
                f"spec.model.baseURL {base_url} is not in the operator's allow-list "
                f"(AGENTRUN_MODEL_BASE_URL_ALLOW: {', '.join(allowed)}); use one of those "
                "or ask the operator's admin to allow it",
            )
        api_key = self.settings.model_api_key
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
            name=m.name or self.settings.model_name,
            base_url=base_url,
            api_key=api_key,
            temperature=m.temperature,
        )

    async def _last_usage(self, ref: RunRef) -> Usage | None:
        """Running totals from the last metrics event: exact even after a crash."""
        entries = await self.redis.xrevrange(events.events_key(ref.uid), count=200)
        for event in events.decode_entries(entries):
            if event.get("type") == "metrics":
                total = (event.get("data") or {}).get("total")
                if isinstance(total, dict):
                    return Usage.from_status(total)
        return None

    async def _fail(
        self,
        ref: RunRef,
        emitter: Emitter,
        statusw: StatusWriter,
        *,
        code: str,
        message: str,
        usage: Usage,
    ) -> None:
        await emitter.fault(message, code=code, fatal=True)
        await self._finish(
            ref, emitter, statusw, phase="Failed", reason=code, message=message, usage=usage
        )

    async def _finish(
        self,
        ref: RunRef,
        emitter: Emitter,
        statusw: StatusWriter,
        *,
        phase: str,
        reason: str,
        message: str,
        result: str | None = None,
        stopped_by: str | None = None,
        usage: Usage | None = None,
    ) -> None:
        state = {"Succeeded": "succeeded", "Failed": "failed", "Stopped": "stopped"}[phase]
        self.expiries.pop(ref.uid, None)
        prom.RUNS_FINISHED.labels(ref.namespace, phase).inc()
        self._notify(
            ref,
            "run.finished",
            f"Run {ref.key} {phase.lower()}: {message}",
            phase=phase,
            stoppedBy=stopped_by or "",
        )
        if phase == "Stopped":
            audit("stop", run=ref.key, by=stopped_by or "", reason=message)
        with contextlib.suppress(kube.KubeError):
            await self._cancel_pending_approvals(ref, emitter)
        await emitter.workflow(state, node="", step=emitter.step)
        await emitter.emit(
            "end", {"phase": phase, "result": result or "", "stoppedBy": stopped_by or ""}
        )
        await statusw.phase(
            phase,
            reason=reason,
            message=message,
            result=status.cap_result(result) if result else None,
            stoppedBy=stopped_by or None,
            lastEventId=emitter.last_id,
            usage=usage.as_status() if usage else None,
            pendingApprovals=[],
            pendingApprovalCount=0,
            streamPath=events.stream_path(ref.namespace, ref.name),
        )
        await self.k8s.post_event(
            involved=ref.involved(),
            type="Warning" if phase == "Failed" else "Normal",
            reason=phase if phase != "Failed" else reason,
            message=message,
        )
        body = await self.k8s.get_agentrun(namespace=ref.namespace, name=ref.name)
        if body is not None:
            self._schedule_ttl(ref, models.effective_spec(body), statusw.current)

    async def _ended_before(self, ref: RunRef, statusw: StatusWriter) -> bool:
        """Whether the run's stream already ends (the operator or the API server went away
        between its `end` event and its final status write); then write that status from
        the stream, appending nothing, so the run ends once."""
        last = events.decode_entries(
            await self.redis.xrevrange(events.events_key(ref.uid), count=1)
        )
        end = last[0] if last else None
        if end is None or end.get("type") != "end":
            return False
        data = end.get("data") or {}
        phase = str(data.get("phase") or "Failed")
        by = str(data.get("stoppedBy") or "") or None
        reason, message = {
            "Succeeded": ("Succeeded", "the agent finished"),
            "Stopped": ("Stopped", f"stopped by {by or 'a stop request'}"),
        }.get(phase, ("Failed", "the run failed"))
        if phase == "Failed":
            entries = await self.redis.xrevrange(events.events_key(ref.uid), count=20)
            fault = next(
                (
                    ev["data"]
                    for ev in events.decode_entries(entries)
                    if ev.get("type") == "fault" and (ev.get("data") or {}).get("fatal")
                ),
                None,
            )
            if fault is not None:
                reason = str(fault.get("code") or reason)
                message = str(fault.get("message") or message)
        usage = await self._last_usage(ref)
        result = str(data.get("result") or "")
        await statusw.phase(
            phase,
            reason=reason,
            message=message,
            result=status.cap_result(result) if result else None,
            stoppedBy=by,
            lastEventId=end["id"],
            usage=usage.as_status() if usage else None,
            pendingApprovals=[],
            pendingApprovalCount=0,
            streamPath=events.stream_path(ref.namespace, ref.name),
        )
        body = await self.k8s.get_agentrun(namespace=ref.namespace, name=ref.name)
        if body is not None:
            self._schedule_ttl(ref, models.effective_spec(body), statusw.current)
        return True

    @contextlib.asynccontextmanager
    async def _borrowed_stream(
        self, ref: RunRef, st: dict[str, Any], *, wait: float = 0.0
    ) -> AsyncIterator[tuple[Emitter, StatusWriter] | None]:
        """The stream and status of a run no task of this process holds, for a moment
        (its lease taken and released); None when another operator holds the run for
        longer than ``wait`` seconds."""
        lease = await events.Lease.acquire(
            self.redis,
            uid=ref.uid,
            operator_id=self.settings.operator_id,
            ttl_seconds=self.settings.lease_seconds,
        )
        deadline = time.monotonic() + wait
        while lease is None and time.monotonic() < deadline:
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            lease = await events.Lease.acquire(
                self.redis,
                uid=ref.uid,
                operator_id=self.settings.operator_id,
                ttl_seconds=self.settings.lease_seconds,
            )
        if lease is None:
            yield None
            return
        await self._stamp(ref)
        statusw = StatusWriter(
            self.k8s, ref, current=st, interval=self.settings.status_interval_seconds
        )
        writer = events.EventWriter(
            self.redis, uid=ref.uid, run=ref.key, lease=lease, maxlen=self.settings.stream_maxlen
        )
        emitter = Emitter(writer, statusw, flush_ms=0)
        emitter.step = int(st.get("step") or 0)
        try:
            yield emitter, statusw
        finally:
            await statusw.close()
            await lease.release()

    async def _finish_without_task(
        self,
        ref: RunRef,
        st: dict[str, Any],
        *,
        by: str | None,
        message: str | None = None,
        phase: str = "Stopped",
        reason: str = "Stopped",
    ) -> None:
        """End a run that has no task here: stopped (by ``by``), or failed with ``reason``."""
        wait = 0.0
        if phase == "Stopped":
            # If another operator executes it, this message (or its own watch) stops it
            # there. If the lease is a dead operator's (killed, not yet expired), nobody
            # would: wait for it to lapse and finish the run here.
            await self.redis.publish(
                events.control_key(ref.uid), json.dumps({"action": "stop", "by": by or ""})
            )
            wait = self.settings.lease_seconds * 1.5
        async with self._borrowed_stream(ref, st, wait=wait) as borrowed:
            if borrowed is None:
                return
            emitter, statusw = borrowed
            if await self._ended_before(ref, statusw):
                return
            message = message or f"stopped by {by or 'a stop request'} before it ran"
            if phase == "Failed":
                await emitter.fault(message, code=reason, fatal=True)
            await self._finish(
                ref,
                emitter,
                statusw,
                phase=phase,
                reason=reason,
                message=message,
                stopped_by=by,
            )

    def _schedule_ttl(self, ref: RunRef, spec: models.AgentRunSpec, st: Mapping[str, Any]) -> None:
        ttl = spec.ttl_seconds_after_finished
        if ttl is None or ref.uid in self.ttl_tasks or self._closing:
            return
        finished = _parse_time(st.get("finishedAt")) or dt.datetime.now(dt.UTC)
        delay = max(0.0, (finished - dt.datetime.now(dt.UTC)).total_seconds() + float(ttl))

        async def expire() -> None:
            await asyncio.sleep(delay)
            log.info("deleting %s: ttlSecondsAfterFinished=%s elapsed", ref.key, ttl)
            await self.k8s.delete_agentrun(namespace=ref.namespace, name=ref.name)

        task = asyncio.create_task(expire(), name=f"agentrun-ttl:{ref.key}")
        self.ttl_tasks[ref.uid] = task
        uid = ref.uid
        task.add_done_callback(lambda _t: self.ttl_tasks.pop(uid, None))


def _uncancel() -> None:
    # We handle this cancellation (a stop) and go on to finish the run cleanly.
    task = asyncio.current_task()
    while task is not None and task.cancelling():
        task.uncancel()


def _annotation(body: Mapping[str, Any], key: str) -> str | None:
    """An identity annotation the admission webhook wrote (None when absent or empty)."""
    value = ((body.get("metadata") or {}).get("annotations") or {}).get(key)
    return str(value) if value else None


def _stopped_by(body: Mapping[str, Any]) -> str | None:
    return _annotation(body, approvals.STOPPED_BY)


def _parse_time(value: Any) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _elapsed_since(value: Any) -> float:
    started = _parse_time(value)
    if started is None:
        return 0.0
    return max(0.0, (dt.datetime.now(dt.UTC) - started).total_seconds())
