"""The operator as a real process (``python -m agentrun_operator``) for tests and benchmarks.

Owns one operator process, its environment and its log; it can be killed with -9 and
started again with the same identity, as a crashed pod's container would be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from agentrun_harness import procs
from agentrun_harness.controlplane import ControlPlane, free_port


def _wait(what: str, ready: object, timeout: float) -> None:
    assert callable(ready)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class OperatorProcess(procs.Managed):
    """The operator as a real process (`python -m agentrun_operator`), killable with -9."""

    def __init__(
        self,
        *,
        plane: ControlPlane,
        redis_url: str,
        model_base_url: str,
        workdir: Path,
        operator_id: str = "op-test",
        user: str = "admin",
        env: dict[str, str] | None = None,
        module: str = "agentrun_operator",
    ) -> None:
        self.plane = plane
        self.workdir = workdir
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AGENTRUN_")},
            "KUBECONFIG": str(plane.kubeconfig(user)),
            "AGENTRUN_REDIS_URL": redis_url,
            "AGENTRUN_MODEL_BASE_URL": model_base_url,
            "AGENTRUN_MODEL_NAME": "mock",
            "AGENTRUN_OPERATOR_ID": operator_id,
            "AGENTRUN_HEALTH_HOST": "127.0.0.1",
            "AGENTRUN_HEALTH_PORT": str(self.health_port),
            "AGENTRUN_METRICS_PORT": str(self.metrics_port),
            "AGENTRUN_STATUS_INTERVAL_SECONDS": "0.5",
            "AGENTRUN_LEASE_SECONDS": "5",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        # agentrun_operator (kopf: all or controller) or agentrun_operator.worker
        self.module = module

    @property
    def log_path(self) -> Path:
        return self.workdir / f"operator-{self.starts}.log"

    def start(self, *, timeout: float = 60) -> None:
        self.starts += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "--verbose"],
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

        _wait("the operator's liveness endpoint", healthy, timeout)

    def kill(self) -> None:
        """kill -9: no cleanup, no goodbye."""
        procs.kill(self.proc)

    def freeze(self) -> None:
        """SIGSTOP: the process stays, cut off from everything (as a partition, a long GC
        pause or a throttled container), until ``thaw``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def terminate(self) -> None:
        """SIGTERM, as a rolling update sends it; returns at once (``stop`` waits)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def stop(self) -> None:
        procs.stop(self.proc)

    def log_tail(self, lines: int = 60, *, quiet: bool = False) -> str:
        """The log's last ``lines`` lines; ``quiet``: its DEBUG records left out (the HTTP
        clients' chatter would hide what a failed test needs), tracebacks kept."""
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        if quiet:
            text = _without_debug(text)
        return "\n".join(text[-lines:])


def _without_debug(lines: list[str]) -> list[str]:
    kept: list[str] = []
    keep = True
    for line in lines:
        if line.startswith("["):  # a record of its own: "[time] logger [LEVEL] message"
            keep = "[DEBUG" not in line
        if keep:
            kept.append(line)
    return kept


class WebhookProcess:
    """The admission webhook server as a real process, on HTTPS on loopback."""

    def __init__(
        self, *, plane: ControlPlane, workdir: Path, env: dict[str, str] | None = None
    ) -> None:
        from agentrun_harness.controlplane import issue_server_cert

        self.plane = plane
        self.workdir = workdir
        self.port = free_port()
        self.cert, self.key = issue_server_cert(
            plane.pki, workdir, hosts=["127.0.0.1", "localhost"], name="webhooks"
        )
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AGENTRUN_")},
            "KUBECONFIG": str(plane.kubeconfig("agentrun-webhooks")),
            "AGENTRUN_WEBHOOK_HOST": "127.0.0.1",
            "AGENTRUN_WEBHOOK_PORT": str(self.port),
            "AGENTRUN_WEBHOOK_CERT_FILE": str(self.cert),
            "AGENTRUN_WEBHOOK_KEY_FILE": str(self.key),
            "AGENTRUN_OPERATOR_USERNAMES": "agentrun-operator",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "webhooks.log"

    def start(self, *, timeout: float = 30) -> None:
        import ssl

        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentrun_operator.webhooks"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        ctx = ssl.create_default_context(cafile=str(self.plane.ca_file))

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"webhook server exited at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1, context=ctx) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        _wait("the webhook server", healthy, timeout)

    def stop(self) -> None:
        procs.stop(self.proc, timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
