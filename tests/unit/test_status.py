"""Status patches: phases set every condition, transition times move only on change, the
result is capped on a character boundary."""

from __future__ import annotations

import pytest

from agentrun_operator import status


def test_entering_running_sets_started_and_conditions() -> None:
    patch = status.phase_patch(
        current={}, phase="Running", reason="Started", message="go", generation=1, now="T1"
    )
    assert patch["phase"] == "Running" and patch["startedAt"] == "T1"
    conds = {c["type"]: c for c in patch["conditions"]}
    assert conds["Running"]["status"] == "True" and conds["Queued"]["status"] == "False"
    assert all(c["observedGeneration"] == 1 for c in conds.values())


def test_transition_time_moves_only_when_status_changes() -> None:
    first = status.phase_patch(
        current={}, phase="Running", reason="Started", message="m", generation=1, now="T1"
    )
    second = status.phase_patch(
        current=first, phase="Succeeded", reason="Succeeded", message="done", generation=1, now="T2"
    )
    conds = {c["type"]: c for c in second["conditions"]}
    assert conds["Running"]["lastTransitionTime"] == "T2"  # True -> False
    assert conds["Queued"]["lastTransitionTime"] == "T1"  # False -> False
    assert conds["Finished"]["status"] == "True" and second["finishedAt"] == "T2"


def test_unknown_phase_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="Exploded"):
        status.phase_patch(
            current={}, phase="Exploded", reason="", message="", generation=None, now=""
        )


def test_result_is_capped_to_4_kib_on_a_character_boundary() -> None:
    text = "é" * 5000  # two bytes each
    capped = status.cap_result(text)
    assert len(capped.encode()) <= 4096
    assert capped.endswith("[truncated; the full answer is in the event stream]")
    assert status.cap_result("short") == "short"
