"""What the e2e tests share about their cluster (``E2E_CLUSTER``): which one it is, kubectl on
it as each test user, and how the tests reach it. See tests/e2e/conftest.py."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentrun_harness import node

from support import Kubectl, run_kubectl

ROOT = Path(__file__).resolve().parents[1]
E2E_CLUSTER = os.environ.get("E2E_CLUSTER", "local")
if E2E_CLUSTER not in ("local", "kind", "existing"):
    raise pytest.UsageError(f"E2E_CLUSTER={E2E_CLUSTER!r}: expected local, kind or existing")
KIND_CLUSTER = os.environ.get("KIND_CLUSTER", "agentrun-e2e")


@dataclass
class ClusterKubectl(Kubectl):
    """kubectl on the e2e cluster, its discovery cache kept with the cluster (not ~/.kube)."""

    cache_dir: Path = ROOT / ".work" / "cluster" / "kubectl-cache"

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return super().__call__(
            f"--cache-dir={self.cache_dir}", *args, input=input, check=check, timeout=timeout
        )

    def as_user(self, user: str) -> ClusterKubectl:
        return ClusterKubectl(self.plane, user, self.cache_dir)


@dataclass
class ImpersonatingKubectl:
    """kubectl on a cluster given by a kubeconfig (kind, or any cluster): the admin is the
    kubeconfig's user, and the test users are impersonated (``--as``), so the API server,
    RBAC and the admission webhooks see them as on the local node."""

    binary: str
    kubeconfig: Path
    user: str = "admin"

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        who = [] if self.user == "admin" else [f"--as={self.user}"]
        base = [self.binary, f"--kubeconfig={self.kubeconfig}", *who]
        return run_kubectl(base, args, user=self.user, input=input, check=check, timeout=timeout)

    def as_user(self, user: str) -> ImpersonatingKubectl:
        return ImpersonatingKubectl(self.binary, self.kubeconfig, user)


@dataclass
class Target:
    """The cluster the e2e tests run on, and how they get images and identities there.

    ``local``: this machine's node (``make cluster-up``); images are imported into its
    containerd, the test users have static tokens. ``kind``: a kind cluster (created when
    missing), images built with Docker and ``kind load``-ed. ``existing``: the cluster of
    ``KUBECONFIG``; ``E2E_IMAGE`` names an image its nodes can pull. On both, people are
    impersonated by kubectl, and the SSE server is called with service-account tokens."""

    kind: str
    kubeconfig: Path
    kubectl: Kubectl | ImpersonatingKubectl
    cluster: node.Cluster | None = None

    @property
    def pause_image(self) -> str:
        """A do-nothing container image for the Deployments the agent works on."""
        if self.cluster:
            return node.PAUSE_IMAGE
        return os.environ.get("E2E_PAUSE_IMAGE", "registry.k8s.io/pause:3.9")


def kind_kubeconfig() -> Path:
    path = ROOT / ".work" / "kind" / "kubeconfig"
    path.parent.mkdir(parents=True, exist_ok=True)
    have = subprocess.run(["kind", "get", "clusters"], capture_output=True, text=True, check=True)
    if KIND_CLUSTER not in have.stdout.split():
        subprocess.run(
            ["kind", "create", "cluster", "--name", KIND_CLUSTER, "--wait=120s"], check=True
        )
    config = subprocess.run(
        ["kind", "get", "kubeconfig", "--name", KIND_CLUSTER],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path.write_text(config)
    path.chmod(0o600)
    return path
