"""The whole product on the real node: the image built from the Dockerfile, the chart
installed with helm, and a user's story through real pods and Services.

Covers: ``helm install --wait`` with the chart's defaults brings up two operator replicas
(the controller, one acting, each with its SSE sidecar), two workers, two webhook replicas
and Redis, in a namespace that enforces Pod Security ``restricted``; an applied AgentRun
streams over SSE through the Service and through Debian's NGINX configured as
``docs/nginx.conf`` shows; an approver approves with ``kubectl patch`` and the run
continues; the worker pod running it deleted mid-run, another worker resumes the run from
its checkpoint and finishes it, its side-effecting tool executed exactly
once (counted by the Deployment's revision, on the cluster side); a viewer that follows the
stream while the run moves sees no gap and no duplicate (one whose SSE pod is replaced, in
``helm upgrade``, follows by Last-Event-ID), and a
reconnect from the middle replays exactly the rest; ``spec.stop`` stops a run; a finished
run with ``ttlSecondsAfterFinished`` is deleted with its Redis data; a run acts through the
npm-distributed ``kubernetes-mcp-server`` (a pod whose own account has no rights and which
requires a bearer token) with its own service account's token: it lists pods where it may,
is refused by the API server where it may not, and its destructive call waits for approval;
``helm upgrade`` keeps a run going; with ``tracing.enabled`` the pods send each run as one
trace to a Jaeger on the host; without workers (``workers.enabled=false``, one process for
both roles) the operator pod running a run deleted mid-run hands it to the standby replica;
``helm upgrade`` of controllers and workers during 50 runs loses and repeats nothing;
``helm uninstall`` leaves no orphans.

The mock LLM runs in the cluster too (the same image, ``agentrun mock-llm``); tests put
their script through its Service. Every address is a Service name resolved by the cluster
DNS, as on any cluster. Figures (install → Ready, apply → first SSE event, pod deleted →
run resumed, image size) are printed with ``[figure]``; ``bench/bench_e2e.py`` repeats them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync
import yaml

from agentrun_harness import node
from agentrun_harness.controlplane import free_port
from agentrun_harness.jaeger import Jaeger
from agentrun_operator import events
from agentrun_operator import sseclient as sse_client

from e2e_support import KIND_CLUSTER, ImpersonatingKubectl, Target
from sse_support import nginx
from support import (
    Kubectl,
    assert_clean_stream,
    decoded,
    get_run,
    newest_only,
    wait_for,
    wait_phase,
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "agentrun"
IMAGE = "localhost/agentrun:dev"
REDIS_IMAGE = "agentrun.local/redis:debian"
RELEASE = "agentrun"
MOCK_PORT = 8000
# Pod Security "restricted", as the release's namespace enforces it.
RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
# The npm-distributed Kubernetes MCP server, in a pod of its own namespace (see kubernetes_mcp).
KMS_PACKAGE = ROOT / "tests" / "e2e" / "kubernetes-mcp-server"
KMS_BINARY = (
    KMS_PACKAGE / "node_modules" / "kubernetes-mcp-server-linux-amd64" / "bin"
    / "kubernetes-mcp-server-linux-amd64"
)  # fmt: skip
KMS_NAMESPACE = "agentrun-e2e-mcp"
KMS_URL = f"http://kubernetes-mcp-server.{KMS_NAMESPACE}.svc:8080/mcp"
ROLES = {"approver": "agentrun-approver", "viewer": "agentrun-viewer", "creator": "agentrun-editor"}


def figure(name: str, value: str) -> None:
    print(f"[figure] {name}: {value}")


# -- images and the release ----------------------------------------------------------------


@dataclass
class Images:
    agentrun: str
    pull_policy: str
    redis: str | None  # None: the chart's default (redis:7.2, pulled by the nodes)


@pytest.fixture(scope="module")
def images(target: Target, tmp_path_factory: pytest.TempPathFactory) -> Images:
    """The product image built from the Dockerfile, where the cluster's nodes find it.

    local: scripts/build-image.sh (buildah, no registry) and a Redis image of this host's
    redis-server, both imported into the node's containerd; kind: ``docker build`` and
    ``kind load``; existing: ``E2E_IMAGE``, an image the cluster's nodes can pull (and
    ``E2E_REDIS_IMAGE`` instead of the chart's redis:7.2, if they cannot pull that)."""
    started = time.monotonic()
    if target.kind == "existing":
        image = os.environ.get("E2E_IMAGE", "")
        if not image:
            pytest.fail("E2E_CLUSTER=existing needs E2E_IMAGE (an image its nodes can pull)")
        return Images(image, "IfNotPresent", os.environ.get("E2E_REDIS_IMAGE") or None)
    if target.kind == "kind":
        image = "agentrun:e2e"
        subprocess.run(["make", "-s", "wheelhouse"], cwd=ROOT, check=True, timeout=1200)
        subprocess.run(["docker", "build", "-t", image, str(ROOT)], check=True, timeout=1200)
        subprocess.run(
            ["kind", "load", "docker-image", image, "--name", KIND_CLUSTER], check=True, timeout=600
        )
        figure("image build and load", f"{time.monotonic() - started:.1f}s")
        return Images(image, "Never", None)
    assert target.cluster is not None
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-image.sh"), IMAGE],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        timeout=1200,
    ).stdout.split()[-1]
    tarball = ROOT / out
    figure("image build (warm caches)", f"{time.monotonic() - started:.1f}s")
    figure("image size (docker-archive)", f"{tarball.stat().st_size / 2**20:.0f} MiB")
    assert target.cluster.load_image(tarball) == [IMAGE]
    redis_tar = node.host_binary_image(
        tmp_path_factory.mktemp("images") / "redis.tar",
        name=REDIS_IMAGE,
        binaries={"redis-server": Path("/usr/bin/redis-server")},
    )
    assert target.cluster.load_image(redis_tar) == [REDIS_IMAGE]
    return Images(IMAGE, "Never", REDIS_IMAGE)


