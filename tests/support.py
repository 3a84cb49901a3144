"""Helpers the tests share: kubectl as a test user, and bounded waits that say what they
waited for."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agentrun_operator.testing.controlplane import ControlPlane
from agentrun_operator.testing.operatorproc import OperatorProcess

__all__ = ["Kubectl", "OperatorProcess", "fresh_namespace", "wait_for"]


@dataclass
class Kubectl:
    """kubectl as one of the control plane's users."""

    plane: ControlPlane
    user: str = "admin"

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.plane.kubectl), f"--kubeconfig={self.plane.kubeconfig(self.user)}", *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} as {self.user} failed ({proc.returncode}):\n"
                f"{proc.stderr}{proc.stdout}"
            )
        return proc

    def as_user(self, user: str) -> Kubectl:
        return Kubectl(self.plane, user)


def wait_for(
    what: str, predicate: Callable[[], object], *, timeout: float = 30, interval: float = 0.1
) -> object:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def fresh_namespace(kubectl: Kubectl, request: Any, prefix: str) -> Iterator[str]:
    """A new namespace; on failure its events are printed before it goes."""
    name = f"{prefix}{uuid.uuid4().hex[:10]}"
    kubectl("create", "namespace", name)
    yield name
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        events = kubectl("get", "events", "-n", name, check=False)
        print(f"--- events in {name} ---\n{events.stdout}{events.stderr}")
    kubectl("delete", "namespace", name, "--wait=false", check=False)
