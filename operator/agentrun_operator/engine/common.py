"""What every part of the run engine shares: a run's identity (``RunRef``), the services it
uses, the error that fails a run, the audit log, and small pure helpers.

Never: does I/O itself (``Services`` only holds the clients).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agentrun_operator import approvals, config, events, kube, models, notify, tracing
from agentrun_operator import store as store_mod
from agentrun_operator.store import RunStore

audit_log = logging.getLogger("agentrun.audit")

# A status message written while a run waits for Redis or the API server; the run's next
# status write replaces it.
WAITING = "Waiting: "


@dataclass
class Services:
    """The clients and configuration every part of the engine uses."""

    settings: config.Settings
    k8s: kube.Kube
    store: RunStore
    saver: Any  # the LangGraph checkpointer (checkpoint.RedisCheckpointSaver)
    notifier: notify.Notifier | None = None
    # The policies as they are now, kept by watches (engine.policybook); None: read them
    # from the API server each time.
    policies: Any = None
    # This cluster's identity (the kube-system namespace's uid), stamped on every run's keys
    # so that the sweep never touches another cluster's runs in a shared Redis. "": no sweep.
    cluster_id: str = ""
    # Each run as one OpenTelemetry trace (a no-op unless an endpoint is configured).
    tracing: tracing.Tracing = field(default_factory=lambda: tracing.Tracing(environ={}))

    def notify(self, ref: RunRef, event: str, text: str, **fields: Any) -> None:
        if self.notifier is not None:
            self.notifier.publish(
                namespace=ref.namespace, event=event, text=text, run=ref.name, **fields
            )


@dataclass
class RunRef:
    namespace: str
    name: str
    uid: str
    generation: int | None
    created: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> RunRef:
        meta = body["metadata"]
        return cls(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            generation=meta.get("generation"),
            created=meta.get("creationTimestamp", ""),
        )

    def involved(self) -> dict[str, Any]:
        return {
            "apiVersion": models.API_VERSION,
            "kind": "AgentRun",
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid},
        }


class RunFailed(Exception):
    """The run cannot go on; ``code`` is the reason, ``message`` says what to fix."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def audit(action: str, **fields: Any) -> None:
    """One structured JSON line per decision and stop, for log pipelines."""
    audit_log.info(json.dumps({"audit": action, "at": events.now_rfc3339(), **fields}))


def elapsed_since(value: Any) -> float:
    started = approvals.parse_time(value)
    if started is None:
        return 0.0
    return max(0.0, (dt.datetime.now(dt.UTC) - started).total_seconds())


def short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def unavailable(e: BaseException) -> str | None:
    """What could not be reached, past the clients' own retries ("Redis", "the Kubernetes
    API"), or None when ``e`` is not about reaching something."""
    if isinstance(e, kube.KubeError):
        return "the Kubernetes API" if e.transient else None
    if store_mod.unreachable(e):
        return "Redis"
    return None


def is_waiting(st: Mapping[str, Any]) -> bool:
    """Whether the status message says the run waits for Redis or the API server."""
    return str(st.get("message") or "").startswith(WAITING)


def annotation(body: Mapping[str, Any], key: str) -> str | None:
    """An identity annotation the admission webhook wrote (None when absent or empty)."""
    value = ((body.get("metadata") or {}).get("annotations") or {}).get(key)
    return str(value) if value else None
