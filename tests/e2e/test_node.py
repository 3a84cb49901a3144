"""The e2e test ground itself: the single-node cluster of `make cluster-up` runs real pods.

Covers: the node registers and is Ready; a Deployment gets a Running pod (Guaranteed QoS,
so kubelet asks for a negative oom_score_adj this host cannot grant, and containerd clamps
it); a pod reaches the API server through the `kubernetes` Service and authenticates with
its mounted service-account token; a ClusterIP Service routes from a pod and from the
host, and a NodePort answers on the node address; `kubectl logs` works (API server to
kubelet). Images come without a registry: static binaries wrapped by ``static_image`` and
loaded with ``Cluster.load_image``.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

import pytest

from agentrun_harness import node
from agentrun_harness.controlplane import k8s_release

from support import Kubectl, wait_for

pytestmark = pytest.mark.skipif(
    os.environ.get("E2E_CLUSTER", "local") != "local",
    reason="checks this machine's own node (E2E_CLUSTER=local)",
)
KUBECTL_IMAGE = "agentrun.local/kubectl:e2e"
# The node's release (K8S_VERSION, as `make e2e` passes NODE_K8S_VERSION), e.g. "v1.20.2".
VERSION = f"v{k8s_release()}"
# `kubectl proxy` as a tiny HTTP server: it answers /version for anyone.
PROXY_ARGS = ["proxy", "--address=0.0.0.0", "--port=8001", "--accept-hosts=.*"]
NON_ROOT = {"runAsUser": 65534, "runAsNonRoot": True, "allowPrivilegeEscalation": False}


@pytest.fixture(scope="module")
def kubectl_image(node_cluster: node.Cluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    """kubectl (a static binary) as an image: a client and a tiny HTTP server in pods."""
    tarball = node.static_image(
        tmp_path_factory.mktemp("images") / "kubectl.tar",
        name=KUBECTL_IMAGE,
        files={"/kubectl": node_cluster.bin_dir / "kubectl"},
        entrypoint=["/kubectl"],
    )
    assert node_cluster.load_image(tarball) == [KUBECTL_IMAGE]
    return KUBECTL_IMAGE


def apply(kubectl: Kubectl, namespace: str, *docs: dict[str, Any]) -> None:
    body = {"apiVersion": "v1", "kind": "List", "items": list(docs)}
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))


def get(kubectl: Kubectl, namespace: str, *what: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(kubectl("get", "-n", namespace, *what, "-o", "json").stdout)
    return out


def run_to_completion(
    kubectl: Kubectl,
    namespace: str,
    name: str,
    *,
    image: str,
    args: list[str],
    sa: str,
    config_map: str | None = None,
) -> str:
    """A pod that runs once; returns its log after it succeeded (fails with it otherwise).
    ``config_map`` is mounted at /config."""
    container: dict[str, Any] = {
        "name": "main",
        "image": image,
        "args": args,
        "securityContext": NON_ROOT,
    }
    spec: dict[str, Any] = {
        "serviceAccountName": sa,
        "restartPolicy": "Never",
        "containers": [container],
    }
    if config_map:
        spec["volumes"] = [{"name": "config", "configMap": {"name": config_map}}]
        container["volumeMounts"] = [{"name": "config", "mountPath": "/config"}]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
    apply(kubectl, namespace, pod)

    def finished() -> str | None:
        phase = get(kubectl, namespace, "pod", name).get("status", {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_for(f"pod {name} to finish", finished, timeout=60, interval=0.5)
    logs = kubectl("logs", "-n", namespace, name).stdout
    assert phase == "Succeeded", logs
    return logs


def requested(logs: str, url: str) -> bool:
    """kubectl -v=6 logged a GET of ``url`` answered 200 (1.20's plain and 1.34's structured
    log lines alike)."""
    return any("GET" in line and url in line and "200 OK" in line for line in logs.splitlines())


def http_get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return str(r.read().decode())
    except (urllib.error.URLError, OSError):
        return None


def test_the_node_is_ready(kubectl: Kubectl) -> None:
    nodes = json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert [n["metadata"]["name"] for n in nodes] == [node.NODE_NAME]
    status = nodes[0]["status"]
    ready = {c["type"]: c["status"] for c in status["conditions"]}
    assert ready["Ready"] == "True"
    assert {"type": "InternalIP", "address": node.NODE_IP} in status["addresses"]
    assert status["nodeInfo"]["kubeletVersion"] == VERSION
    assert status["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://1.6")
    assert not nodes[0]["spec"].get("taints")


def test_a_deployment_gets_a_running_pod(kubectl: Kubectl, namespace: str) -> None:
    # requests == limits: Guaranteed QoS, for which kubelet asks oom_score_adj -997.
    resources = {"cpu": "10m", "memory": "16Mi"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "sleeper"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "sleeper"}},
            "template": {
                "metadata": {"labels": {"app": "sleeper"}},
                "spec": {
                    "containers": [
                        {
                            "name": "pause",
                            "image": node.PAUSE_IMAGE,
                            "resources": {"requests": resources, "limits": resources},
                            "securityContext": NON_ROOT,
                        }
                    ]
                },
            },
        },
    }
    apply(kubectl, namespace, deployment)
    kubectl("rollout", "status", "-n", namespace, "deployment/sleeper", "--timeout=60s")
    pods = get(kubectl, namespace, "pods", "-l", "app=sleeper")["items"]
    assert len(pods) == 1
    status = pods[0]["status"]
    assert status["phase"] == "Running"
    assert status["qosClass"] == "Guaranteed"
    assert status["podIP"].startswith("10.244.0.")
    assert status["containerStatuses"][0]["ready"] is True


def test_a_pod_reaches_the_api_server_through_the_kubernetes_service(
    kubectl: Kubectl, namespace: str, kubectl_image: str
) -> None:
    kubectl("create", "serviceaccount", "reader", "-n", namespace)
    kubectl("create", "role", "reader", "-n", namespace, "--verb=get", "--resource=pods")
    kubectl(
        "create",
        "rolebinding",
        "reader",
        "-n",
        namespace,
        "--role=reader",
        f"--serviceaccount={namespace}:reader",
    )
    # In-cluster config: KUBERNETES_SERVICE_HOST (the Service) and the mounted token + CA.
    # Reading a pod needs the token's identity: anonymous requests are forbidden.
    logs = run_to_completion(
        kubectl,
        namespace,
        "whoami",
        image=kubectl_image,
        args=["get", "pod", "whoami", "-o", "jsonpath={.spec.serviceAccountName}", "-v=6"],
        sa="reader",
    )
    kubernetes = get(kubectl, "default", "service", "kubernetes")["spec"]["clusterIP"]
    assert "Using in-cluster configuration" in logs
    assert requested(logs, f"https://{kubernetes}:443/api/v1/namespaces/{namespace}/pods/whoami")
    assert logs.rstrip().endswith("reader")


def test_pods_resolve_service_names_through_the_cluster_dns(
    kubectl: Kubectl, namespace: str, kubectl_image: str
) -> None:
    # The API server by its Service's name: the pod's resolv.conf names the cluster DNS
    # (CoreDNS) and the namespace's search path, as on any cluster.
    sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": "https://kubernetes.default.svc",
                    "certificate-authority": f"{sa_dir}/ca.crt",
                },
            }
        ],
        "users": [{"name": "u", "user": {"tokenFile": f"{sa_dir}/token"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "kubeconfig"},
        "data": {"kubeconfig": json.dumps(config)},
    }
    apply(kubectl, namespace, configmap)
    logs = run_to_completion(
        kubectl,
        namespace,
        "resolver",
        image=kubectl_image,
        args=["--kubeconfig=/config/kubeconfig", "get", "--raw=/version", "-v=6"],
        sa="default",
        config_map="kubeconfig",
    )
    assert requested(logs, "https://kubernetes.default.svc/version"), logs
    assert f'"gitVersion": "{VERSION}"' in logs, logs


def test_a_cluster_ip_service_routes(kubectl: Kubectl, namespace: str, kubectl_image: str) -> None:
    server = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "containers": [
                        {
                            "name": "web",
                            "image": kubectl_image,
                            "args": PROXY_ARGS,
                            "ports": [{"containerPort": 8001}],
                            "readinessProbe": {
                                "httpGet": {"path": "/version", "port": 8001},
                                "periodSeconds": 1,
                            },
                            "securityContext": NON_ROOT,
                        }
                    ]
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {
            "type": "NodePort",
            "selector": {"app": "web"},
            "ports": [{"port": 80, "targetPort": 8001}],
        },
    }
    apply(kubectl, namespace, server, service)
    kubectl("rollout", "status", "-n", namespace, "deployment/web", "--timeout=60s")
    spec = get(kubectl, namespace, "service", "web")["spec"]
    cluster_ip, node_port = spec["clusterIP"], spec["ports"][0]["nodePort"]

    from_host = wait_for(
        "the ClusterIP to answer from the host",
        lambda: http_get(f"http://{cluster_ip}/version"),
        timeout=30,
        interval=0.5,
    )
    assert f'"gitVersion": "{VERSION}"' in str(from_host)
    from_node_port = wait_for(
        "the NodePort to answer on the node address",
        lambda: http_get(f"http://{node.NODE_IP}:{node_port}/version"),
        timeout=30,
        interval=0.5,
    )
    assert f'"gitVersion": "{VERSION}"' in str(from_node_port)
    from_pod = run_to_completion(
        kubectl,
        namespace,
        "client",
        image=kubectl_image,
        args=[f"--server=http://{cluster_ip}", "get", "--raw", "/version"],
        sa="default",
    )
    assert f'"gitVersion": "{VERSION}"' in from_pod
