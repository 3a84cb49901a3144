"""The fault and abuse suite (marker ``faults``): real control plane, real Redis, real
uvicorn, the mock LLM, and things breaking on purpose.

Every scenario reports its figures through the ``figures`` fixture; at the end of the
session they are printed and merged into the table of ``docs/reliability.md``, so the
numbers in the docs are the numbers this code produced. Counts: ``AGENTRUN_FAULTS=full``
runs the counts the reliability table states (20 kills, 1,000 reconnects, 500 runs...);
the default (``ci``) runs smaller ones that keep CI's time, and says so in the table.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agentrun_harness.controlplane import k8s_release

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
MODE = os.environ.get("AGENTRUN_FAULTS", "ci")
if MODE not in ("ci", "full"):
    raise pytest.UsageError(f"AGENTRUN_FAULTS={MODE!r}: expected ci or full")


def count(full: int, ci: int) -> int:
    """The count of a scenario: ``full`` with AGENTRUN_FAULTS=full, else ``ci``."""
    return full if MODE == "full" else ci


@dataclass
class Figures:
    """Figures of this session: (scenario, figure) -> (value, bound)."""

    rows: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    merged: bool = False  # whether the session's figures went into the docs

    def record(self, scenario: str, figure: str, value: object, bound: str = "") -> None:
        """One line of the reliability table, e.g.
        ``record("Operator crash", "tool calls executed twice", 0, "0")``."""
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        self.rows[(scenario, figure)] = (text, bound)
        print(f"[figure] {scenario}: {figure} = {text}" + (f" (bound {bound})" if bound else ""))


_FIGURES = Figures()


@pytest.fixture(scope="session")
def figures() -> Figures:
    return _FIGURES


def _table(rows: dict[tuple[str, str], tuple[str, str, str]]) -> str:
    lines = ["| Scenario | Figure | Value | Bound | Run |", "|---|---|---|---|---|"]
    for (scenario, figure), (value, bound, run) in rows.items():
        lines.append(f"| {scenario} | {figure} | {value} | {bound} | {run} |")
    return "\n".join(lines)


def _parse(text: str) -> dict[tuple[str, str], tuple[str, str, str]]:
    rows: dict[tuple[str, str], tuple[str, str, str]] = {}
    body = text.split(BEGIN, 1)[-1].split(END, 1)[0] if BEGIN in text else ""
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("Scenario", "") and not re.match(r"-+$", cells[0]):
            rows[(cells[0], cells[1])] = (cells[2], cells[3], cells[4])
    return rows


_PARTIAL: list[str] = []  # fault tests left out of this session


def pytest_deselected(items: list[pytest.Item]) -> None:
    _PARTIAL.extend(i.nodeid for i in items if "faults" in Path(str(i.fspath)).parts)


def _whole(session: pytest.Session, exitstatus: int) -> bool:
    """Whether this session ran whole scenarios, whose figures may go into the docs: no
    fault test deselected (``-k``, ``-m``, ``--deselect``), none picked by node id (parts of
    a scenario give part counts), and the session ended with every test passed."""
    picked = any("::" in str(arg) for arg in session.config.args)
    return not _PARTIAL and not picked and exitstatus == 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # (Runs before the terminal summary, which the terminal reporter writes after it.)
    _FIGURES.merged = _whole(session, exitstatus)
    if not _FIGURES.rows or not _FIGURES.merged:
        return
    text = REPORT.read_text() if REPORT.exists() else ""
    rows = _parse(text)
    run = f"{MODE}, k8s {k8s_release()}"
    for key, (value, bound) in _FIGURES.rows.items():
        rows[key] = (value, bound, run)
    table = f"{BEGIN}\n{_table(rows)}\n{END}"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + table + rest.split(END, 1)[1]
    else:
        text = text + ("\n" if text else "") + table + "\n"
    REPORT.write_text(text)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES.rows:
        terminalreporter.section(f"reliability figures ({MODE} counts)")
        if not _FIGURES.merged:
            terminalreporter.write_line(
                f"(not merged into {REPORT.relative_to(ROOT)}: part of a scenario ran, or a test"
                " failed)"
            )
        for (scenario, figure), (value, bound) in _FIGURES.rows.items():
            terminalreporter.write_line(
                f"{scenario}: {figure} = {value}" + (f" (bound {bound})" if bound else "")
            )
