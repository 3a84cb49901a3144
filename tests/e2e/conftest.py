"""The e2e cluster (``E2E_CLUSTER``): ``local`` (the default) is a real single-node
Kubernetes on this machine, brought up once per session by ``scripts/cluster-up.sh``
(idempotent: a cluster already up from ``make cluster-up`` is reused and left running; one
this session started is removed at the end unless ``AGENTRUN_KEEP_CLUSTER=1``); ``kind`` is a
kind cluster (``KIND_CLUSTER``, created when missing), for users' CI with Docker;
``existing`` is the cluster of ``KUBECONFIG``. See :class:`Target`.

Overrides ``kubectl`` so the shared ``namespace`` fixture makes its namespaces on this
cluster, never on the integration control plane. When a test on the local node fails, the
tails of kubelet, containerd, kube-proxy, kube-scheduler and kube-apiserver logs and the pods
of all namespaces are printed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentrun_harness import node

from e2e_support import (
    E2E_CLUSTER,
    ClusterKubectl,
    ImpersonatingKubectl,
    Target,
    kind_kubeconfig,
)
from support import Kubectl

ROOT = Path(__file__).resolve().parents[2]
# Cold: the Kubernetes build (about 9 minutes) when nothing is cached; warm: seconds.
CLUSTER_UP_TIMEOUT = float(os.environ.get("AGENTRUN_CLUSTER_UP_TIMEOUT", "1800"))
DUMPED_LOGS = ("kubelet", "containerd", "kube-proxy", "kube-scheduler", "kube-apiserver")


def dump_cluster(cluster: node.Cluster, *, lines: int = 40) -> str:
    """What a failed e2e test prints: component logs and where every pod is."""
    out = []
    for name in DUMPED_LOGS:
        out.append(f"--- {name} (last {lines} lines) ---\n{cluster.log_tail(name, lines)}")
    if cluster.kubeconfig.exists():
        kubectl = [
            str(cluster.kubectl),
            f"--kubeconfig={cluster.kubeconfig}",
            f"--cache-dir={cluster.kubectl_cache}",
        ]
        pods = subprocess.run(
            [*kubectl, "get", "pods", "--all-namespaces", "--output=wide"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        out.append(f"--- pods ---\n{pods.stdout}{pods.stderr}")
    return "\n".join(out)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The first e2e test also pays for cluster-up (on a fresh machine, the Kubernetes build
    too): pytest-timeout counts fixture setup, so give that test the time on top."""
    e2e = [item for item in items if "e2e" in Path(str(item.fspath)).parts]
    if e2e:
        e2e[0].add_marker(pytest.mark.timeout(CLUSTER_UP_TIMEOUT + 300))


@pytest.fixture(scope="session")
def node_cluster() -> Iterator[node.Cluster]:
    """The real node on this machine (E2E_CLUSTER=local)."""
    if E2E_CLUSTER != "local":
        pytest.skip(f"E2E_CLUSTER={E2E_CLUSTER}: these tests check this machine's own node")
    cluster = node.Cluster(workdir=ROOT / ".work" / "cluster")
    was_running = cluster.running()
    started = time.monotonic()
    try:
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "cluster-up.sh")],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=CLUSTER_UP_TIMEOUT,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(dump_cluster(cluster))
        if not was_running:
            cluster.down()
        pytest.fail(f"cluster-up failed: {e}")
    print(f"cluster up in {time.monotonic() - started:.1f}s (reused: {was_running})")
    cluster.attach()
    try:
        yield cluster
    finally:
        if not was_running and os.environ.get("AGENTRUN_KEEP_CLUSTER") != "1":
            cluster.down()


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest) -> Target:
    if E2E_CLUSTER == "local":
        cluster: node.Cluster = request.getfixturevalue("node_cluster")
        return Target(
            "local",
            cluster.kubeconfig,
            ClusterKubectl(cluster.plane, cache_dir=cluster.kubectl_cache),
            cluster,
        )
    kubeconfig = (
        kind_kubeconfig() if E2E_CLUSTER == "kind" else Path(os.environ.get("KUBECONFIG", ""))
    )
    if not kubeconfig.is_file():
        pytest.fail(f"E2E_CLUSTER={E2E_CLUSTER}: KUBECONFIG={kubeconfig} is not a file")
    binary = shutil.which("kubectl")
    if not binary:
        pytest.fail(f"E2E_CLUSTER={E2E_CLUSTER} needs kubectl on PATH")
    return Target(E2E_CLUSTER, kubeconfig, ImpersonatingKubectl(binary, kubeconfig))


@pytest.fixture(scope="session")
def kubectl(target: Target) -> Kubectl | ImpersonatingKubectl:
    """kubectl as the e2e cluster's admin (other users: ``kubectl.as_user(...)``)."""
    return target.kubectl


@pytest.fixture(autouse=True)
def _dump_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    uses_node = {"node_cluster", "target"} & set(request.fixturenames)
    cluster = (
        request.getfixturevalue("node_cluster") if uses_node and E2E_CLUSTER == "local" else None
    )
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and cluster is not None:
        print(dump_cluster(cluster))
