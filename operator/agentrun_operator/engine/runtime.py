"""What a process that executes or admits runs holds: its clients, its ``Registry`` and the
background tasks around it (the control channel, the clocks, notifications), opened and
closed the same way by the kopf operator (``handlers``) and by a worker (``worker``).

Never: registers kopf handlers, or decides what a run does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from agentrun_operator import checkpoint, config, events, kube, notify
from agentrun_operator.engine.policybook import PolicyBook
from agentrun_operator.engine.registry import Registry
from agentrun_operator.store import RunStore

log = logging.getLogger("agentrun.runtime")


@dataclass
class Runtime:
    settings: config.Settings
    kube: kube.Kube
    store: RunStore
    registry: Registry
    background: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self) -> None:
        """Tasks cancelled without finishing runs (they resume elsewhere or later)."""
        await self.registry.close()
        if self.registry.services.policies is not None:
            await self.registry.services.policies.close()
        if self.registry.notifier is not None:
            await self.registry.notifier.drain()
        for task in self.background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.close()
        await self.kube.close()


async def open_runtime(cfg: config.Settings, *, role: str, clocks: bool) -> Runtime:
    """``role``: all, controller or worker; ``clocks``: this process owns the sweeps
    (approval expiries, TTL, orphaned keys). Raises config.ConfigError when the Redis
    setting does not fit the Redis it names."""
    k = await kube.Kube.from_env()
    store = RunStore.connect(cfg.redis_url, cluster=cfg.redis_cluster)
    try:
        wrong = await events.check_mode(store.redis, cluster=cfg.redis_cluster)
    except Exception as e:  # Redis away: the runs wait for it and say so; not fatal here
        log.warning("cannot ask Redis whether it is a cluster: %s", e)
        wrong = None
    if wrong is not None:
        await store.close()
        await k.close()
        raise config.ConfigError(f"AGENTRUN_REDIS_CLUSTER: {wrong}")
    registry = Registry(
        settings=cfg,
        k8s=k,
        store=store,
        saver=checkpoint.RedisCheckpointSaver(store.redis),
        role=role,
    )
    try:
        registry.cluster_id = await k.cluster_id()
    except kube.KubeError as e:
        log.warning(
            "cannot read namespace kube-system (%s): runs' Redis keys are not stamped with "
            "this cluster's identity, and keys of runs deleted while Redis was away are "
            "not swept",
            e,
        )
    # AgentPolicies as they are now, from watches: judging a call costs no API call.
    book = PolicyBook(k)
    book.start()
    registry.services.policies = book
    background = [asyncio.create_task(registry.listen_control(), name="agentrun-control")]
    if clocks:
        sweeps = registry.sweeps
        background.append(asyncio.create_task(sweeps.watch_expiries(), name="agentrun-expiries"))
        background.append(asyncio.create_task(sweeps.sweep_leftovers(), name="agentrun-leftovers"))
    if cfg.notify_configmap:
        registry.notifier = notify.Notifier(
            k8s=k,
            configmap=cfg.notify_configmap,
            ui_url=cfg.ui_url,
            refresh_seconds=cfg.notify_refresh_seconds,
        )
        background.append(asyncio.create_task(registry.notifier.run(), name="agentrun-notify"))
    return Runtime(cfg, k, store, registry, background)
