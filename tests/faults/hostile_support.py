"""Helpers of the hostile-input and authorization tests: the SSE server as a real process,
the API server over REST as a given user, kubectl as nobody at all, raw HTTP for requests
no client library will send, and the counters that tell whether anything was written.

Owns nothing the product runs. Never reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis as redis_sync
import yaml
from faults import fault_support

from agentrun_harness.controlplane import ControlPlane

from support import Kubectl, fresh_namespace, wait_for

GROUP_PATH = "/apis/agentrun.dev/v1alpha1"
WEBHOOK_LABEL = "agentrun-test/webhooks"  # as tests/conftest.py labels namespaces it judges


class SSEProcess(fault_support.SSEProcess):
    """``python -m agentrun_sse`` on a free loopback port, against the test control plane
    (the kubeconfig gives the API server's address and CA only: in ``kubernetes`` auth mode
    the server acts with each caller's token), plus what the hostile-input tests check
    after every request."""

    def __init__(self, *, plane: ControlPlane, redis_url: str, workdir: Path) -> None:
        super().__init__(plane=plane, redis_url=redis_url, workdir=workdir, heartbeat_seconds=0.5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def server_errors(self) -> list[str]:
        """Log lines of unhandled exceptions (uvicorn's "Exception in ASGI application")."""
        if not self.log_path.exists():
            return []
        text = self.log_path.read_text(errors="replace")
        return [line for line in text.splitlines() if "Exception in ASGI application" in line]


def kube_api(plane: ControlPlane, user: str | None = "admin") -> httpx.Client:
    """The API server over REST as ``user`` (None: no credentials at all)."""
    headers = {"Authorization": f"Bearer {plane.token(user)}"} if user else {}
    trust = ssl.create_default_context(cafile=str(plane.ca_file))
    return httpx.Client(base_url=plane.server, verify=trust, headers=headers, timeout=30)


def anonymous_kubeconfig(plane: ControlPlane, path: Path) -> Path:
    """A kubeconfig that makes kubectl's requests anonymous.

    kubectl prompts for a user name when a kubeconfig has no credentials; a user name
    without a password instead makes it send a Basic header, which no authenticator of the
    API server claims (basic auth was removed in 1.19), so the request is system:anonymous.
    """
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "agentrun-test",
                "cluster": {"server": plane.server, "certificate-authority": str(plane.ca_file)},
            }
        ],
        "users": [{"name": "anonymous", "user": {"username": "anonymous"}}],
        "contexts": [
            {"name": "anonymous", "context": {"cluster": "agentrun-test", "user": "anonymous"}}
        ],
        "current-context": "anonymous",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class ConfiguredKubectl:
    """kubectl with a kubeconfig of our own (``Kubectl`` knows the test users only)."""

    plane: ControlPlane
    kubeconfig: Path

    def __call__(
        self, *args: str, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.plane.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            # Never the terminal: a kubectl missing credentials would prompt on it.
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def webhook_namespace(kubectl: Kubectl, request: Any, *, bindings: dict[str, str]) -> Iterator[str]:
    """A fresh namespace the admission webhooks judge and no operator watches ("t-"),
    with ``bindings`` (user -> ClusterRole) in effect when it is yielded."""
    for name in fresh_namespace(kubectl, request, "t-"):
        kubectl("label", "namespace", name, f"{WEBHOOK_LABEL}=on")
        for user, role in bindings.items():
            kubectl(
                "create", "rolebinding", f"{user}-{role}", "-n", name,
                f"--clusterrole={role}", f"--user={user}",
            )  # fmt: skip
        for user in bindings:

            def bound(user: str = user, namespace: str = name) -> bool:
                can = kubectl.as_user(user)(
                    "auth", "can-i", "get", "agentruns.agentrun.dev", "-n", namespace, check=False
                )
                return can.stdout.strip() == "yes"

            wait_for(f"{user}'s role binding to take effect", bound)
        yield name


def objects(api: httpx.Client, namespace: str) -> dict[tuple[str, str], str]:
    """Every AgentRun and ToolApproval in ``namespace``: (kind, name) -> resourceVersion."""
    found: dict[tuple[str, str], str] = {}
    for plural in ("agentruns", "toolapprovals"):
        r = api.get(f"{GROUP_PATH}/namespaces/{namespace}/{plural}")
        r.raise_for_status()
        for item in r.json()["items"]:
            found[(plural, item["metadata"]["name"])] = item["metadata"]["resourceVersion"]
    return found


def redis_writes(r: redis_sync.Redis) -> int:
    """Writes this Redis has taken: keys changed (its dirty counter; nothing ever saves
    with ``--save ""``) plus messages published (which change no key)."""
    persistence: dict[str, Any] = r.info("persistence")
    commands: dict[str, Any] = r.info("commandstats")
    published = sum(
        int(commands.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("publish", "spublish")
    )
    return int(persistence["rdb_changes_since_last_save"]) + published


def raw_http(port: int, request: bytes, *, timeout: float = 10) -> tuple[int, bytes]:
    """Send bytes as they are; the status code of the answer and the answer (0: none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)  # no half-close: a server may take it for a client gone
        answer = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and b"\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0].split()
    status = int(status_line[1]) if len(status_line) >= 2 and status_line[1].isdigit() else 0
    return status, answer


def deep_json(levels: int) -> str:
    """``{"a":{"a":...1...}}`` as text: deeper than json.dumps could write it."""
    return '{"a":' * levels + "1" + "}" * levels