@dataclass
class Helm:
    binary: str
    kubeconfig: Path

    def __call__(self, *args: str, timeout: float = 600) -> str:
        proc = subprocess.run(
            [self.binary, f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}")
        return proc.stdout


@pytest.fixture(scope="module")
def helm(target: Target) -> Helm:
    binary = subprocess.run(
        ["bash", str(ROOT / "scripts" / "get-helm.sh")],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout.split()[-1]
    return Helm(binary, target.kubeconfig)


def apply(kubectl: Kubectl, namespace: str, *docs: dict[str, Any]) -> None:
    body = {"apiVersion": "v1", "kind": "List", "items": list(docs)}
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))


def deployment(
    name: str, *, image: str, pull: str, args: list[str], port: int | None = None
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": pull,
        "args": args,
        "securityContext": RESTRICTED,
    }
    if port:
        container["ports"] = [{"containerPort": port}]
        container["readinessProbe"] = {
            "httpGet": {"path": "/healthz", "port": port},
            "periodSeconds": 1,
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"enableServiceLinks": False, "containers": [container]},
            },
        },
    }


def service(name: str, port: int, target: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"port": port, "targetPort": target}]},
    }


def cluster_ip(kubectl: Kubectl, namespace: str, name: str) -> str:
    svc = json.loads(kubectl("get", "service", name, "-n", namespace, "-o", "json").stdout)
    return str(svc["spec"]["clusterIP"])


class Forward:
    """A Service's port on 127.0.0.1 through ``kubectl port-forward``, for clusters whose
    Service addresses this host cannot reach (kind, remote ones). Restarted when it drops,
    e.g. when the pod behind it is replaced, on the same local port."""

    def __init__(self, kubectl: ImpersonatingKubectl, namespace: str, svc: str, port: int):
        self.port = free_port()
        self._args = [
            kubectl.binary,
            f"--kubeconfig={kubectl.kubeconfig}",
            "port-forward",
            "-n",
            namespace,
            f"svc/{svc}",
            f"{self.port}:{port}",
        ]
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, daemon=True)
        self._thread.start()
        wait_for(f"port-forward to {svc}", self._listening, timeout=60)

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def _keep(self) -> None:
        while not self._stop.is_set():
            self._proc = subprocess.Popen(
                self._args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self._proc.wait()
            self._stop.wait(0.5)

    def close(self) -> None:
        self._stop.set()
        if self._proc:
            self._proc.terminate()
        self._thread.join(timeout=10)


@dataclass
class Release:
    namespace: str  # where the chart and the mock LLM run
    runs: str  # where the tests' AgentRuns run
    sse: str  # the SSE Service's base URL, from this host
    mock: str  # the mock LLM's base URL, from this host
    redis: redis_sync.Redis  # the chart's Redis, from this host
    values: list[str]
    tokens: dict[str, str]  # bearer tokens of the test users, for the SSE server

    def script(self, rules: list[dict[str, Any]]) -> None:
        req = urllib.request.Request(
            f"{self.mock}/_script", data=json.dumps(rules).encode(), method="PUT"
        )
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200


def running_pod(kubectl: Kubectl, rel: Release, run: str) -> str | None:
    """The pod that executes ``run`` now (``status.worker``: a worker, or the operator replica
    that acts when there are none), once it is ready."""
    holder = (get_run(kubectl, rel.runs, run).get("status") or {}).get("worker")
    if not holder:
        return None
    out = kubectl("get", "pod", holder, "-n", rel.namespace, "-o", "json", check=False)
    if out.returncode != 0:
        return None
    pod = json.loads(out.stdout)
    statuses = pod["status"].get("containerStatuses") or []
    ready = statuses and all(c.get("ready") for c in statuses)
    return holder if ready and not pod["metadata"].get("deletionTimestamp") else None


@pytest.fixture(scope="module")
def release(target: Target, kubectl: Kubectl, helm: Helm, images: Images) -> Iterator[Release]:
    namespace, runs = "agentrun-e2e", "agentrun-e2e-runs"
    remove_release(kubectl, helm, namespace, runs)
    kubectl("create", "namespace", namespace)
    kubectl("create", "namespace", runs)
    # The chart's pods must be admitted under Pod Security "restricted" (1.23+; older API
    # servers ignore the label).
    kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    mock_args = ["agentrun", "mock-llm", "--host=0.0.0.0", f"--port={MOCK_PORT}"]
    apply(
        kubectl,
        namespace,
        deployment(
            "mock-llm",
            image=images.agentrun,
            pull=images.pull_policy,
            args=mock_args,
            port=MOCK_PORT,
        ),
        service("mock-llm", MOCK_PORT, MOCK_PORT),
    )
    if target.cluster is not None:
        # The chart keeps Redis on a PersistentVolumeClaim; this node has no provisioner, so
        # the test provides the volume (kind and real clusters provision their own).
        redis_volume(kubectl, target.cluster.workdir / "volumes" / "redis")
    repository, _, tag = images.agentrun.rpartition(":")
    values = [
        f"image.repository={repository}",
        f"image.tag={tag}",
        f"image.pullPolicy={images.pull_policy}",
        *([f"redis.image={images.redis}"] if images.redis else []),
        f"model.baseURL=http://mock-llm.{namespace}.svc:{MOCK_PORT}/v1",
        "model.name=mock",
        f"operator.namespaces={{{runs}}}",
        "sse.heartbeatSeconds=2",
        f"mcp.urlAllow={{{KMS_URL}}}",
    ]
    started = time.monotonic()
    try:
        helm(
            "install",
            RELEASE,
            str(CHART),
            "-n",
            namespace,
            "--wait",
            "--timeout=5m",
            *[a for v in values for a in ("--set", v)],
        )
    except AssertionError:
        print(kubectl("get", "pods,events", "-n", namespace, check=False).stdout)
        remove_release(kubectl, helm, namespace, runs)
        raise
    figure(
        "helm install --wait -> operator, SSE, webhooks, Redis Ready",
        f"{time.monotonic() - started:.1f}s",
    )
    kubectl("rollout", "status", "-n", namespace, "deployment/mock-llm", "--timeout=60s")
    # Ready pods are not yet reachable ones: kube-proxy programs a new Service's endpoints
    # a moment later. A server-side dry run goes through the admission webhooks.
    probe = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "AgentRun",
        "metadata": {"name": "probe", "namespace": runs},
        "spec": {"goal": "probe"},
    }

    def webhooks_answer() -> bool:
        out = kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(probe), check=False)
        return out.returncode == 0

    wait_for("the admission webhooks to answer", webhooks_answer, timeout=60, interval=0.5)
    figure(
        "helm install -> webhooks answering through their Service",
        f"{time.monotonic() - started:.1f}s",
    )
    # The test users' rights in the runs' namespace, through the chart's ClusterRoles. Off
    # the local node (no static tokens there), a service account stands in for each person
    # in calls to the SSE server, with the same rights.
    tokens = {}
    for user, role in ROLES.items():
        subjects = [f"--user={user}"]
        if target.kind == "local":
            tokens[user] = f"agentrun-{user}-token"
        else:
            kubectl("create", "serviceaccount", f"e2e-{user}", "-n", runs)
            subjects.append(f"--serviceaccount={runs}:e2e-{user}")
            tokens[user] = kubectl(
                "create", "token", f"e2e-{user}", "-n", runs, "--duration=2h"
            ).stdout.strip()
        kubectl("create", "rolebinding", user, "-n", runs, f"--clusterrole={role}", *subjects)
        if user == "creator":
            # Runs act as the "agent" account below: naming it takes this role.
            kubectl(
                "create", "rolebinding", "creator-sa-user", "-n", runs,
                "--clusterrole=agentrun-sa-user", *subjects,
            )  # fmt: skip
    # The agent's identity: may restart and read the Deployment it works on.
    kubectl("create", "serviceaccount", "agent", "-n", runs)
    kubectl(
        "create",
        "role",
        "agent",
        "-n",
        runs,
        "--verb=get,list,watch,patch",
        "--resource=deployments,pods,events",
    )
    kubectl(
        "create",
        "rolebinding",
        "agent",
        "-n",
        runs,
        "--role=agent",
        f"--serviceaccount={runs}:agent",
    )
    forwards: list[Forward] = []

    def address(svc: str, port: int) -> str:
        """host:port of a Service from this host: its ClusterIP on the local node (a real
        Service path), else a port-forward."""
        if target.kind == "local":
            return f"{cluster_ip(kubectl, namespace, svc)}:{port}"
        assert isinstance(kubectl, ImpersonatingKubectl)
        forwards.append(Forward(kubectl, namespace, svc, port))
        return f"127.0.0.1:{forwards[-1].port}"

    redis_host, _, redis_port = address(f"{RELEASE}-redis", 6379).partition(":")
    # The chart's Redis lets nobody in without a password (the operator's user here).
    anonymous = redis_sync.Redis(host=redis_host, port=int(redis_port))
    with pytest.raises(redis_sync.AuthenticationError):
        anonymous.ping()
    anonymous.close()
    password = secret_value(kubectl, namespace, f"{RELEASE}-redis-auth", "operator-password")
    redis_client = redis_sync.Redis(
        host=redis_host, port=int(redis_port), username="agentrun-operator", password=password
    )
    rel = Release(
        namespace=namespace,
        runs=runs,
        sse=f"http://{address(f'{RELEASE}-sse', 80)}",
        mock=f"http://{address('mock-llm', MOCK_PORT)}",
        redis=redis_client,
        values=values,
        tokens=tokens,
    )
    try:
        yield rel
    finally:
        redis_client.close()
        for forward in forwards:
            forward.close()
        remove_release(kubectl, helm, namespace, runs)


