"""What the operator and the SSE server share about Kubernetes objects: the API group, the
label and annotation names agentrun puts on them, and the error an API answer raises.

Pure (no I/O) and the only operator module besides ``events`` that the SSE server imports, so
a name is declared once and both sides read it from here.
"""

from __future__ import annotations

from typing import Any

GROUP = "agentrun.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Labels (on ToolApprovals): the run and the call an approval belongs to.
RUN_LABEL = f"{GROUP}/run"
CALL_ID_LABEL = f"{GROUP}/call-id"
# Annotations the admission webhook writes on an AgentRun (identity facts, never trusted
# from clients): who created it, who set spec.stop.
CREATED_BY = f"{GROUP}/created-by"
STOPPED_BY = f"{GROUP}/stopped-by"
# Stamped by a mutating tool on the object it changes (exactly-once after a crash).
LAST_CALL_ID = f"{GROUP}/last-call-id"
# kopf's finalizer on AgentRuns (the deletion handler deletes the run's Redis keys).
FINALIZER = f"{GROUP}/finalizer"


class KubeError(Exception):
    """An error answer from the API server. ``status`` is the HTTP status; 0 (the operator)
    or 502 (the SSE server, which passes it on) when the server could not be reached."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{reason} ({status}): {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def transient(self) -> bool:
        """The API server is away or overloaded (0: no connection; 429: "storage is
        (re)initializing" while kube-apiserver starts; 502-504): wait and try again."""
        return self.status in (0, 429, 502, 503, 504)


REASK_SUFFIX = "-2"


def current_approval(items: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Of the ToolApprovals of one call (an approval that went Stale is asked again once,
    as NAME-2, with the same call id), the one that counts: the newest that is not Stale,
    else the newest."""
    ordered = sorted(
        items,
        key=lambda ta: (
            str((ta.get("metadata") or {}).get("creationTimestamp") or ""),
            str((ta.get("metadata") or {}).get("name") or ""),
        ),
    )
    live = [ta for ta in ordered if (ta.get("status") or {}).get("state") != "Stale"]
    return (live or ordered)[-1] if ordered else None
