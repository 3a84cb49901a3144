"""The AgentPolicies, ClusterAgentPolicies and namespace labels as they are now, kept by
watches (list, then watch from its resourceVersion; list again when the watch breaks), so
that fixing a run's settings and judging its calls cost no API call.

Owns that cache and its honesty: until every watch has listed, and whenever one of them is
broken, ``for_namespace`` reads the API server instead (a missed deny rule would let a
call through). Never decides anything about a run (``policy`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from agentrun_operator import kube, policy

log = logging.getLogger("agentrun.policybook")

Key = tuple[str, str]  # (namespace or "", name)


class _Mirror:
    """One collection, listed and watched."""

    def __init__(self, k8s: kube.Kube, path: str, kind: str) -> None:
        self._k8s = k8s
        self.path = path
        self.kind = kind
        self.items: dict[Key, dict[str, Any]] = {}
        self.synced = False

    async def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                version = await self._list()
                backoff = 0.5
                while True:
                    version = await self._watch(version)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the API server away, a 410: list again
                self.synced = False
                if not (isinstance(e, kube.KubeError) and e.status == 410):
                    log.info("watch of %s broke (%s); listing again", self.path, e)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10)

    async def _list(self) -> str:
        found = await self._k8s.request("GET", self.path)
        self.items = {_key(item): self._typed(item) for item in found.get("items") or []}
        self.synced = True
        return str((found.get("metadata") or {}).get("resourceVersion") or "")

    async def _watch(self, version: str) -> str:
        async for event in self._k8s.watch(self.path, resource_version=version):
            obj = event.get("object") or {}
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            kind = event.get("type")
            if kind == "DELETED":
                self.items.pop(_key(obj), None)
            elif kind in ("ADDED", "MODIFIED"):
                self.items[_key(obj)] = self._typed(obj)
        return version  # the server ended the watch: go on from where it was

    def _typed(self, obj: dict[str, Any]) -> dict[str, Any]:
        return {**obj, "kind": self.kind}


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


class PolicyBook:
    def __init__(self, k8s: kube.Kube) -> None:
        self._k8s = k8s
        self._local = _Mirror(k8s, kube.AGENTPOLICIES.path(namespace=None), "AgentPolicy")
        self._cluster = _Mirror(
            k8s, kube.CLUSTERAGENTPOLICIES.path(namespace=None), "ClusterAgentPolicy"
        )
        self._namespaces = _Mirror(k8s, "/api/v1/namespaces", "Namespace")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        async def run_all() -> None:
            await asyncio.gather(self._local.run(), self._cluster.run(), self._namespaces.run())

        self._task = asyncio.create_task(run_all(), name="agentrun-policybook")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def synced(self) -> bool:
        return self._local.synced and self._cluster.synced and self._namespaces.synced

    async def for_namespace(self, namespace: str) -> list[policy.Policy]:
        """The policies that apply to runs of ``namespace`` now. Raises KubeError."""
        if not self.synced:
            bodies, labels = await self._k8s.policies_for(namespace)
            return policy.applicable(bodies, labels)
        bodies = [p for (ns, _), p in self._local.items.items() if ns == namespace]
        bodies += list(self._cluster.items.values())
        ns_obj = self._namespaces.items.get(("", namespace)) or {}
        labels = (ns_obj.get("metadata") or {}).get("labels") or {}
        return policy.applicable(bodies, {str(k): str(v) for k, v in labels.items()})

    async def namespace_labels(self, namespace: str) -> dict[str, str]:
        if not self._namespaces.synced:
            return await self._k8s.namespace_labels(namespace)
        ns_obj = self._namespaces.items.get(("", namespace)) or {}
        labels = (ns_obj.get("metadata") or {}).get("labels") or {}
        return {str(k): str(v) for k, v in labels.items()}