def secret_value(kubectl: Kubectl, namespace: str, name: str, key: str) -> str:
    out = kubectl("get", "secret", name, "-n", namespace, "-o", f"jsonpath={{.data.{key}}}")
    return base64.b64decode(out.stdout).decode()


REDIS_PV = "agentrun-e2e-redis"


def redis_volume(kubectl: Kubectl, path: Path) -> None:
    """A fresh hostPath PersistentVolume for the chart's Redis claim (no storage class, so
    the claim, which names none, binds to it)."""
    kubectl("delete", "pv", REDIS_PV, "--ignore-not-found", "--wait=true", check=False)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.chown(path, 10001, 10001)  # the chart's pods run as 10001 (hostPath has no fsGroup)
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": REDIS_PV},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": str(path), "type": "Directory"},
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(pv))


def remove_release(kubectl: Kubectl, helm: Helm, namespace: str, runs: str) -> None:
    """Runs first (their finalizers need the operator), then the release and its
    namespaces, and whatever a crashed session left of the release cluster-wide."""
    kubectl("delete", "agentruns", "--all", "-n", runs, "--timeout=60s", check=False)
    subprocess.run(
        [
            helm.binary,
            f"--kubeconfig={helm.kubeconfig}",
            "uninstall",
            RELEASE,
            "-n",
            namespace,
            "--ignore-not-found",
            "--wait",
            "--timeout=2m",
        ],
        capture_output=True,
        timeout=300,
    )
    kubectl(
        "delete",
        "clusterroles,clusterrolebindings,mutatingwebhookconfigurations,"
        "validatingwebhookconfigurations",
        "-l",
        f"app.kubernetes.io/instance={RELEASE}",
        check=False,
    )
    kubectl(
        "delete",
        "namespace",
        runs,
        namespace,
        "--ignore-not-found",
        "--timeout=120s",
        check=False,
        timeout=180,
    )


# -- runs ------------------------------------------------------------------------------------


def create_run(kubectl: Kubectl, rel: Release, name: str, goal: str, **spec: Any) -> str:
    doc = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "AgentRun",
        "metadata": {"name": name},
        "spec": {"goal": goal, **spec},
    }
    kubectl.as_user("creator")("create", "-n", rel.runs, "-f", "-", input=json.dumps(doc))
    return str(get_run(kubectl, rel.runs, name)["metadata"]["uid"])


@dataclass
class Seen:
    events: list[dict[str, Any]]
    first_at: float | None = None


async def read_stream(
    url: str, token: str, *, last_id: str | None = None, seen: Seen | None = None
) -> Seen:
    """Every event of a run through ``url`` (the Service or NGINX) as ``user``, following it
    across dropped connections and a replaced pod by Last-Event-ID, until ``end``."""
    seen = seen or Seen([])
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=60)) as http:
        async for msg in sse_client.follow(
            http, url, headers=headers, last_id=last_id, max_reconnects=30, retry_delay=0.5
        ):
            if msg.event == "heartbeat":
                continue
            if seen.first_at is None:
                seen.first_at = time.monotonic()
            seen.events.append({**msg.json(), "id": msg.id, "event": msg.event})
    return seen


