"""Helpers the SSE server's tests share: its settings against the test control plane, and a
bare AgentRun to stream (no operator needed: tests write its events themselves)."""

from __future__ import annotations

from agentrun_operator.testing.controlplane import ControlPlane
from agentrun_sse import settings

import support
from support import Kubectl


def sse_settings(cluster: ControlPlane, redis_url: str, **kw: object) -> settings.Settings:
    base = settings.Settings(
        host="127.0.0.1",
        port=0,
        heartbeat_seconds=0.2,
        redis_url=redis_url,
        kube=settings.KubeTarget(server=cluster.server, ca_file=str(cluster.ca_file)),
    )
    return settings.Settings(**{**base.__dict__, **kw})  # type: ignore[arg-type]


def create_run(kubectl: Kubectl, namespace: str, name: str = "r1") -> str:
    """An AgentRun with nothing running it; returns its uid."""
    return support.create_run(kubectl, namespace, name, goal="watch me")
