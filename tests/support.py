"""Helpers the tests share: kubectl as a test user, and bounded waits that say what they
waited for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentrun_operator.testing.controlplane import ControlPlane, free_port


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


class OperatorProcess:
    """The operator as a real process (`python -m agentrun_operator`), killable with -9."""

    def __init__(
        self,
        *,
        plane: ControlPlane,
        redis_url: str,
        model_base_url: str,
        workdir: Path,
        operator_id: str = "op-test",
        env: dict[str, str] | None = None,
    ) -> None:
        self.plane = plane
        self.workdir = workdir
        self.health_port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AGENTRUN_")},
            "KUBECONFIG": str(plane.kubeconfig("admin")),
            "AGENTRUN_REDIS_URL": redis_url,
            "AGENTRUN_MODEL_BASE_URL": model_base_url,
            "AGENTRUN_MODEL_NAME": "mock",
            "AGENTRUN_OPERATOR_ID": operator_id,
            "AGENTRUN_HEALTH_HOST": "127.0.0.1",
            "AGENTRUN_HEALTH_PORT": str(self.health_port),
            "AGENTRUN_STATUS_INTERVAL_SECONDS": "0.5",
            "AGENTRUN_LEASE_SECONDS": "5",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"operator-{self.starts}.log"

    def start(self, *, timeout: float = 60) -> None:
        self.starts += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentrun_operator", "--verbose"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited at start:\n{self.log_tail()}")
            try:
                url = f"http://127.0.0.1:{self.health_port}/healthz"
                with urllib.request.urlopen(url, timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_for("the operator's liveness endpoint", healthy, timeout=timeout)

    def kill(self) -> None:
        """kill -9: no cleanup, no goodbye."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


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
