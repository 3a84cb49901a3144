"""Every kopf registration of the operator: thin handlers that delegate to the ``engine``.

Importing this module registers the handlers, so both ``python -m agentrun_operator`` and
``kopf run -m agentrun_operator.handlers`` work. Never holds run logic (the ``engine``
package does) and never writes ``spec``: kopf's own bookkeeping lives in ``status.kopf``
so GitOps tools see no drift.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import kopf

from agentrun_operator import (
    config,
    contract,
    mcpservers,
    metrics,
    models,
)
from agentrun_operator.engine import Registry, runtime

log = logging.getLogger("agentrun.handlers")

GROUP, VERSION, PLURAL = models.GROUP, models.VERSION, "agentruns"


@dataclass
class State:
    runtime: runtime.Runtime
    discovery: mcpservers.Discovery

    @property
    def registry(self) -> Registry:
        return self.runtime.registry

    @property
    def settings(self) -> config.Settings:
        return self.runtime.settings


def _state(memo: kopf.Memo) -> State:
    state: State = memo["agentrun"]
    return state


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    cfg: config.Settings = memo.get("settings") or config.load()
    settings.persistence.finalizer = contract.FINALIZER
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(
        field="status.kopf.last-handled-configuration"
    )
    # Handler outcomes are not news for `kubectl describe`; the registry posts the story.
    settings.posting.level = logging.WARNING
    settings.peering.standalone = True  # ownership of a run is the Redis lease's job
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    # Our handlers are thin: when one fails, the API server or Redis was briefly away.
    # Retry in seconds, not kopf's default minute (a decision would wait that long).
    settings.execution.default_backoff = 5
    metrics.serve(host=cfg.health_host, port=cfg.metrics_port)
    try:
        rt = await runtime.open_runtime(cfg, role=cfg.role, clocks=True)
    except config.ConfigError as e:
        log.error("%s", e)
        raise kopf.PermanentError(str(e)) from None
    memo["agentrun"] = State(rt, mcpservers.Discovery(rt.kube, cfg))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    state = _state(memo)
    await state.discovery.close()
    await state.runtime.close()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
async def run(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await _state(memo).registry.ensure(body)


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec.stop", new=True)
async def stop(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    annotations = body.metadata.annotations
    await _state(memo).registry.stop(body, by=annotations.get(contract.STOPPED_BY))


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec", old=kopf.PRESENT)
async def spec_changed(body: kopf.Body, old: Any, new: Any, memo: kopf.Memo, **_: Any) -> None:
    await _state(memo).registry.spec_changed(body, old or {}, new or {})


@kopf.on.field(GROUP, VERSION, "toolapprovals", field="spec.votes")
async def voted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await _state(memo).registry.decided(body)


def _controller(memo: kopf.Memo, **_: Any) -> bool:
    """A filter: handlers only a controller has (an operator doing everything has not)."""
    state: State | None = memo.get("agentrun")
    return state is not None and state.registry.role == "controller"


@kopf.on.event(GROUP, VERSION, PLURAL, when=_controller)
async def run_seen(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    # The workers' status writes tell the controller which runs execute (its limit).
    _state(memo).registry.seen(event.get("object") or {}, deleted=event.get("type") == "DELETED")


@kopf.on.resume(GROUP, VERSION, "toolapprovals", when=_controller)
@kopf.on.field(GROUP, VERSION, "toolapprovals", field="status.expiresAt", when=_controller)
async def approval_deadline(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    # A controller owns the clocks: its workers may come and go while people decide.
    _state(memo).registry.expect_approval(body)


@kopf.on.resume(GROUP, VERSION, "mcpservers")
@kopf.on.create(GROUP, VERSION, "mcpservers")
@kopf.on.update(GROUP, VERSION, "mcpservers")
async def mcpserver(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _state(memo).discovery.ensure(body)


@kopf.on.event(GROUP, VERSION, "mcpservers")
async def mcpserver_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    # Deleted (no finalizer, so no delete handler runs): stop following it.
    if event.get("type") == "DELETED":
        await _state(memo).discovery.forget(event.get("object") or {})


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def delete(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    state = _state(memo)
    # Bounded: Redis down for long must never wedge the deletion of an AgentRun.
    try:
        await asyncio.wait_for(
            state.registry.forget(body), timeout=state.settings.redis_cleanup_seconds
        )
    except Exception as e:
        state.registry.sweeps.leftovers.add(body.metadata.uid)
        logger.error(
            f"could not delete the Redis keys of run uid {body.metadata.uid} yet "
            f"({type(e).__name__}: {e}); they go once Redis is back (should the operator "
            f"restart first, delete them by hand: redis-cli --scan --pattern "
            f"'agentrun:{{{body.metadata.uid}}}:*' | xargs redis-cli unlink)"
        )
