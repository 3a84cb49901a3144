"""The registry of the runs this operator process executes: the entry points the kopf
handlers call (a run appears, its spec changes, someone votes, someone stops it, it is
deleted, the operator shuts down), the concurrency limit with its queue (oldest first), and
the first sight of a run, which fixes its settings in ``status.effective``.

One task per run uid (not kopf daemons: a daemon that ends is not restarted, and kopf
applies a daemon's patches only when it exits). Every operator-side stop goes through
``stop`` (the kopf ``spec.stop`` handler, the control channel, a deletion).
Never: writes ``spec``, or executes a run itself (``execution`` does, in the run's task).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from agentrun_operator import (
    __version__,
    approvals,
    config,
    contract,
    kube,
    models,
    notify,
    policy,
    tracing,
)
from agentrun_operator import metrics as prom
from agentrun_operator.engine import mcptools
from agentrun_operator.engine.common import RunRef, Services, annotation, audit, unavailable
from agentrun_operator.engine.emitter import StatusWriter
from agentrun_operator.engine.execution import Runner, Slot
from agentrun_operator.engine.finishing import Ends
from agentrun_operator.engine.gate import Gate
from agentrun_operator.engine.judging import read_policies
from agentrun_operator.engine.sweeps import Sweeps
from agentrun_operator.events import stream_path
from agentrun_operator.store import RunStore

log = logging.getLogger("agentrun.runs")


class Registry:
    """Every run this operator process executes, keyed by uid."""

    def __init__(
        self,
        *,
        settings: config.Settings,
        k8s: kube.Kube,
        store: RunStore,
        saver: Any,
        notifier: notify.Notifier | None = None,
        role: str = "all",
    ) -> None:
        self.services = Services(
            settings=settings,
            k8s=k8s,
            store=store,
            saver=saver,
            notifier=notifier,
            tracing=tracing.Tracing(settings.otel_endpoint, version=__version__),
        )
        self.running: dict[str, Slot] = {}
        self.queued: dict[str, RunRef] = {}
        self._closing = False
        # "controller": runs are executed by workers; this process queues them for one.
        self.role = role
        self._dispatches: set[asyncio.Task[None]] = set()
        # Controller: the runs executing on any worker, as their status says (or dispatched
        # to start), counted against AGENTRUN_MAX_CONCURRENT_RUNS cluster-wide.
        self.executing: set[str] = set()
        # Told when a run's task here ends (a worker acknowledges its work entry then).
        self.on_done: list[Callable[[str], None]] = []
        self.gate = Gate(self.services)
        self.sweeps = Sweeps(
            self.services,
            busy=lambda uid: uid in self.running or uid in self.queued,
            running=lambda uid: uid in self.running,
            wake=self._start,
        )
        self.ends = Ends(self.services, self.gate, self.sweeps)
        self.runner = Runner(
            self.services,
            gate=self.gate,
            ends=self.ends,
            sweeps=self.sweeps,
            slot_of=self.running.get,
            closing=lambda: self._closing,
        )

    @property
    def settings(self) -> config.Settings:
        return self.services.settings

    @property
    def notifier(self) -> notify.Notifier | None:
        return self.services.notifier

    @notifier.setter
    def notifier(self, value: notify.Notifier | None) -> None:
        self.services.notifier = value

    @property
    def cluster_id(self) -> str:
        return self.services.cluster_id

    @cluster_id.setter
    def cluster_id(self, value: str) -> None:
        self.services.cluster_id = value

    # -- a run appears (create, resume, operator restart, a vote) ----------------------------
    async def ensure(self, body: Mapping[str, Any]) -> None:
        """Make sure a run that should be running is (create, resume, operator restart)."""
        ref = RunRef.of(body)
        st = body.get("status") or {}
        phase = st.get("phase")
        if phase in models.FINISHED_PHASES:
            with contextlib.suppress(ValueError):  # a spec the models refuse: no TTL to keep
                self.sweeps.schedule_ttl(ref, models.effective_spec(body), st)
            return
        if (body.get("spec") or {}).get("stop"):
            await self.stop(body, by=annotation(body, contract.STOPPED_BY))
            return
        if not isinstance(st.get("effective"), Mapping):
            fixed = await self._fix_settings(ref, body)
            if fixed is None:
                return
            st = fixed
        if ref.uid in self.running or ref.uid in self.queued:
            return
        if self.role == "controller":
            await self._admit(ref, st)
            return
        # AwaitingApproval holds no task; starting one checks the decisions (made while
        # the operator was down, too) and ends at once if people have not decided yet.
        if len(self.running) >= self.settings.max_concurrent_runs:
            self.queued[ref.uid] = ref
            await self._mark_queued(ref, st)
            return
        self._start(ref)

    async def _admit(self, ref: RunRef, st: Mapping[str, Any]) -> None:
        """Controller: queue the run for a worker. A run that has not started yet waits
        while AGENTRUN_MAX_CONCURRENT_RUNS runs execute on all workers together; one that
        started before (running, or back from people's decision) goes at once."""
        if st.get("phase") in (None, "Pending"):  # never started (Pending: queued)
            if len(self.executing) >= self.settings.max_concurrent_runs:
                self.queued[ref.uid] = ref
                await self._mark_queued(ref, st)
                return
            self.executing.add(ref.uid)
        elif st.get("phase") == "Running":
            self.executing.add(ref.uid)  # a controller's restart: it counts as before
        self._start(ref)

    def seen(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        """Controller: a run's status as its watch brings it (workers write it). One that
        ended or waits for people frees its slot for the oldest queued run."""
        uid = (body.get("metadata") or {}).get("uid")
        if not uid:
            return
        phase = (body.get("status") or {}).get("phase")
        if deleted:
            self.queued.pop(uid, None)
        if phase == "Running" and not deleted:
            self.executing.add(uid)
            return
        if not deleted and phase not in models.FINISHED_PHASES and phase != "AwaitingApproval":
            return
        if uid not in self.executing:
            return
        self.executing.discard(uid)
        while self.queued and len(self.executing) < self.settings.max_concurrent_runs:
            nxt = min(self.queued.values(), key=lambda r: (r.created, r.key))
            self.queued.pop(nxt.uid)
            self.executing.add(nxt.uid)
            self._start(nxt)

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
            await self.ends.without_task(
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
        try:
            tightened = await self._tightened(body)
        except policy.Refused as e:
            await self.ends.without_task(
                ref, st, by=None, phase="Failed", reason="PolicyForbids", message=str(e)
            )
            return None
        except mcptools.Unavailable as e:
            await self.ends.without_task(
                ref, st, by=None, phase="Failed", reason="MCPToolUnavailable", message=str(e)
            )
            return None
        except kube.KubeError as e:
            if unavailable(e):
                raise  # the API server is away: kopf tries again
            await self.ends.without_task(
                ref,
                st,
                by=None,
                phase="Failed",
                reason="PolicyUnreadable",
                message=f"the AgentPolicies or MCPServers of namespace {ref.namespace} could "
                f"not be read ({e}); the run cannot start without them: check the operator's "
                "RBAC (get, list on agentpolicies, clusteragentpolicies and mcpservers)",
            )
            return None
        fixed = {
            "effective": tightened.effective(generation=generation),
            "createdBy": st.get("createdBy") or annotation(body, contract.CREATED_BY),
        }
        await self.services.k8s.patch_agentrun_status(
            namespace=ref.namespace, name=ref.name, status=fixed
        )
        if tightened.clamped:
            message = (
                "the run asked for less than its namespace's policies allow, so it got the "
                f"policy: {'; '.join(tightened.clamped)}"
            )
            audit("policy-clamped", run=ref.key, changes=tightened.clamped)
            await self.services.k8s.post_event(
                involved=ref.involved(), type="Warning", reason="PolicyApplied", message=message
            )
            # The task that runs it says it in the stream first, as a fault event.
            await self.services.store.note(ref.uid, "PolicyApplied", message)
        return {**st, **fixed}

    async def _tightened(self, body: Mapping[str, Any]) -> policy.Tightened:
        """The run's settings after defaults and its namespace's policies (a run can only
        tighten them), with the MCP tools it names pinned. Raises policy.Refused,
        mcptools.Unavailable, or KubeError when the policies or MCPServers are unreadable."""
        spec = body.get("spec") or {}
        namespace = body["metadata"]["namespace"]
        policies = await read_policies(self.services, namespace)
        # The MCP tools it names, as their servers offer them now (pinned from here on).
        refs = [str(t) for t in spec.get("tools") or []]
        pinned = await mcptools.pin(self.services.k8s, namespace, refs)
        tightened = policy.tighten(
            spec, policies, default_base_url=self.settings.model_base_url, mcp_tools=pinned
        )
        tightened.spec.model.name = tightened.spec.model.name or self.settings.model_name
        tightened.spec.model.base_url = (
            tightened.spec.model.base_url or self.settings.model_base_url
        )
        return tightened

    async def spec_changed(
        self, body: Mapping[str, Any], old: Mapping[str, Any], new: Mapping[str, Any]
    ) -> None:
        """A spec edit after the settings were fixed (the AgentRun webhook refuses it, but
        it fails open so that nothing blocks spec.stop): ignore it, and say so. ``old`` and
        ``new`` are the spec before and after (the effective settings differ from any spec
        where a policy tightened them, so they are no measure of an edit)."""
        st = body.get("status") or {}
        effective = st.get("effective")
        if not isinstance(effective, Mapping) or st.get("phase") in models.FINISHED_PHASES:
            return
        ref = RunRef.of(body)
        changed = sorted(k for k in set(old) | set(new) if k != "stop" and old.get(k) != new.get(k))
        if not changed:
            return
        message = (
            f"ignored a change of {', '.join(f'spec.{k}' for k in changed)} (generation "
            f"{(body.get('metadata') or {}).get('generation')}): a run keeps the settings fixed "
            "when it started (status.effective); only spec.stop takes effect"
        )
        log.warning("run %s: %s", ref.key, message)
        audit("spec-change-ignored", run=ref.key, fields=changed)
        await self.services.k8s.post_event(
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
            async with self.ends.borrowed_stream(ref, dict(st)) as borrowed:
                if borrowed is not None:
                    await borrowed[0].fault(message, code="SpecChangeIgnored", fatal=False)
                    return
        # The task that next runs it (here or in another operator) says it first.
        await self.services.store.note(ref.uid, "SpecChangeIgnored", message)

    async def decided(self, approval: Mapping[str, Any]) -> None:
        """Someone voted on a ToolApproval: let its run look at the decisions."""
        namespace = approval["metadata"]["namespace"]
        run = (approval.get("spec") or {}).get("runName")
        k8s = self.services.k8s
        body = await k8s.get_agentrun(namespace=namespace, name=run) if run else None
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

    def expect_approval(self, approval: Mapping[str, Any]) -> None:
        """Controller: a ToolApproval's deadline, so its run is woken when it passes even if
        the worker that asked is gone."""
        st = approval.get("status") or {}
        when = approvals.parse_time(st.get("expiresAt"))
        run = (approval.get("spec") or {}).get("runName")
        owner = next(
            (o["uid"] for o in approval["metadata"].get("ownerReferences") or []
             if o.get("kind") == "AgentRun"),
            None,
        )  # fmt: skip
        if when is None or not run or owner is None or st.get("state") not in (None, "Pending"):
            return
        known = self.sweeps.expiries.get(owner)
        if known is None or when < known[0]:
            ref = RunRef(approval["metadata"]["namespace"], run, owner, None, "")
            self.sweeps.expect(ref, when)

    # -- stop: the one path ------------------------------------------------------------------
    async def stop(self, body: Mapping[str, Any], *, by: str | None) -> None:
        """spec.stop (kopf): stop the run wherever it is (here, queued, waiting for people,
        never started, or on another operator)."""
        ref = RunRef.of(body)
        if self.stop_uid(ref.uid, by=by):
            return
        self.queued.pop(ref.uid, None)
        st = body.get("status") or {}
        if st.get("phase") in models.FINISHED_PHASES:
            return
        # Not running here (queued, waiting for approval, or never started): finish it now.
        await self.ends.without_task(ref, dict(st), by=by)

    def stop_uid(self, uid: str, *, by: str | None) -> bool:
        """Stop a run this process executes (the control channel's entry); False when no
        task of this process holds it."""
        slot = self.running.get(uid)
        if slot is None:
            return False
        self._cancel(slot, first=slot.stop.request(by))
        return True

    def _cancel(self, slot: Slot, *, first: bool) -> None:
        if not first:
            return
        slot.task.cancel()
        if slot.enforcer is None:
            slot.enforcer = asyncio.create_task(slot.stop.enforce(slot.task))

    async def listen_control(self) -> None:
        """The control channel: stop messages for runs this process executes."""
        backoff = 0.5
        while not self._closing:
            try:
                async for control in self.services.store.control_messages():
                    backoff = 0.5
                    self.stop_uid(control.uid, by=control.by or None)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("control channel lost (%s); reconnecting in %.1fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)

    # -- deletion and shutdown ---------------------------------------------------------------
    async def forget(self, body: Mapping[str, Any]) -> None:
        """The AgentRun is being deleted: cancel its task and delete its Redis keys."""
        ref = RunRef.of(body)
        self.queued.pop(ref.uid, None)
        self.sweeps.cancel_ttl(ref.uid)
        slot = self.running.get(ref.uid)
        if slot is not None:
            self._cancel(slot, first=slot.stop.delete())
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(slot.task), timeout=10)
        # Its approvals go with it (ownerReferences); until the garbage collector gets
        # there, nobody should see them as decidable.
        with contextlib.suppress(Exception):
            await self.gate.cancel_pending(ref, None, "the run was deleted")
        await self.services.store.delete_run(ref.uid)

    async def close(self) -> None:
        """Operator shutdown: cancel tasks without finishing runs, so they resume later."""
        self._closing = True
        self.sweeps.close()
        pending = {slot.task for slot in self.running.values()}
        for _ in range(40):  # re-cancel: a cancellation can be swallowed (see stopping)
            if not pending:
                break
            for task in pending:
                task.cancel()
            _done, pending = await asyncio.wait(pending, timeout=0.5)
        await self.services.tracing.close()

    # -- the queue ---------------------------------------------------------------------------
    def _gauges(self) -> None:
        prom.RUNS_ACTIVE.labels("running").set(len(self.running))
        prom.RUNS_ACTIVE.labels("queued").set(len(self.queued))

    def _start(self, ref: RunRef) -> None:
        if self.role == "controller":
            dispatch = asyncio.create_task(self._dispatch(ref), name=f"agentrun-queue:{ref.key}")
            self._dispatches.add(dispatch)
            dispatch.add_done_callback(self._dispatches.discard)
            return
        task = asyncio.create_task(self.runner.supervise(ref), name=f"agentrun:{ref.key}")
        self.running[ref.uid] = Slot(ref=ref, task=task)
        self._gauges()
        uid = ref.uid
        task.add_done_callback(lambda t: self._done(uid, t))

    async def _dispatch(self, ref: RunRef) -> None:
        """Controller: put the run on the work queue (retried while Redis is away)."""
        delay = 0.5
        while not self._closing:
            try:
                await self.services.store.enqueue_work(
                    uid=ref.uid, namespace=ref.namespace, name=ref.name, why="look"
                )
                return
            except Exception as e:
                log.warning("cannot queue run %s for a worker (%s); retrying", ref.key, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    def _done(self, uid: str, task: asyncio.Task[None]) -> None:
        self.running.pop(uid, None)
        self._gauges()
        for listener in self.on_done:
            listener(uid)
        if not task.cancelled() and task.exception() is not None:
            log.error("run task %s crashed", task.get_name(), exc_info=task.exception())
        if self._closing or not self.queued:
            return
        # Oldest first (creationTimestamp, then name for a stable order).
        nxt = min(self.queued.values(), key=lambda r: (r.created, r.key))
        self.queued.pop(nxt.uid)
        self._start(nxt)

    async def _mark_queued(self, ref: RunRef, st: Mapping[str, Any]) -> None:
        executing = len(self.executing if self.role == "controller" else self.running)
        where = " on the workers" if self.role == "controller" else ""
        msg = (
            f"waiting for a free slot: {executing} runs are executing{where} "
            f"(AGENTRUN_MAX_CONCURRENT_RUNS={self.settings.max_concurrent_runs})"
        )
        w = StatusWriter(
            self.services.k8s, ref, current=dict(st), interval=self.settings.status_interval_seconds
        )
        with contextlib.suppress(Exception):
            await w.phase(
                "Pending",
                reason="Queued",
                message=msg,
                streamPath=stream_path(ref.namespace, ref.name),
            )
