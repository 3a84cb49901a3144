"""One active controller among its replicas: a ``coordination.k8s.io/v1`` Lease, kept the
way client-go's leader election keeps it, so ``kubectl get lease`` reads as for any
controller.

- Acquire: the Lease is free (no holder, or its holder let it lapse: its record has not
  changed for ``leaseDurationSeconds`` by *our* clock, so no clock skew matters), or ours.
  Every write carries the ``resourceVersion`` read, so of two candidates one wins and the
  other sees a conflict.
- Hold: renew every ``lease_seconds / 5``; a holder that cannot renew for
  ``lease_seconds * 2 / 3`` (the API server away, or another candidate took it) gives up
  *before* a standby may take over, and its process exits (``__main__``), as client-go's
  controllers do: a controller that lost the Lease never acts again in that process.
- Release on a clean shutdown (SIGTERM of a rolling update): holder cleared, so a standby
  takes over at its next try instead of after a whole lease.

Owns the Lease object only. Never: decides anything about runs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any

from agentrun_operator import kube

log = logging.getLogger("agentrun.leader")

_LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


class LostLeadership(RuntimeError):
    """The Lease could not be renewed in time: another replica may act now."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Elector:
    def __init__(
        self, k: kube.Kube, *, lease: str, identity: str, lease_seconds: float = 15.0
    ) -> None:
        self._k = k
        self.namespace, _, self.name = lease.partition("/")
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.retry_seconds = max(0.5, lease_seconds / 5)
        self.renew_deadline = lease_seconds * 2 / 3
        # The holder's record as we last saw it change, and when (monotonic): a lease is
        # expired once its record has not changed for its duration.
        self._observed: dict[str, Any] | None = None
        self._observed_at = 0.0
        self.holding = False

    @property
    def _collection(self) -> str:
        return _LEASES.format(namespace=self.namespace)

    @property
    def _path(self) -> str:
        return f"{self._collection}/{self.name}"

    async def acquire(self, *, on_wait: Any = None) -> None:
        """Return once this process holds the Lease (waiting as a standby meanwhile)."""
        said = ""
        while True:
            try:
                if await self._try():
                    log.info(
                        "acquired the controller lease %s/%s as %s",
                        self.namespace,
                        self.name,
                        self.identity,
                    )
                    return
                holder = str((self._observed or {}).get("holderIdentity") or "")
                why = f"held by {holder}"
            except kube.KubeError as e:
                why = f"cannot read or write it: {e}"
            if why != said:  # once per change, not every few seconds
                log.info(
                    "standing by: the controller lease %s/%s is %s",
                    self.namespace,
                    self.name,
                    why,
                )
                said = why
            await asyncio.sleep(self.retry_seconds)

    async def hold(self) -> None:
        """Renew until the Lease is lost; then raise :class:`LostLeadership`."""
        last_renewed = time.monotonic()
        while True:
            await asyncio.sleep(self.retry_seconds)
            try:
                if await self._try():
                    last_renewed = time.monotonic()
                    continue
                holder = (self._observed or {}).get("holderIdentity")
                raise LostLeadership(f"the controller lease was taken by {holder}")
            except kube.KubeError as e:
                if time.monotonic() - last_renewed < self.renew_deadline:
                    log.warning("cannot renew the controller lease (%s); trying again", e)
                    continue
                self.holding = False
                raise LostLeadership(
                    f"the controller lease could not be renewed for {self.renew_deadline:.0f}s: {e}"
                ) from e

    async def release(self) -> None:
        """Let a standby take over now (a clean shutdown)."""
        if not self.holding:
            return
        self.holding = False
        try:
            found = await self._k.request("GET", self._path)
            spec = found.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            found["spec"] = {**spec, "holderIdentity": None, "leaseDurationSeconds": 1}
            found["spec"]["renewTime"] = _now()
            await self._k.request("PUT", self._path, body=found)
            log.info("released the controller lease %s/%s", self.namespace, self.name)
        except kube.KubeError as e:
            log.warning("could not release the controller lease (%s); it lapses by itself", e)

    async def _try(self) -> bool:
        """Acquire or renew once: whether this process holds the Lease now."""
        try:
            found = await self._k.request("GET", self._path)
        except kube.KubeError as e:
            if e.status != 404:
                raise
            return await self._create()
        spec: dict[str, Any] = dict(found.get("spec") or {})
        record = {k: spec.get(k) for k in ("holderIdentity", "renewTime", "leaseTransitions")}
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or self.lease_seconds)
        if holder and holder != self.identity:
            if time.monotonic() - self._observed_at < duration:
                self.holding = False
                return False
        now = _now()
        if holder != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if holder else 0)
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=int(self.lease_seconds),
            renewTime=now,
        )
        found["spec"] = spec
        try:
            await self._k.request("PUT", self._path, body=found)
        except kube.KubeError as e:
            if e.status == 409:  # another candidate wrote first
                self.holding = False
                return False
            raise
        self.holding = True
        return True

    async def _create(self) -> bool:
        now = _now()
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.lease_seconds),
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        }
        try:
            await self._k.request("POST", self._collection, body=body)
        except kube.KubeError as e:
            if e.status == 409:
                return False
            raise
        self.holding = True
        return True
