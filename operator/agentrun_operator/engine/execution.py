"""The task of one run: take its lease, build its workflow, execute it until it ends, waits
for people or is stopped, and write what happened.

Owns ``Slot`` (a run's task and its stop state), the lease (acquire, renew, fencing), the
resume of a checkpointed run, the run's time limit, and the retry when Redis or the API
server is away (the run waits, says so in its status, and resumes from its checkpoint).
Never: executes a run whose lease another operator holds, keeps a task while the run waits
for people, or finishes a run outside ``finishing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from langchain_core.runnables import RunnableConfig

from agentrun_operator import events, kube, llm, models, workflow
from agentrun_operator.engine import mcptools
from agentrun_operator.engine.binding import RunDeps, check_price, resolve_model
from agentrun_operator.engine.common import (
    WAITING,
    RunFailed,
    RunRef,
    Services,
    elapsed_since,
    is_waiting,
    short,
    unavailable,
)
from agentrun_operator.engine.emitter import Emitter, StatusWriter
from agentrun_operator.engine.finishing import Ends, attach_trace
from agentrun_operator.engine.gate import Gate, GateOutcome
from agentrun_operator.engine.judging import Judge
from agentrun_operator.engine.stopping import StopControl, uncancel
from agentrun_operator.engine.sweeps import Sweeps

log = logging.getLogger("agentrun.runs")


@dataclass
class Slot:
    """A run this process executes: its task, its stop state, its stream while it holds
    the lease."""

    ref: RunRef
    task: asyncio.Task[None]
    stop: StopControl = field(default_factory=StopControl)
    recheck: bool = False  # a vote came while the task ran: look at the approvals again
    enforcer: asyncio.Task[None] | None = None
    emitter: Emitter | None = None


class Runner:
    def __init__(
        self,
        services: Services,
        *,
        gate: Gate,
        ends: Ends,
        sweeps: Sweeps,
        slot_of: Callable[[str], Slot | None],
        closing: Callable[[], bool],
    ) -> None:
        self._s = services
        self._gate = gate
        self._ends = ends
        self._sweeps = sweeps
        self._slot_of = slot_of
        self._closing = closing

    async def supervise(self, ref: RunRef) -> None:
        """The task of one run. Redis or the API server unreachable past the clients' own
        retries is not the run's fault: say so in its status, wait, and resume it from its
        checkpoint (exactly-once holds as across an operator restart), rather than leave
        the run without a task until the operator restarts."""
        delay = 1.0
        while True:
            try:
                try:
                    again = await self._run(ref)
                except asyncio.CancelledError:
                    # Stopped where _run does not catch it (reading the run, before its
                    # lease): the next try finishes it as Stopped instead of leaving it.
                    slot = self._slot_of(ref.uid)
                    if slot is None or self._closing() or not slot.stop.finishing():
                        raise
                    uncancel()
                    continue
                if not again:
                    slot = self._slot_of(ref.uid)
                    if slot is None or not slot.recheck or slot.stop.requested:
                        return
                    slot.recheck = False
                    continue
                why = "its lease expired while Redis was unreachable"
            except Exception as e:
                if self._closing():
                    raise
                what = unavailable(e)
                if what is None:
                    await self._crashed(ref, e)
                    return
                why = f"{what} is unreachable ({short(str(e), 200)})"
            slot = self._slot_of(ref.uid)
            if slot is None or slot.stop.deleted:
                return
            log.warning("run %s: %s; resuming in %.0fs", ref.key, why, delay)
            with contextlib.suppress(Exception):  # the API server may be what is down
                await self._s.k8s.patch_agentrun_status(
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
                if not slot.stop.requested:
                    raise
                uncancel()  # stopped while waiting: the next try finishes it as Stopped
            delay = min(delay * 2, 10.0)

    async def _crashed(self, ref: RunRef, e: Exception) -> None:
        """A fault of the operator itself (a bug), neither the run's nor of what it reaches:
        the run ends ``Failed`` (reason ``OperatorError``) saying so, rather than staying
        ``Running`` with no task until the operator restarts."""
        log.error("run %s: the operator failed executing it", ref.key, exc_info=e)
        message = (
            f"the operator failed executing the run ({type(e).__name__}: "
            f"{short(str(e), 200)}); its log has the details"
        )
        try:
            body = await self._s.k8s.get_agentrun(namespace=ref.namespace, name=ref.name)
            if body is None or body["metadata"]["uid"] != ref.uid:
                return
            await self._ends.without_task(
                ref,
                dict(body.get("status") or {}),
                by=None,
                message=message,
                phase="Failed",
                reason="OperatorError",
            )
        except Exception:
            log.exception("run %s: could not mark it Failed either", ref.key)

    async def _acquire(self, ref: RunRef) -> events.Lease:
        """Wait until this process owns the run (another operator may hold it)."""
        settings = self._s.settings
        delay = 0.2
        while True:
            lease = await self._s.store.lease(
                ref.uid, operator_id=settings.operator_id, ttl_seconds=settings.lease_seconds
            )
            if lease is not None:
                if self._s.cluster_id:
                    await self._s.store.stamp_cluster(ref.uid, self._s.cluster_id)
                return lease
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.lease_seconds / 3)

    async def _keep_lease(self, lease: events.Lease, main: asyncio.Task[Any]) -> bool:
        """Renew the lease while the run executes; True once it is lost (``main`` cancelled)."""
        while True:
            await asyncio.sleep(self._s.settings.lease_seconds / 3)
            try:
                ok = await lease.renew()
            except Exception as e:
                log.warning("lease renewal of %s failed: %s", lease.uid, e)
                continue
            if not ok:
                log.error("lost the lease of run %s; stopping local execution", lease.uid)
                main.cancel()
                return True

    async def _run(self, ref: RunRef) -> bool:
        """Execute the run until it ends, waits for people or is stopped. True when it must
        be tried again: its lease expired (Redis was away) and nobody else holds it."""
        body = await self._s.k8s.get_agentrun(namespace=ref.namespace, name=ref.name)
        if body is None or body["metadata"]["uid"] != ref.uid:
            return False
        st: dict[str, Any] = dict(body.get("status") or {})
        slot = self._slot_of(ref.uid)
        if slot is not None and slot.stop.finishing():
            # Stopped while it waited for Redis or the API server: finish, do not run it.
            await self._ends.without_task(ref, st, by=slot.stop.by, message=slot.stop.message)
            return False
        try:
            lease = await self._acquire(ref)
        except asyncio.CancelledError:
            if slot is None or not slot.stop.finishing():
                raise
            uncancel()
            await self._ends.without_task(ref, st, by=slot.stop.by)
            return False
        me = asyncio.current_task()
        assert me is not None
        keeper = asyncio.create_task(self._keep_lease(lease, me))
        settings = self._s.settings
        statusw = StatusWriter(
            self._s.k8s, ref, current=st, interval=settings.status_interval_seconds, lease=lease
        )
        writer = self._s.store.writer(
            ref.uid, run=ref.key, lease=lease, maxlen=settings.stream_maxlen
        )
        emitter = Emitter(writer, statusw, flush_ms=settings.token_flush_ms)
        if slot is not None:
            slot.emitter = emitter
        fenced = False
        try:
            if not await self._ends.ended_before(ref, statusw):
                await self._execute(ref, body, st, emitter, statusw)
        except events.Fenced:
            fenced = True
            log.warning("run %s: lease lost", ref.key)
        except asyncio.CancelledError:
            if slot is None or not slot.stop.finishing():
                lost = keeper.done() and not keeper.cancelled() and keeper.result()
                if not lost or self._closing():
                    raise  # operator shutdown: leave the run as it is, to resume later
                uncancel()  # the keeper lost the lease: see below who holds it now
                fenced = True
            else:
                uncancel()
                try:
                    await emitter.flush()
                    await self._ends.finish(
                        ref,
                        emitter,
                        statusw,
                        phase="Stopped",
                        reason="Stopped",
                        message=slot.stop.message,
                        stopped_by=slot.stop.by,
                        stop_requested_ns=slot.stop.requested_ns,
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
        return not await self._s.store.owned(ref.uid)

    async def _execute(
        self,
        ref: RunRef,
        body: Mapping[str, Any],
        st: dict[str, Any],
        emitter: Emitter,
        statusw: StatusWriter,
    ) -> None:
        spec = models.effective_spec(body)
        store = self._s.store
        usage = await self._ends.last_usage(ref) or models.Usage.from_status(st.get("usage"))
        config_: RunnableConfig = {
            "configurable": {"thread_id": ref.uid},
            "recursion_limit": spec.limits.max_steps * 4 + 20,
        }
        has_history = await store.has_history(ref.uid)
        run_trace = await attach_trace(self._s, ref, emitter, statusw)
        try:
            sa_kube = self._s.k8s.as_service_account(
                namespace=ref.namespace, name=spec.service_account_name
            )
            model = await resolve_model(spec, self._s.settings, sa_kube)
            check_price(model, spec, self._s.settings)
            chat = llm.build(
                model,
                timeout=self._s.settings.llm_timeout_seconds,
                max_retries=self._s.settings.llm_max_retries,
            )
            toolset, withdrawn = await mcptools.Toolset.load(
                self._s.k8s, ref.namespace, models.effective_mcp_tools(body)
            )
            deps = RunDeps(
                ref=ref,
                spec=spec,
                settings=self._s.settings,
                chat=chat,
                model_name=model.name,
                emitter=emitter,
                statusw=statusw,
                usage=usage,
                sa_kube=sa_kube,
                k8s=self._s.k8s,
                store=store,
                judge=Judge(
                    self._s,
                    ref,
                    spec,
                    models.effective_approval(body),
                    str(st.get("createdBy") or ""),
                    toolset,
                ),
                mcp=toolset,
                tracer=self._s.tracing,
                trace=run_trace,
            )
            graph = workflow.build(deps, checkpointer=self._s.saver)
            snapshot = await graph.aget_state(config_)
            resuming = bool(snapshot.values)
            inp: Any = None if resuming else workflow.initial_state(deps)
            if snapshot.interrupts:
                # Waiting at the approval gate: go on only once every call is settled.
                inp = await self._pass_gate(ref, spec, snapshot.interrupts, emitter, statusw)
                if inp is None:
                    return
            if has_history:
                await emitter.workflow("resumed", node="", step=int(st.get("step") or 0))
            else:
                await emitter.workflow("pending", node="", step=0)
            for code, message in sorted((await store.notes(ref.uid)).items()):
                await emitter.fault(message, code=code, fatal=False)
                await store.forget_note(ref.uid, code)
            for problem in withdrawn:
                await emitter.fault(problem, code="MCPToolWithdrawn", fatal=False)
            if statusw.current.get("phase") != "Running" or is_waiting(statusw.current):
                await statusw.phase(
                    "Running",
                    reason="Resumed" if resuming else "Started",
                    message="the agent is working" if not resuming else "resumed from checkpoint",
                    worker=self._s.settings.operator_id,
                    streamPath=events.stream_path(ref.namespace, ref.name),
                    pendingApprovals=[],
                    pendingApprovalCount=0,
                )
                await self._s.k8s.post_event(
                    involved=ref.involved(),
                    type="Normal",
                    reason="Running",
                    message="run resumed" if resuming else "run started",
                )
            elif statusw.current.get("worker") != self._s.settings.operator_id:
                # Taken over from a worker that is gone: say who holds it now.
                statusw.progress(worker=self._s.settings.operator_id)
                await self._s.k8s.post_event(
                    involved=ref.involved(),
                    type="Normal",
                    reason="HandedOver",
                    message=f"run resumed by {self._s.settings.operator_id} from its checkpoint",
                )
            elapsed = elapsed_since(statusw.current.get("startedAt"))
            remaining = (
                models.duration_seconds(spec.limits.timeout)
                - elapsed
                + await store.waited_seconds(ref.uid)
            )
            if remaining <= 0:
                raise _timeout(spec)
            try:
                async with asyncio.timeout(remaining):
                    while True:
                        result = await graph.ainvoke(inp, config_)
                        interrupts = (
                            result.get("__interrupt__") if isinstance(result, dict) else None
                        )
                        if not interrupts:
                            break
                        inp = await self._pass_gate(ref, spec, interrupts, emitter, statusw)
                        if inp is None:
                            return  # waits for people; this task ends, the checkpoint stays
            except TimeoutError:
                raise _timeout(spec) from None
            await self._ends.finish(
                ref,
                emitter,
                statusw,
                phase="Succeeded",
                reason="Succeeded",
                message="the agent finished",
                result=str(result.get("result") or ""),
                usage=usage,
            )
        except (workflow.LimitExceeded, RunFailed) as e:
            await self._ends.fail(
                ref, emitter, statusw, code=e.code, message=e.message, usage=usage
            )
        except (events.Fenced, asyncio.CancelledError):
            raise
        except kube.KubeError as e:
            if unavailable(e):
                raise  # not the run's fault: it waits and resumes (see supervise)
            # The API server refused what the operator itself needed (not a tool call).
            log.exception("run %s: Kubernetes API error", ref.key)
            await self._ends.fail(
                ref,
                emitter,
                statusw,
                code="KubernetesAPIError",
                message=f"the operator could not complete a Kubernetes API call: {e}",
                usage=usage,
            )

    async def _pass_gate(
        self,
        ref: RunRef,
        spec: models.AgentRunSpec,
        interrupts: Any,
        emitter: Emitter,
        statusw: StatusWriter,
    ) -> Any:
        """The command that resumes the workflow past the gate, or None: the run waits for
        people (this task ends) or an expired approval stopped it."""
        outcome: GateOutcome = await self._gate.settle(ref, spec, interrupts, emitter, statusw)
        if outcome.stop:
            await self._ends.finish(
                ref,
                emitter,
                statusw,
                phase="Stopped",
                reason="ApprovalExpired",
                message="an approval expired and spec.approval.onTimeout is stop",
                stopped_by="approval-timeout",
            )
            return None
        if outcome.resume is None:
            if outcome.expires is not None:
                self._sweeps.expect(ref, outcome.expires)
            return None
        self._sweeps.forget_expiry(ref.uid)
        return outcome.resume


def _timeout(spec: models.AgentRunSpec) -> workflow.LimitExceeded:
    return workflow.LimitExceeded(
        "TimeoutExceeded", f"time limit reached: spec.limits.timeout is {spec.limits.timeout}"
    )