def events_url(base: str, rel: Release, name: str) -> str:
    return f"{base}/api/v1/runs/{rel.runs}/{name}/events"


def revision(kubectl: Kubectl, namespace: str, name: str) -> int:
    dep = json.loads(kubectl("get", "deployment", name, "-n", namespace, "-o", "json").stdout)
    return int(dep["metadata"]["annotations"]["deployment.kubernetes.io/revision"])


# -- the story -------------------------------------------------------------------------------


def test_an_applied_run_streams_through_the_service_and_through_nginx(
    kubectl: Kubectl, release: Release
) -> None:
    # The mock's built-in script: a plan, a k8s_list of pods, a summary.
    release.script([])
    url = events_url(release.sse, release, "hello")

    async def story() -> tuple[Seen, Seen, float]:
        start = time.monotonic()
        create_run(
            kubectl, release, "hello", "What runs in this namespace?", serviceAccountName="agent"
        )
        upstream = release.sse.removeprefix("http://")
        with nginx(upstream=upstream) as proxy:
            direct, proxied = await asyncio.gather(
                read_stream(url, release.tokens["viewer"]),
                read_stream(events_url(proxy, release, "hello"), release.tokens["viewer"]),
            )
        return direct, proxied, start

    direct, proxied, start = asyncio.run(asyncio.wait_for(story(), 120))
    assert direct.first_at is not None
    figure(
        "kubectl create -> first SSE event through the Service", f"{direct.first_at - start:.2f}s"
    )
    assert_clean_stream(direct.events)
    assert [e["seq"] for e in proxied.events] == [e["seq"] for e in direct.events]
    assert [e["id"] for e in proxied.events] == [e["id"] for e in direct.events]
    tools = [e["data"] for e in direct.events if e["type"] == "tool"]
    assert [(t["name"], t["status"]) for t in tools] == [
        ("k8s_list", "started"),
        ("k8s_list", "succeeded"),
    ]
    assert direct.events[-1]["data"]["phase"] == "Succeeded"
    status = wait_phase(kubectl, release.runs, "hello", "Succeeded", timeout=30)
    assert status["createdBy"] == "creator"
    assert status["usage"]["llmCalls"] >= 2


def test_an_approved_call_runs_once_across_the_pod_running_it_being_deleted(
    target: Target, kubectl: Kubectl, release: Release
) -> None:
    kubectl("create", "deployment", "web", f"--image={target.pause_image}", "-n", release.runs)
    kubectl("rollout", "status", "deployment/web", "-n", release.runs, "--timeout=60s", timeout=90)
    assert revision(kubectl, release.runs, "web") == 1
    words = " ".join(f"w{i}" for i in range(60))
    release.script(
        [
            {
                "match": "restart web",
                "replies": [
                    {"text": f"Plan: restart web. {words}", "tokens_per_second": 15},
                    {
                        "tool_calls": [
                            {
                                "name": "k8s_rollout_restart",
                                "arguments": {"kind": "Deployment", "name": "web"},
                            }
                        ]
                    },
                    {"text": "web restarted."},
                ],
            }
        ]
    )
    url = events_url(release.sse, release, "restart")
    uid = create_run(
        kubectl,
        release,
        "restart",
        "Please restart web",
        serviceAccountName="agent",
        tools=["k8s_get", "k8s_rollout_restart"],
    )
    key = events.events_key(uid)

    def stream() -> list[dict[str, Any]]:
        return decoded(release.redis.xrange(key))

    def tokens() -> int:
        return sum(1 for e in stream() if e["type"] == "token")

    async def story() -> tuple[Seen, float]:
        reader = asyncio.create_task(read_stream(url, release.tokens["viewer"]))
        await asyncio.to_thread(wait_for, "the first tokens", tokens, timeout=60, interval=0.05)
        old = running_pod(kubectl, release, "restart")
        assert old is not None, "no ready pod runs the run"
        # With the chart's defaults a worker; another worker takes the run over.
        assert old.startswith(f"{RELEASE}-worker-"), old
        deleted = time.monotonic()
        kubectl("delete", "pod", old, "-n", release.namespace, "--wait=false")

        def resumed() -> bool:
            return any(
                e["type"] == "workflow" and e["data"]["state"] == "resumed" for e in stream()
            )

        await asyncio.to_thread(wait_for, "the run to resume", resumed, timeout=120, interval=0.1)
        resumed_after = time.monotonic() - deleted
        status = await asyncio.to_thread(
            wait_phase, kubectl, release.runs, "restart", "AwaitingApproval", timeout=120
        )
        (approval,) = status["pendingApprovals"]
        kubectl.as_user("approver")(
            "patch",
            "ta",
            approval,
            "-n",
            release.runs,
            "--type=merge",
            "-p",
            '{"spec":{"decision":"Approved","comment":"go"}}',
        )
        return await asyncio.wait_for(reader, 120), resumed_after

    seen, resumed_after = asyncio.run(asyncio.wait_for(story(), 300))
    figure("worker pod deleted -> run resumed on another worker", f"{resumed_after:.1f}s")
    status = wait_phase(kubectl, release.runs, "restart", "Succeeded", timeout=30)
    # Exactly once, counted by the cluster: one restart is one new revision.
    assert revision(kubectl, release.runs, "web") == 2
    # The viewer followed the stream while the run moved: no gap, no duplicate.
    assert_clean_stream(seen.events)
    states = [e["data"]["state"] for e in seen.events if e["type"] == "workflow"]
    assert "resumed" in states
    approvals = [e["data"] for e in seen.events if e["type"] == "approval"]
    assert [a["state"] for a in approvals] == ["pending", "approved"]
    assert approvals[1]["decidedBy"] == "approver"
    restarts = [
        e["data"]
        for e in seen.events
        if e["type"] == "tool" and e["data"]["name"] == "k8s_rollout_restart"
    ]
    assert [t["status"] for t in restarts] == ["started", "succeeded"]
    assert status["usage"]["toolCalls"] == 1

    # A reconnect from the middle replays exactly the rest.
    middle = len(seen.events) // 2
    rest = asyncio.run(
        asyncio.wait_for(
            read_stream(url, release.tokens["viewer"], last_id=seen.events[middle]["id"]), 60
        )
    )
    assert [e["id"] for e in rest.events] == [e["id"] for e in seen.events[middle + 1 :]]


