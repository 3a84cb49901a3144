"""A run's two outputs while its task holds the lease: its event stream (``Emitter``) and its
status (``StatusWriter``).

Owns the typed builders of every event payload the operator appends (the ``data`` shapes of
DESIGN.md's Events table live here and nowhere else), token coalescing into short batches,
and the status write policy: phase changes at once, progress at most every
AGENTRUN_STATUS_INTERVAL_SECONDS, never per token.
Never: appends without the run's fenced writer, decides what happens to a run, or writes
``spec``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from typing import Any

from agentrun_operator import events, kube, models, status
from agentrun_operator.engine.common import RunRef


class StatusWriter:
    """Phase changes go out at once; progress at most every ``interval`` seconds."""

    def __init__(
        self,
        k: kube.Kube,
        ref: RunRef,
        *,
        current: dict[str, Any],
        interval: float,
        lease: events.Lease | None = None,
    ):
        self._kube = k
        self._ref = ref
        self.current = dict(current)
        self._interval = interval
        # While the run's task holds it: progress waits while the lease is not surely held
        # (a process woken from a pause longer than the lease must not report on a run
        # another has taken over; its next fenced append fails and ends its task).
        self._lease = lease
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

    async def final(
        self,
        phase: str,
        *,
        reason: str,
        message: str,
        last_event_id: str | None,
        result: str | None = None,
        stopped_by: str | None = None,
        usage: models.Usage | None = None,
    ) -> None:
        """The status of a run that ended (its ``end`` event is in the stream)."""
        await self.phase(
            phase,
            reason=reason,
            message=message,
            result=status.cap_result(result) if result else None,
            stoppedBy=stopped_by or None,
            lastEventId=last_event_id,
            usage=usage.as_status() if usage else None,
            pendingApprovals=[],
            pendingApprovalCount=0,
            streamPath=events.stream_path(self._ref.namespace, self._ref.name),
        )

    def progress(self, **fields: Any) -> None:
        self._pending.update({k: v for k, v in fields.items() if v is not None})
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._interval)
        while self._lease is not None and not self._lease.held():
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
        # The run's trace (tracing.RunTrace) when traces are on: its id goes into every
        # workflow event, and the engine's spans hang under its root.
        self.trace: Any = None

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

    # -- the typed events (DESIGN.md, Events) ------------------------------------------------
    async def workflow(self, state: events.WorkflowState, *, node: str, step: int) -> None:
        self.step = step
        data: dict[str, Any] = {"state": state, "node": node, "step": step}
        if self.trace is not None:
            data["traceId"] = self.trace.trace_hex
        await self.emit("workflow", data)

    async def fault(self, message: str, *, code: str, fatal: bool) -> None:
        await self.emit("fault", {"message": message, "code": code, "fatal": fatal})

    async def metrics(self, *, node: str, call: models.CallUsage, total: models.Usage) -> None:
        await self.emit(
            "metrics",
            {
                "node": node,
                "inputTokens": call.input_tokens,
                "outputTokens": call.output_tokens,
                "cachedTokens": call.cached_tokens,
                "costUSD": call.cost_usd,
                "ttftMs": call.ttft_ms,
                "ttrMs": call.ttr_ms,
                "total": total.as_status(),
            },
        )

    async def tool(
        self,
        *,
        call_id: str,
        name: str,
        arguments: Mapping[str, Any],
        status: str,
        result: Any = None,
        duration_ms: int | None = None,
        record: dict[str, Any] | None = None,
        server: str | None = None,
    ) -> None:
        """A tool call's progress; ``record`` (the call's exactly-once record) is stored in
        the same atomic step. ``arguments`` are what people may see (Secret values
        redacted). ``server``: the MCPServer of an MCP tool."""
        data: dict[str, Any] = {
            "callId": call_id,
            "name": name,
            "arguments": arguments,
            "status": status,
        }
        if server is not None:
            data["server"] = server
        if status != "started":
            data["result"] = result
            data["durationMs"] = duration_ms or 0
        await self.emit("tool", data, call=None if record is None else (call_id, record))

    async def approval(
        self,
        *,
        call_id: str,
        approval: str,
        tool: str,
        arguments: Mapping[str, Any],
        state: str,
        decided_by: str = "",
        preview: Mapping[str, Any] | None = None,
        rule: Mapping[str, Any] | None = None,
    ) -> None:
        data: dict[str, Any] = {
            "callId": call_id,
            "approval": approval,
            "tool": tool,
            "arguments": arguments,
            "state": state,
            "decidedBy": decided_by,
        }
        if preview is not None:
            data["preview"] = preview
        if rule:
            data["rule"] = {k: rule.get(k) for k in ("policy", "name", "message") if rule.get(k)}
        await self.emit("approval", data)

    async def end(self, *, phase: str, result: str | None, stopped_by: str | None) -> None:
        await self.emit(
            "end", {"phase": phase, "result": result or "", "stoppedBy": stopped_by or ""}
        )
