"""Shared fixtures: a real control plane (etcd + kube-apiserver + kube-controller-manager),
a real Redis server, kubectl as each test user, and a fresh namespace per test.

The control plane binaries are built once by `make controlplane` and cached outside the
repository; the fixture runs that build if the cache is empty, so a fresh clone works.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis as redis_sync
from mcp_support import MCPServers, mcp_servers
from redis import asyncio as aioredis

from agentrun_harness import sse as sse_harness
from agentrun_harness.controlplane import (
    ControlPlane,
    default_bin_dir,
    free_port,
    k8s_release,
)
from agentrun_harness.operatorproc import OperatorProcess, WebhookProcess
from agentrun_harness.redisserver import RedisServer
from agentrun_operator import events
from agentrun_operator import webhooks as webhook_configs
from agentrun_operator.mockllm import MockLLMThread

from sse_support import sse_settings
from support import Kubectl, Script, fresh_namespace

ROOT = Path(__file__).resolve().parent.parent


def _ensure_binaries() -> Path:
    """The control plane of K8S_VERSION (1.34 by default, 1.20 for make test-oldest)."""
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
        env={**os.environ, "K8S_VERSION": k8s_release()},
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
    with RedisServer(workdir=tmp_path_factory.mktemp("redis")) as server:
        yield server


# Markers by location: integration (control plane, Redis), e2e (a real node), faults.
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "e2e" in parts:
            item.add_marker(pytest.mark.e2e)
        if "faults" in parts:
            item.add_marker(pytest.mark.faults)


# -- the product's own processes ------------------------------------------------------------

WEBHOOK_LABEL = "agentrun-test/webhooks"


@pytest.fixture(scope="session")
def rbac(kubectl: Kubectl) -> None:
    """agentrun's ClusterRoles, bound to the product's own test identities."""
    kubectl("apply", "-f", str(ROOT / "manifests" / "rbac.yaml"))
    for user in ("agentrun-operator", "agentrun-webhooks"):
        kubectl("create", "clusterrolebinding", user, f"--clusterrole={user}", f"--user={user}")
    # As the chart does: the operator reads its notification routes, and nothing else there.
    kubectl("create", "namespace", "agentrun-system", check=False)
    kubectl(
        "create",
        "role",
        "agentrun-notifications",
        "-n",
        "agentrun-system",
        "--verb=get",
        "--resource=configmaps",
        "--resource-name=agentrun-notifications",
    )
    kubectl(
        "create",
        "rolebinding",
        "agentrun-notifications",
        "-n",
        "agentrun-system",
        "--role=agentrun-notifications",
        "--user=agentrun-operator",
    )


@pytest.fixture(scope="session")
def mcp(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MCPServers]:
    """Real MCP servers the operator may use: the SDK's (in this process, over real
    sockets) and the reference server-everything (npm)."""
    with mcp_servers(
        api=cluster.server,
        ca_file=str(cluster.ca_file),
        admin_token=cluster.token("admin"),
        workdir=tmp_path_factory.mktemp("mcp"),
    ) as servers:
        yield servers


@pytest.fixture(scope="session")
def webhooks(
    cluster: ControlPlane,
    rbac: None,
    kubectl: Kubectl,
    script: Script,
    dead_endpoint: str,
    mcp: MCPServers,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WebhookProcess]:
    """The admission webhook server, registered for namespaces labelled for it only, so
    tests of bare CRDs elsewhere are not judged by it."""
    import base64
    import json

    proc = WebhookProcess(
        plane=cluster,
        workdir=tmp_path_factory.mktemp("webhooks"),
        env={
            "AGENTRUN_MODEL_BASE_URL_ALLOW": f"{script.llm.base_url},{dead_endpoint}",
            "AGENTRUN_MCP_URL_ALLOW": f"{mcp.allow},{dead_endpoint}",
        },
    )
    proc.start()
    ca = base64.b64encode(cluster.ca_file.read_bytes()).decode()
    configs = webhook_configs.configurations(
        client_config={"url": proc.url},
        ca_bundle=ca,
        name="agentrun-test",
        namespace_selector={"matchLabels": {WEBHOOK_LABEL: "on"}},
    )
    kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": configs})
    )
    try:
        yield proc
    finally:
        kubectl(
            "delete",
            "mutatingwebhookconfiguration,validatingwebhookconfiguration",
            "agentrun-test",
            check=False,
        )
        proc.stop()


@pytest.fixture(scope="session")
def script() -> Iterator[Script]:
    llm = MockLLMThread(tokens_per_second=0)
    llm.start()
    try:
        yield Script(llm)
    finally:
        llm.stop()


@pytest.fixture(scope="session")
def dead_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


@pytest.fixture(scope="session")
def operator(
    cluster: ControlPlane,
    rbac: None,
    webhooks: WebhookProcess,
    redis_server: RedisServer,
    script: Script,
    dead_endpoint: str,
    mcp: MCPServers,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    """The operator as a real process with its least-privilege identity, watching "op-*"."""
    proc = OperatorProcess(
        plane=cluster,
        redis_url=redis_server.url,
        model_base_url=script.llm.base_url,
        workdir=tmp_path_factory.mktemp("operator"),
        user="agentrun-operator",
        env={
            "AGENTRUN_MODEL_BASE_URL_ALLOW": f"{script.llm.base_url},{dead_endpoint}",
            "AGENTRUN_MCP_URL_ALLOW": f"{mcp.allow},{dead_endpoint}",
            "AGENTRUN_MCP_REFRESH_SECONDS": "30",
            "AGENTRUN_LLM_MAX_RETRIES": "0",
            # Only its own namespaces: other tests create AgentRuns it must not run.
            "AGENTRUN_NAMESPACES": "op-*",
            "AGENTRUN_NOTIFY_CONFIGMAP": "agentrun-system/agentrun-notifications",
            "AGENTRUN_NOTIFY_REFRESH_SECONDS": "0.5",
            "AGENTRUN_UI_URL": "https://agentrun.example.com",
        },
    )
    with proc:
        yield proc


@pytest.fixture
def operator_log_on_failure(
    request: pytest.FixtureRequest, operator: OperatorProcess
) -> Iterator[None]:
    """Print the operator's log tail when the test using it fails."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"--- operator log ---\n{operator.log_tail(80)}")


