"""Everything the engine does on a clock rather than on an event: waking runs whose
approval expired, deleting finished runs after their TTL, and deleting the Redis keys of
runs that are gone (deleted while Redis was away, or while no operator ran).

Never: touches a run a task of this process holds, or keys that another cluster's operator
stamped (a shared Redis).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from agentrun_operator import approvals, config, kube, models
from agentrun_operator import store as store_mod
from agentrun_operator.engine.common import RunRef, Services

log = logging.getLogger("agentrun.sweeps")


class Sweeps:
    def __init__(
        self,
        services: Services,
        *,
        busy: Callable[[str], bool],
        running: Callable[[str], bool],
        wake: Callable[[RunRef], None],
    ) -> None:
        self._s = services
        self._busy = busy  # a run this process executes or queued
        self._running = running  # a run this process executes now
        self._wake = wake  # start a task for a run
        self.expiries: dict[str, tuple[dt.datetime, RunRef]] = {}
        self.ttl_tasks: dict[str, asyncio.Task[None]] = {}
        # Uids of runs deleted while Redis was unreachable: their keys go once it is back.
        self.leftovers: set[str] = set()
        self.closing = False

    # -- approvals that expire ---------------------------------------------------------------
    def expect(self, ref: RunRef, when: dt.datetime) -> None:
        """Wake the run at ``when`` (its earliest approval deadline)."""
        self.expiries[ref.uid] = (when, ref)

    def forget_expiry(self, uid: str) -> None:
        self.expiries.pop(uid, None)

    async def watch_expiries(self) -> None:
        """One loop for all runs waiting on people: wake a run when an approval expires."""
        while not self.closing:
            await asyncio.sleep(1)
            now = dt.datetime.now(dt.UTC)
            for uid, (when, ref) in list(self.expiries.items()):
                if when <= now and not self._running(uid):
                    self.expiries.pop(uid, None)
                    self._wake(ref)

    # -- TTL after finishing -----------------------------------------------------------------
    def schedule_ttl(self, ref: RunRef, spec: models.AgentRunSpec, st: Mapping[str, Any]) -> None:
        ttl = spec.ttl_seconds_after_finished
        if ttl is None or ref.uid in self.ttl_tasks or self.closing:
            return
        finished = approvals.parse_time(st.get("finishedAt")) or dt.datetime.now(dt.UTC)
        delay = max(0.0, (finished - dt.datetime.now(dt.UTC)).total_seconds() + float(ttl))

        async def expire() -> None:
            await asyncio.sleep(delay)
            log.info("deleting %s: ttlSecondsAfterFinished=%s elapsed", ref.key, ttl)
            await self._s.k8s.delete_agentrun(namespace=ref.namespace, name=ref.name)

        task = asyncio.create_task(expire(), name=f"agentrun-ttl:{ref.key}")
        self.ttl_tasks[ref.uid] = task
        uid = ref.uid
        task.add_done_callback(lambda _t: self.ttl_tasks.pop(uid, None))

    def cancel_ttl(self, uid: str) -> None:
        task = self.ttl_tasks.pop(uid, None)
        if task is not None:
            task.cancel()

    def close(self) -> None:
        self.closing = True
        for task in self.ttl_tasks.values():
            task.cancel()

    # -- Redis keys of runs that are gone ----------------------------------------------------
    async def sweep_leftovers(self, *, every: float = 5.0) -> None:
        """Delete the keys of runs deleted while Redis was unreachable, once it is back; and
        every ``AGENTRUN_ORPHAN_SWEEP_SECONDS`` (first a minute after start), the keys of any
        run that no longer exists: deleted while Redis was away and this operator restarted
        before it came back, or while no operator ran at all."""
        period = self._s.settings.orphan_sweep_seconds
        next_sweep = time.monotonic() + min(60.0, period)
        while not self.closing:
            await asyncio.sleep(every)
            if period and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + period
                try:
                    await self.sweep_orphans()
                except Exception as e:  # next time; Redis or the API server is away
                    log.warning("could not look for the keys of deleted runs: %s", e)
            for uid in list(self.leftovers):
                try:
                    await self._s.store.delete_run(uid)
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
        if not self._s.cluster_id:
            return 0
        store = self._s.store
        candidates: dict[str, dict[str, str]] = {}  # namespace -> uid -> name
        async for uid in store.run_uids():
            if self._busy(uid):
                continue
            try:
                if await store.cluster_of(uid) != self._s.cluster_id:
                    continue
                first = await store.first_event(uid)
            except Exception as e:  # a key of another type, an unreadable entry
                if store_mod.unreachable(e):
                    raise
                log.warning("sweep: cannot read run uid %s's keys: %s", uid, e)
                continue
            run = str((first or {}).get("run", ""))
            namespace, _, name = run.partition("/")
            if namespace and config.in_namespaces(namespace, self._s.settings.namespaces):
                candidates.setdefault(namespace, {})[uid] = name
        swept = 0
        for namespace, uids in candidates.items():
            try:
                listed = await self._s.k8s.list_agentruns(namespace=namespace)
            except kube.KubeError as e:  # e.g. 403: no rights there; the others still go
                log.warning("sweep: cannot list the AgentRuns of %s: %s", namespace, e)
                continue
            alive = {run["metadata"]["uid"] for run in listed}
            for uid, name in uids.items():
                if uid not in alive:
                    await store.delete_run(uid)
                    self.leftovers.discard(uid)
                    swept += 1
                    log.info(
                        "deleted the Redis keys of %s/%s (uid %s), a deleted run",
                        namespace,
                        name,
                        uid,
                    )
        return swept
