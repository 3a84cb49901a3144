"""Ending the child processes of the test harness (servers, the operator, the control plane)
the same way everywhere: ``stop`` asks, then insists; ``kill`` is kill -9."""

from __future__ import annotations

import subprocess
from typing import Any, Self


def stop(proc: subprocess.Popen[Any] | None, *, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` seconds; reaped either way.
    Nothing when it is gone already."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def kill(proc: subprocess.Popen[Any] | None) -> None:
    """kill -9: no cleanup, no goodbye; reaped."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


class Managed:
    """A harness process usable with ``with``: started (unless it runs already) on entry,
    stopped on exit. Subclasses have ``proc``, ``start()`` and ``stop()``."""

    proc: subprocess.Popen[Any] | None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
