"""AgentRun status patches and conditions, computed from run state.

Pure: takes the current status and what happened, returns the merge patch to send. No I/O,
no kopf, no Kubernetes client, no Redis.
"""

from __future__ import annotations

from typing import Any

from agentrun_operator import models

# One condition per aspect; each phase sets them all, so `kubectl get -o yaml` never
# shows a stale True next to a newer phase.
CONDITION_TYPES = ("Queued", "Running", "AwaitingApproval", "Finished")

# The one condition each phase makes True; the others are False.
_TRUE_IN: dict[str, str] = {
    "Pending": "Queued",
    "Running": "Running",
    "AwaitingApproval": "AwaitingApproval",
    "Succeeded": "Finished",
    "Failed": "Finished",
    "Stopped": "Finished",
}


def merge_conditions(
    current: list[dict[str, Any]],
    updates: dict[str, str],
    *,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """Set condition statuses; lastTransitionTime moves only when a status changes."""
    by_type = {c.get("type"): dict(c) for c in current if c.get("type")}
    for ctype, cstatus in updates.items():
        old = by_type.get(ctype)
        changed = old is None or old.get("status") != cstatus
        if old is None or changed or cstatus == "True":
            entry = {
                "type": ctype,
                "status": cstatus,
                "reason": reason,
                "message": message,
                "lastTransitionTime": now if changed or old is None else old["lastTransitionTime"],
            }
        else:
            # Unchanged and False: keep the story of when and why it last changed.
            entry = dict(old)
        if generation is not None:
            entry["observedGeneration"] = generation
        by_type[ctype] = entry
    ordered = [by_type[t] for t in CONDITION_TYPES if t in by_type]
    ordered += [c for t, c in by_type.items() if t not in CONDITION_TYPES]
    return ordered


def phase_patch(
    *,
    current: dict[str, Any],
    phase: str,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
    **fields: Any,
) -> dict[str, Any]:
    """The status merge patch for entering ``phase`` (plus any extra status fields)."""
    if phase not in _TRUE_IN:
        raise ValueError(f"unknown phase {phase!r}")
    updates = {t: "True" if t == _TRUE_IN[phase] else "False" for t in CONDITION_TYPES}
    patch: dict[str, Any] = {
        "phase": phase,
        "message": message,
        "conditions": merge_conditions(
            current.get("conditions") or [],
            updates,
            reason=reason,
            message=message,
            generation=generation,
            now=now,
        ),
    }
    if generation is not None:
        patch["observedGeneration"] = generation
    if phase in models.FINISHED_PHASES and not current.get("finishedAt"):
        patch["finishedAt"] = now
    if phase == "Running" and not current.get("startedAt"):
        patch["startedAt"] = now
    patch.update({k: v for k, v in fields.items() if v is not None})
    return patch


def cap_result(text: str, limit: int = models.MAX_RESULT_BYTES) -> str:
    """The final answer cut to ``limit`` UTF-8 bytes, on a character boundary."""
    data = text.encode()
    if len(data) <= limit:
        return text
    marker = "… [truncated; the full answer is in the event stream]"
    room = limit - len(marker.encode())
    return data[:room].decode(errors="ignore") + marker
