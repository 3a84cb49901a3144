"""How runs end: the ``end`` of a run whose task holds its stream, of a run no task holds
(stopped while queued or waiting for people, failed at first sight), and the status of a run
whose stream already ended (the operator died between the ``end`` event and the status).

Owns the last events and the final status of a run, cancelling its open approvals, the
finish notifications and Events, and its TTL schedule. Every run ends here, once.
Never: decides that a run ends (the task, the gate, a stop or a limit does).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from agentrun_operator import events, kube, models, tracing
from agentrun_operator import metrics as prom
from agentrun_operator.engine.common import RunRef, Services, audit
from agentrun_operator.engine.emitter import Emitter, StatusWriter
from agentrun_operator.engine.gate import Gate
from agentrun_operator.engine.sweeps import Sweeps

_STATES: dict[str, events.WorkflowState] = {
    "Succeeded": "succeeded",
    "Failed": "failed",
    "Stopped": "stopped",
}


async def attach_trace(
    services: Services, ref: RunRef, emitter: Emitter, statusw: StatusWriter
) -> tracing.RunTrace | None:
    """The run's trace when traces are on: the one it got when it first executed (kept in
    Redis), so a resumed run, here or after a restart, continues it; its id goes to the
    emitter (workflow events) and to ``status.traceId``."""
    if not services.tracing.enabled:
        return None
    fresh = tracing.RunTrace.new().dumps()
    run_trace = tracing.RunTrace.loads(await services.store.trace_of(ref.uid, fresh))
    emitter.trace = run_trace
    if statusw.current.get("traceId") != run_trace.trace_hex:
        statusw.progress(traceId=run_trace.trace_hex)
    return run_trace


class Ends:
    def __init__(self, services: Services, gate: Gate, sweeps: Sweeps) -> None:
        self._s = services
        self._gate = gate
        self._sweeps = sweeps

    async def finish(
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
        usage: models.Usage | None = None,
        stop_requested_ns: int | None = None,
    ) -> None:
        self._sweeps.forget_expiry(ref.uid)
        prom.RUNS_FINISHED.labels(ref.namespace, phase).inc()
        self._s.notify(
            ref,
            "run.finished",
            f"Run {ref.key} {phase.lower()}: {message}",
            phase=phase,
            stoppedBy=stopped_by or "",
        )
        if phase == "Stopped":
            audit("stop", run=ref.key, by=stopped_by or "", reason=message)
        with contextlib.suppress(kube.KubeError):
            await self._gate.cancel_pending(ref, emitter, "the run finished")
        await emitter.workflow(_STATES[phase], node="", step=emitter.step)
        await emitter.end(phase=phase, result=result, stopped_by=stopped_by)
        await statusw.final(
            phase,
            reason=reason,
            message=message,
            last_event_id=emitter.last_id,
            result=result,
            stopped_by=stopped_by,
            usage=usage,
        )
        await self._s.k8s.post_event(
            involved=ref.involved(),
            type="Warning" if phase == "Failed" else "Normal",
            reason=phase if phase != "Failed" else reason,
            message=message,
        )
        self._trace_end(
            ref,
            emitter.trace,
            statusw,
            phase=phase,
            reason=reason,
            message=message,
            stopped_by=stopped_by,
            stop_requested_ns=stop_requested_ns,
        )
        await self._schedule_ttl(ref, statusw)

    def _trace_end(
        self,
        ref: RunRef,
        run_trace: tracing.RunTrace | None,
        statusw: StatusWriter,
        *,
        phase: str,
        reason: str,
        message: str,
        stopped_by: str | None,
        stop_requested_ns: int | None,
    ) -> None:
        """The spans that close the run's trace: the stop (who, and how long from the request
        to Stopped) and the run's root span, with the start it got when it first executed."""
        if run_trace is None:
            return
        now = time.time_ns()
        tracer = self._s.tracing
        if phase == "Stopped":
            start = stop_requested_ns or now
            tracer.record(
                "stop",
                run_trace,
                start_ns=start,
                end_ns=now,
                attributes={
                    "agentrun.stopped_by": stopped_by or "",
                    "agentrun.stop.reason": reason,
                    "agentrun.stop.latency_ms": (now - start) / 1e6,
                },
            )
        st = statusw.current
        usage = st.get("usage") if isinstance(st.get("usage"), dict) else {}
        attributes: dict[str, Any] = {
            "k8s.namespace.name": ref.namespace,
            "agentrun.run.name": ref.name,
            "agentrun.run.uid": ref.uid,
            "agentrun.run.created_by": st.get("createdBy"),
            "agentrun.run.phase": phase,
            "agentrun.run.reason": reason,
            "agentrun.run.steps": st.get("step"),
            "agentrun.run.stopped_by": stopped_by,
        }
        attributes.update({f"agentrun.usage.{k}": v for k, v in (usage or {}).items()})
        tracer.record(
            f"run {ref.key}",
            run_trace,
            start_ns=run_trace.start_ns,
            end_ns=now,
            attributes=attributes,
            error=message if phase == "Failed" else None,
            root=True,
        )

    async def fail(
        self,
        ref: RunRef,
        emitter: Emitter,
        statusw: StatusWriter,
        *,
        code: str,
        message: str,
        usage: models.Usage,
    ) -> None:
        await emitter.fault(message, code=code, fatal=True)
        await self.finish(
            ref, emitter, statusw, phase="Failed", reason=code, message=message, usage=usage
        )

    async def _schedule_ttl(self, ref: RunRef, statusw: StatusWriter) -> None:
        body = await self._s.k8s.get_agentrun(namespace=ref.namespace, name=ref.name)
        if body is not None:
            self._sweeps.schedule_ttl(ref, models.effective_spec(body), statusw.current)

    async def last_usage(self, ref: RunRef) -> models.Usage | None:
        """Running totals from the last metrics event: exact even after a crash."""
        for event in await self._s.store.last_events(ref.uid, 200):
            if event.get("type") == "metrics":
                total = (event.get("data") or {}).get("total")
                if isinstance(total, dict):
                    return models.Usage.from_status(total)
        return None

    async def ended_before(self, ref: RunRef, statusw: StatusWriter) -> bool:
        """Whether the run's stream already ends (the operator or the API server went away
        between its `end` event and its final status write); then write that status from
        the stream, appending nothing, so the run ends once."""
        last = await self._s.store.last_events(ref.uid, 20)
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
            fault = next(
                (
                    ev["data"]
                    for ev in last
                    if ev.get("type") == "fault" and (ev.get("data") or {}).get("fatal")
                ),
                None,
            )
            if fault is not None:
                reason = str(fault.get("code") or reason)
                message = str(fault.get("message") or message)
        await statusw.final(
            phase,
            reason=reason,
            message=message,
            last_event_id=end["id"],
            result=str(data.get("result") or ""),
            stopped_by=by,
            usage=await self.last_usage(ref),
        )
        await self._schedule_ttl(ref, statusw)
        return True

    @contextlib.asynccontextmanager
    async def borrowed_stream(
        self, ref: RunRef, st: dict[str, Any], *, wait: float = 0.0
    ) -> AsyncIterator[tuple[Emitter, StatusWriter] | None]:
        """The stream and status of a run no task of this process holds, for a moment
        (its lease taken and released); None when another operator holds the run for
        longer than ``wait`` seconds."""
        settings = self._s.settings

        async def take() -> Any:
            return await self._s.store.lease(
                ref.uid, operator_id=settings.operator_id, ttl_seconds=settings.lease_seconds
            )

        lease = await take()
        deadline = time.monotonic() + wait
        while lease is None and time.monotonic() < deadline:
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            lease = await take()
        if lease is None:
            yield None
            return
        if self._s.cluster_id:
            await self._s.store.stamp_cluster(ref.uid, self._s.cluster_id)
        statusw = StatusWriter(
            self._s.k8s, ref, current=st, interval=settings.status_interval_seconds
        )
        writer = self._s.store.writer(
            ref.uid, run=ref.key, lease=lease, maxlen=settings.stream_maxlen
        )
        emitter = Emitter(writer, statusw, flush_ms=0)
        emitter.step = int(st.get("step") or 0)
        try:
            await attach_trace(self._s, ref, emitter, statusw)
            yield emitter, statusw
        finally:
            await statusw.close()
            await lease.release()

    async def without_task(
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
        asked = time.time_ns()
        wait = 0.0
        if phase == "Stopped":
            # If another operator executes it, this message (or its own watch) stops it
            # there. If the lease is a dead operator's (killed, not yet expired), nobody
            # would: wait for it to lapse and finish the run here.
            await self._s.store.publish_stop(ref.uid, by=by or "")
            wait = self._s.settings.lease_seconds * 1.5
        async with self.borrowed_stream(ref, st, wait=wait) as borrowed:
            if borrowed is None:
                return
            emitter, statusw = borrowed
            if await self.ended_before(ref, statusw):
                return
            message = message or f"stopped by {by or 'a stop request'} before it ran"
            if phase == "Failed":
                await emitter.fault(message, code=reason, fatal=True)
            await self.finish(
                ref,
                emitter,
                statusw,
                phase=phase,
                reason=reason,
                message=message,
                stopped_by=by,
                stop_requested_ns=asked,
            )