def test_stop_ends_a_run_and_a_finished_run_is_deleted_after_its_ttl(
    kubectl: Kubectl, release: Release
) -> None:
    words = " ".join(f"w{i}" for i in range(2000))
    release.script([{"match": "talk", "replies": [{"text": words, "tokens_per_second": 20}]}])
    uid = create_run(kubectl, release, "talker", "talk for long", ttlSecondsAfterFinished=3)
    key = events.events_key(uid)
    wait_for("the run to stream", lambda: release.redis.xlen(key) > 3, timeout=60)
    kubectl.as_user("creator")(
        "patch",
        "agentrun",
        "talker",
        "-n",
        release.runs,
        "--type=merge",
        "-p",
        '{"spec":{"stop":true}}',
    )
    status = wait_phase(kubectl, release.runs, "talker", "Stopped", timeout=30)
    assert status["stoppedBy"] == "creator"
    [last] = decoded(release.redis.xrevrange(key, count=1))
    assert last["type"] == "end" and last["data"]["phase"] == "Stopped"

    def gone() -> bool:
        out = kubectl("get", "agentrun", "talker", "-n", release.runs, check=False)
        return out.returncode != 0 and "NotFound" in out.stderr

    wait_for("the TTL to delete the run", gone, timeout=60, interval=0.5)
    wait_for("its Redis data to go", lambda: not release.redis.exists(key), timeout=30)


# -- MCP: the npm-distributed kubernetes-mcp-server, acting with the run's own token -------


@pytest.fixture(scope="module")
def kubernetes_mcp(
    target: Target, kubectl: Kubectl, release: Release, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """kubernetes-mcp-server in a pod of its own namespace, as a platform team would run it:
    its service account has no rights at all, and it refuses requests without a bearer token
    and acts with the caller's (``require_oauth``, the token passed through to the API
    server, which is the sole judge of it). Yields its URL (on the chart's ``mcp.urlAllow``)."""
    version = json.loads((KMS_PACKAGE / "package.json").read_text())["dependencies"]
    image = f"agentrun.local/kubernetes-mcp-server:{next(iter(version.values()))}"
    if target.kind == "existing":
        image = os.environ.get("E2E_KUBERNETES_MCP_IMAGE", "")
        if not image:
            pytest.skip("E2E_CLUSTER=existing: set E2E_KUBERNETES_MCP_IMAGE to run the MCP test")
    else:
        if not KMS_BINARY.is_file():
            pytest.fail(f"{KMS_BINARY} is missing: run `make e2e` (it runs npm ci for it)")
        tarball = node.static_image(
            tmp_path_factory.mktemp("kms") / "kubernetes-mcp-server.tar",
            name=image,
            files={"/kubernetes-mcp-server": KMS_BINARY},
            entrypoint=["/kubernetes-mcp-server"],
        )
        if target.cluster is not None:
            assert target.cluster.load_image(tarball) == [image]
        else:
            subprocess.run(
                ["kind", "load", "image-archive", str(tarball), "--name", KIND_CLUSTER],
                check=True,
                timeout=600,
            )
    kubectl("delete", "namespace", KMS_NAMESPACE, "--ignore-not-found", "--timeout=120s")
    kubectl("create", "namespace", KMS_NAMESPACE)
    kubectl("label", "namespace", KMS_NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
    config = "\n".join(
        [
            'port = "8080"',
            "require_oauth = true",
            "skip_jwt_verification = true",  # the API server judges the token
            'toolsets = ["core"]',
        ]
    )
    server = deployment(
        "kubernetes-mcp-server",
        image=image,
        pull="IfNotPresent" if target.kind == "existing" else "Never",
        args=["--config=/etc/kubernetes-mcp-server/config.toml"],
        port=8080,
    )
    pod = server["spec"]["template"]["spec"]
    pod["serviceAccountName"] = "kubernetes-mcp-server"
    pod["volumes"] = [{"name": "config", "configMap": {"name": "kubernetes-mcp-server"}}]
    (container,) = pod["containers"]
    container["securityContext"] = {**RESTRICTED, "runAsUser": 65534}
    container["volumeMounts"] = [{"name": "config", "mountPath": "/etc/kubernetes-mcp-server"}]
    apply(
        kubectl,
        KMS_NAMESPACE,
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "kubernetes-mcp-server"},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "kubernetes-mcp-server"},
            "data": {"config.toml": config},
        },
        server,
        service("kubernetes-mcp-server", 8080, 8080),
    )
    kubectl(
        "rollout", "status", "-n", KMS_NAMESPACE, "deployment/kubernetes-mcp-server",
        "--timeout=120s", timeout=150,
    )  # fmt: skip
    try:
        yield KMS_URL
    finally:
        kubectl("delete", "namespace", KMS_NAMESPACE, "--ignore-not-found", "--wait=false")