@pytest.fixture
def op_namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace the test operator watches and the webhooks judge."""
    for name in fresh_namespace(kubectl, request, "op-"):
        kubectl("label", "namespace", name, f"{WEBHOOK_LABEL}=on")
        yield name


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis_sync.Redis]:
    client = redis_sync.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def agent_sa(kubectl: Kubectl, namespace: str) -> str:
    """A service account that may read pods and deployments and scale deployments."""
    kubectl("create", "serviceaccount", "agent", "-n", namespace)
    kubectl(
        "create",
        "role",
        "agent",
        "-n",
        namespace,
        "--verb=get,list,watch,patch",
        "--resource=pods,deployments,deployments/scale,events",
    )
    kubectl(
        "create",
        "rolebinding",
        "agent",
        "-n",
        namespace,
        "--role=agent",
        f"--serviceaccount={namespace}:agent",
    )
    return "agent"


# -- the SSE server's tests ---------------------------------------------------------------


@pytest.fixture(scope="module")
async def server(
    cluster: ControlPlane, redis_server: RedisServer
) -> AsyncIterator[sse_harness.LiveServer]:
    """The SSE server in-process on a real socket, against the test control plane."""
    async with sse_harness.LiveServer(sse_settings(cluster, redis_server.url)) as s:
        yield s


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """An async client of the test Redis, as the operator and SSE server connect."""
    r = events.connect(redis_server.url)
    yield r
    await r.aclose()
