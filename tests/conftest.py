"""Shared fixtures: a real control plane (etcd + kube-apiserver + kube-controller-manager),
a real Redis server, kubectl as each test user, and a fresh namespace per test.

The control plane binaries are built once by `make controlplane` and cached outside the
repository; the fixture runs that build if the cache is empty, so a fresh clone works.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentrun_operator.testing.controlplane import ControlPlane, default_bin_dir
from agentrun_operator.testing.redisserver import RedisServer

from support import Kubectl, fresh_namespace

ROOT = Path(__file__).resolve().parent.parent


def _ensure_binaries() -> Path:
    bin_dir = default_bin_dir()
    if all(
        (bin_dir / b).exists() for b in ("kube-apiserver", "kube-controller-manager", "kubectl")
    ):
        return bin_dir
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-controlplane.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(
        workdir=tmp_path_factory.mktemp("controlplane"), bin_dir=_ensure_binaries()
    )
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def cluster(controlplane: ControlPlane) -> ControlPlane:
    """The control plane with agentrun's CRDs installed and established."""
    kubectl = Kubectl(controlplane)
    kubectl("apply", "-f", str(ROOT / "crds"))
    kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/agentruns.agentrun.dev",
        "crd/toolapprovals.agentrun.dev",
    )
    return controlplane


@pytest.fixture(scope="session")
def kubectl(cluster: ControlPlane) -> Kubectl:
    return Kubectl(cluster)


@pytest.fixture
def namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, outside every operator's watch ("t-" prefix)."""
    yield from fresh_namespace(kubectl, request, "t-")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)  # type: ignore[attr-defined]
    return rep


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(workdir=tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# Tests that reach the control plane or Redis are integration tests, by location.
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "e2e" in parts:
            item.add_marker(pytest.mark.e2e)
    os.environ.setdefault("AGENTRUN_TEST_ROOT", str(ROOT))