@newest_only("the MCP story (MCP on 1.20 is in the integration tests)")
def test_a_run_acts_through_kubernetes_mcp_server_with_its_own_rights(
    target: Target, kubectl: Kubectl, release: Release, kubernetes_mcp: str
) -> None:
    runs = release.runs
    server_account = f"system:serviceaccount:{KMS_NAMESPACE}:kubernetes-mcp-server"
    # The server's own identity may do nothing; whatever it does, it does with a run's token.
    for verb in ("list", "delete"):
        can = kubectl("auth", "can-i", verb, "pods", "-n", runs, f"--as={server_account}",
                      check=False)  # fmt: skip
        assert can.stdout.strip() == "no", f"the server's own account may {verb} pods"
    if target.kind == "local":
        # And it refuses a request without a bearer token.
        host = cluster_ip(kubectl, KMS_NAMESPACE, "kubernetes-mcp-server")
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        seen: list[str] = []

        def refused() -> bool:
            # kube-proxy programs a new Service's endpoints a moment after Ready: until then
            # the address refuses connections or (seen once) reaches nothing of ours.
            try:
                bare = httpx.post(f"http://{host}:8080/mcp", json=ping, timeout=5)
            except httpx.ConnectError as e:
                seen.append(repr(e))
                return False
            seen.append(f"{bare.status_code} {bare.text[:200]}")
            return bare.status_code == 401 and "Bearer token required" in bare.text

        try:
            wait_for("a request without a token to be refused", refused, timeout=30)
        except AssertionError as e:
            raise AssertionError(f"{e}; the last answers: {seen[-3:]}") from None
    # The run's identity: may list and delete pods in its namespace, nothing elsewhere.
    kubectl("create", "serviceaccount", "mcp-agent", "-n", runs)
    kubectl("create", "role", "mcp-agent", "-n", runs, "--verb=get,list,delete",
            "--resource=pods")  # fmt: skip
    kubectl("create", "rolebinding", "mcp-agent", "-n", runs, "--role=mcp-agent",
            f"--serviceaccount={runs}:mcp-agent")  # fmt: skip
    kubectl("run", "victim", f"--image={target.pause_image}", "--restart=Never", "-n", runs)
    # The MCPServer, written by an MCP admin (agentrun-editor cannot): "nobody" becomes one.
    kubectl("create", "rolebinding", "mcp-admin", "-n", runs, "--clusterrole=agentrun-mcp-admin",
            "--user=nobody")  # fmt: skip
    doc = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": "kube"},
        "spec": {
            "url": kubernetes_mcp,
            "auth": "serviceAccountToken",
            "tools": ["pods_list_in_namespace", "pods_delete"],
        },
    }
    by_editor = kubectl.as_user("creator")("create", "-n", runs, "-f", "-",
                                           input=json.dumps(doc), check=False)  # fmt: skip
    assert by_editor.returncode != 0 and "forbidden" in by_editor.stderr.lower(), by_editor.stderr
    kubectl.as_user("nobody")("create", "-n", runs, "-f", "-", input=json.dumps(doc))

    def ready() -> dict[str, Any] | None:
        out = kubectl("get", "mcpserver", "kube", "-n", runs, "-o", "json")
        st = json.loads(out.stdout).get("status") or {}
        conds = {c["type"]: c["status"] for c in st.get("conditions") or []}
        return st if conds.get("Ready") == "True" else None

    st = wait_for("MCPServer kube to be Ready", ready, timeout=60, interval=0.5)
    assert isinstance(st, dict)
    listed = {t["name"]: t for t in st["tools"]}
    assert set(listed) == {"pods_list_in_namespace", "pods_delete"}, st
    assert listed["pods_list_in_namespace"]["annotations"]["readOnlyHint"] is True

    def call(tool: str, **arguments: Any) -> dict[str, Any]:
        return {"tool_calls": [{"name": f"kube__{tool}", "arguments": arguments}]}

    release.script(
        [
            {
                "match": "through mcp",
                "replies": [
                    {"text": "Plan: look at the pods, then remove victim."},
                    call("pods_list_in_namespace", namespace=runs),
                    call("pods_list_in_namespace", namespace=release.namespace),
                    call("pods_delete", namespace=runs, name="victim"),
                    {"text": "victim removed."},
                ],
            }
        ]
    )
    uid = create_run(
        kubectl, release, "via-mcp", "clean up through mcp",
        serviceAccountName="mcp-agent", tools=["mcp:kube/*"],
    )  # fmt: skip
    status = wait_phase(kubectl, runs, "via-mcp", "AwaitingApproval", timeout=120)
    pinned = {(t["function"], t.get("readOnly", False)) for t in status["effective"]["mcpTools"]}
    assert pinned == {("kube__pods_list_in_namespace", True), ("kube__pods_delete", False)}
    (approval,) = status["pendingApprovals"]
    ta = json.loads(kubectl("get", "ta", approval, "-n", runs, "-o", "json").stdout)
    assert ta["spec"]["server"] == "kube" and ta["spec"]["tool"] == "kube__pods_delete", ta
    # Nothing has been deleted while the person is asked.
    assert kubectl("get", "pod", "victim", "-n", runs, check=False).returncode == 0
    kubectl.as_user("approver")(
        "patch", "ta", approval, "-n", runs, "--type=merge",
        "-p", '{"spec":{"decision":"Approved"}}',
    )  # fmt: skip
    status = wait_phase(kubectl, runs, "via-mcp", "Succeeded", "Failed", timeout=120)
    assert status["phase"] == "Succeeded", status

    def victim_deleted() -> bool:
        out = kubectl("get", "pod", "victim", "-n", runs, "-o", "json", check=False)
        if out.returncode != 0:
            return "NotFound" in out.stderr
        return bool(json.loads(out.stdout)["metadata"].get("deletionTimestamp"))

    wait_for("the approved delete to reach the pod", victim_deleted, timeout=30)
    tools = [e["data"] for e in decoded(release.redis.xrange(events.events_key(uid)))
             if e["type"] == "tool" and e["data"]["status"] != "started"]  # fmt: skip
    assert [(t["name"], t["server"], t["status"]) for t in tools] == [
        ("kube__pods_list_in_namespace", "kube", "succeeded"),
        ("kube__pods_list_in_namespace", "kube", "failed"),
        ("kube__pods_delete", "kube", "succeeded"),
    ], tools
    # Listed with the run's rights: its namespace, where victim was...
    assert "victim" in json.dumps(tools[0]["result"]), tools[0]
    # ...and refused where the run's account is refused, by the API server itself.
    refusal = json.dumps(tools[1]["result"])
    assert "forbidden" in refusal and f"system:serviceaccount:{runs}:mcp-agent" in refusal, refusal


def test_helm_upgrade_keeps_a_run_going(kubectl: Kubectl, release: Release, helm: Helm) -> None:
    words = " ".join(f"w{i}" for i in range(80))
    release.script(
        [
            {
                "match": "upgrade",
                "replies": [
                    {"text": f"Thinking {words}", "tokens_per_second": 20},
                    {"text": "All good."},
                ],
            }
        ]
    )
    url = events_url(release.sse, release, "during-upgrade")

    async def story() -> Seen:
        create_run(kubectl, release, "during-upgrade", "survive an upgrade")
        reader = asyncio.create_task(read_stream(url, release.tokens["viewer"]))
        # Changed values replace the operator's pods (strategy Recreate: the SSE sidecar the
        # reader follows goes too) and roll the workers: another worker resumes the run from
        # its checkpoint.
        await asyncio.to_thread(
            helm,
            "upgrade",
            RELEASE,
            str(CHART),
            "-n",
            release.namespace,
            "--wait",
            "--timeout=5m",
            *[
                a
                for v in [*release.values, "sse.heartbeatSeconds=3", "operator.streamMaxlen=99999"]
                for a in ("--set", v)
            ],
        )
        return await asyncio.wait_for(reader, 180)

    seen = asyncio.run(asyncio.wait_for(story(), 400))
    assert_clean_stream(seen.events)
    assert seen.events[-1]["data"]["phase"] == "Succeeded"
    history = json.loads(helm("history", RELEASE, "-n", release.namespace, "-o", "json"))
    assert [h["revision"] for h in history] == [1, 2]


@newest_only("a version-independent scenario")
def test_with_tracing_on_the_operator_pod_sends_each_run_as_one_trace(
    target: Target,
    kubectl: Kubectl,
    release: Release,
    helm: Helm,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    if target.kind != "local":
        pytest.skip("needs a Jaeger on an address the cluster's pods reach (the local node's)")
    # Jaeger on this host, on the node's address (the pods reach it as they reach the DNS).
    with Jaeger(workdir=tmp_path_factory.mktemp("jaeger"), host=node.NODE_IP) as jaeger:
        helm(
            "upgrade", RELEASE, str(CHART), "-n", release.namespace, "--reuse-values",
            "--wait", "--timeout=5m",
            "--set", "tracing.enabled=true",
            "--set", f"tracing.endpoint={jaeger.otlp_url}",
            "--set", "tracing.urlTemplate=https://jaeger.example.com/trace/{traceId}",
        )  # fmt: skip
        release.script(
            [{"match": "traced on the node", "replies": [{"text": "plan"}, {"text": "done"}]}]
        )
        create_run(kubectl, release, "traced", "traced on the node")
        st = wait_phase(kubectl, release.runs, "traced", "Succeeded", "Failed", timeout=90)
        assert st["phase"] == "Succeeded" and st.get("traceId"), st
        root = f"run {release.runs}/traced"

        def arrived() -> list[dict[str, Any]] | None:
            spans = jaeger.trace(st["traceId"])
            return spans if any(s["name"] == root for s in spans) else None

        spans = wait_for("the run's trace in Jaeger", arrived, timeout=60)
        assert isinstance(spans, list)
        names = {s["name"] for s in spans}
        assert {root, "workflow plan", "workflow act", "workflow verify", "chat mock"} <= names
        (top,) = [s for s in spans if s["parent"] is None]
        assert top["name"] == root and top["tags"]["agentrun.run.created_by"] == "creator"

        # The web UI's link, from the SSE sidecar's template (through the Service, whose
        # endpoints follow the upgraded pods: a refused connection is tried again).
        def answered() -> dict[str, Any] | None:
            try:
                found: dict[str, Any] = httpx.get(
                    f"{release.sse}/api/v1/runs/{release.runs}/traced",
                    headers={"Authorization": f"Bearer {release.tokens['viewer']}"},
                    timeout=10,
                ).json()["summary"]
            except httpx.TransportError:
                return None
            return found

        summary = wait_for("the SSE server's summary of the run", answered, timeout=60)
        assert isinstance(summary, dict)
        assert summary["traceURL"] == f"https://jaeger.example.com/trace/{st['traceId']}"


@newest_only("a version-independent scenario")
@pytest.mark.timeout(600)  # two upgrades (5 min at worst each) and the run's own waits
def test_without_workers_the_operator_pod_deleted_mid_run_hands_the_run_to_the_standby(
    kubectl: Kubectl, release: Release, helm: Helm
) -> None:
    # One process for both roles, as on a small cluster: the operator replica holding the
    # controller Lease runs the runs too.
    helm(
        "upgrade", RELEASE, str(CHART), "-n", release.namespace, "--reuse-values",
        "--wait", "--timeout=5m", "--set", "workers.enabled=false",
    )  # fmt: skip
    left = kubectl("get", "deployment", f"{RELEASE}-worker", "-n", release.namespace, check=False)
    assert left.returncode != 0 and "NotFound" in left.stderr, left.stdout
    try:
        words = " ".join(f"w{i}" for i in range(300))
        release.script(
            [
                {
                    "match": "handed over",
                    "replies": [{"text": f"Plan {words}", "tokens_per_second": 20}, {"text": "ok"}],
                }
            ]
        )
        uid = create_run(kubectl, release, "handover", "to be handed over")
        first = wait_for(
            "an operator pod to run the run",
            lambda: running_pod(kubectl, release, "handover"),
            timeout=90,
        )
        assert isinstance(first, str) and first.startswith(f"{RELEASE}-operator-"), first
        wait_for(
            "tokens to stream",
            lambda: any(
                e["type"] == "token" for e in decoded(release.redis.xrange(events.events_key(uid)))
            ),
            timeout=60,
        )
        kubectl("delete", "pod", first, "-n", release.namespace, "--wait=false")
        deleted = time.monotonic()

        def moved_to() -> str | None:
            now = (get_run(kubectl, release.runs, "handover").get("status") or {}).get("worker")
            return now if now not in (None, first) else None

        moved = wait_for("the standby replica to run it", moved_to, timeout=90)
        figure(
            "operator pod deleted (no workers) -> run resumed on the standby",
            f"{time.monotonic() - deleted:.1f}s",
        )
        assert isinstance(moved, str) and moved.startswith(f"{RELEASE}-operator-"), moved
        st = wait_phase(kubectl, release.runs, "handover", "Succeeded", "Failed", timeout=120)
        assert st["phase"] == "Succeeded", st
        assert_clean_stream(decoded(release.redis.xrange(events.events_key(uid))))
    finally:
        # Back to the chart's defaults for the scenarios that follow, whatever happened.
        helm(
            "upgrade", RELEASE, str(CHART), "-n", release.namespace, "--reuse-values",
            "--wait", "--timeout=5m", "--set", "workers.enabled=true",
        )  # fmt: skip


@newest_only("a version-independent scenario")
def test_with_workers_helm_upgrade_during_50_runs_loses_and_repeats_nothing(
    kubectl: Kubectl, release: Release, helm: Helm
) -> None:
    words = " ".join(f"w{i}" for i in range(200))
    release.script(
        [
            {
                "match": "fifty at once",
                "replies": [{"text": f"Plan {words}", "tokens_per_second": 20}, {"text": "ok"}],
            }
        ]
    )
    names = [f"many-{i}" for i in range(50)]
    uids = {n: create_run(kubectl, release, n, "fifty at once") for n in names}
    wait_for(
        "the runs to stream",
        lambda: sum(1 for u in uids.values() if release.redis.xlen(events.events_key(u))) >= 40,
        timeout=120,
    )
    # A value of every process that executes runs: the controllers and the workers all roll.
    started = time.monotonic()
    helm(
        "upgrade", RELEASE, str(CHART), "-n", release.namespace, "--reuse-values",
        "--wait", "--timeout=5m", "--set", "workers.enabled=true",
        "--set", "operator.streamMaxlen=100001",
    )  # fmt: skip
    figure(
        "helm upgrade (controllers and workers) during 50 runs",
        f"{time.monotonic() - started:.1f}s",
    )
    for n in names:
        st = wait_phase(kubectl, release.runs, n, "Succeeded", "Failed", timeout=300)
        assert st["phase"] == "Succeeded", (n, st)
        assert_clean_stream(decoded(release.redis.xrange(events.events_key(uids[n]))))
    figure(
        "50 runs across an upgrade: all Succeeded, streams gap-free",
        f"{time.monotonic() - started:.1f}s",
    )


@pytest.mark.timeout(720)  # its own waits add up to 660 s at worst
def test_helm_uninstall_leaves_no_orphans(kubectl: Kubectl, release: Release, helm: Helm) -> None:
    # A run still waiting for a person when the release goes: the chart's pre-delete hook
    # deletes it while the operator can still clean it up.
    started = time.monotonic()

    def step(what: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {what}")

    # A call the agent's account may make (its dry run passes), so a person is asked.
    kubectl(
        "create", "deployment", "left", "--image=registry.invalid/none", "--replicas=0",
        "-n", release.runs,
    )  # fmt: skip
    label = {"kind": "Deployment", "name": "left", "patch": {"metadata": {"labels": {"a": "b"}}}}
    release.script(
        [
            {
                "match": "left behind",
                "replies": [
                    {"text": "Plan: label left."},
                    {"tool_calls": [{"name": "k8s_patch", "arguments": label}]},
                    {"text": "done"},
                ],
            }
        ]
    )
    create_run(
        kubectl,
        release,
        "left-behind",
        "left behind",
        serviceAccountName="agent",
        tools=["k8s_patch"],
    )
    wait_phase(kubectl, release.runs, "left-behind", "AwaitingApproval", timeout=60)
    step("run awaiting approval")
    manifest = helm("get", "manifest", RELEASE, "-n", release.namespace)
    objects = [
        (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace", release.namespace))
        for d in yaml.safe_load_all(manifest)
        if d
    ]
    kinds = {kind for kind, _, _ in objects}
    assert {"Deployment", "StatefulSet", "ClusterRole", "ValidatingWebhookConfiguration"} <= kinds
    hooks = [
        d for d in yaml.safe_load_all(helm("get", "hooks", RELEASE, "-n", release.namespace)) if d
    ]
    assert [(h["kind"], h["metadata"]["annotations"]["helm.sh/hook"]) for h in hooks] == [
        ("Job", "pre-delete")
    ]
    objects += [(h["kind"], h["metadata"]["name"], release.namespace) for h in hooks]
    helm("uninstall", RELEASE, "-n", release.namespace, "--wait", "--timeout=5m")
    step("helm uninstall --wait returned")

    def leftovers() -> list[str]:
        left = []
        for kind, name, namespace in objects:
            out = kubectl("get", kind, name, "-n", namespace, "-o", "name", check=False)
            if out.returncode == 0 or "NotFound" not in out.stderr:
                left.append(f"{kind}/{name}")
        pods = kubectl(
            "get",
            "pods",
            "-n",
            release.namespace,
            "-l",
            f"app.kubernetes.io/instance={RELEASE}",
            "-o",
            "name",
        )
        return left + pods.stdout.split()

    wait_for("nothing of the release to remain", lambda: not leftovers(), timeout=120, interval=1)
    step("nothing of the release remains")
    # The runs and their ToolApprovals went first; CRDs stay (Helm never deletes crds/).
    left = kubectl("get", "agentruns,toolapprovals", "-n", release.runs, "-o", "name")
    assert left.stdout.split() == []
    assert kubectl("get", "crd", "agentruns.agentrun.dev", check=False).returncode == 0
    # Nothing of ours holds the runs' namespace: its deletion completes. (The namespace
    # controller's own pace varies with the node's load: what this asserts is that no
    # agentrun object or finalizer is what it waits for.)
    kubectl("delete", "namespace", release.runs, "--wait=false")

    def holders() -> list[str] | None:
        """What the namespace still waits for (its True conditions), None once it is gone."""
        out = kubectl("get", "namespace", release.runs, "-o", "json", check=False)
        if out.returncode != 0 and "NotFound" in out.stderr:
            return None
        conditions = json.loads(out.stdout or "{}").get("status", {}).get("conditions", [])
        return [f"{c['type']}: {c.get('message', '')}" for c in conditions if c["status"] == "True"]

    def gone() -> bool:
        held = holders()
        # Our resources and finalizer (the namespace's own name holds "agentrun" too).
        assert not any("agentrun.dev" in h for h in held or []), f"agentrun holds it: {held}"
        return held is None

    try:
        wait_for("the runs' namespace to go", gone, timeout=180, interval=1)
    except AssertionError:
        print(kubectl("get", "all,events", "-n", release.runs, check=False).stdout)
        print(f"the runs' namespace waits for: {holders()}")
        raise
    step("the runs' namespace is gone")
