"""The Helm chart with real tools: helm v4 lints and renders it, values.schema.json refuses
bad values naming the field, the chart's copies (CRDs, ClusterRoles, webhook rules) match
their sources, and the rendered manifests are accepted by the real kube-apiserver
(server-side dry run)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentrun_harness.controlplane import ControlPlane
from agentrun_operator import metrics, webhooks

from support import Kubectl

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "agentrun"

Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def helm() -> Helm:
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "get-helm.sh")], check=True, capture_output=True, text=True
    )
    binary = out.stdout.strip().splitlines()[-1]

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}")
        return proc

    return run


def render(helm: Helm, *sets: str, kube_version: str | None = None) -> list[dict[str, Any]]:
    args = ["template", "t", str(CHART), "--namespace", "agentrun-system"]
    if kube_version:
        args += ["--kube-version", kube_version]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def dry_run(
    kubectl: Kubectl, namespace: str, docs: list[dict[str, Any]]
) -> subprocess.CompletedProcess[str]:
    """A server-side dry-run apply of ``docs``: admission and validation, nothing stored."""
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    return kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=body, check=False)


def test_helm_lint_passes(helm: Helm) -> None:
    out = helm("lint", str(CHART), "--strict").stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("operator.maxConcurrentRuns=0", "/operator/maxConcurrentRuns"),
        ("imag.tag=x", "'imag' not allowed"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("model.baseURL=localhost:8000", "/model/baseURL"),
        ("webhooks.replicas=0", "/webhooks/replicas"),
        ("operator.replicas=0", "/operator/replicas"),
        ("operator.leaderLeaseSeconds=1", "/operator/leaderLeaseSeconds"),
        ("operator.extraEnv.PATH=x", "'PATH' does not match pattern '^AGENTRUN_"),
        ("redis.externalURL=mysql://x", "/redis/externalURL"),
        ("gateway.requestTimeout=forever", "/gateway/requestTimeout"),
        ("tracing.endpoint=jaeger:4317", "/tracing/endpoint"),
        ("tracing.urlTemplate=https://jaeger/trace/", "/tracing/urlTemplate"),
        ("tracing.enabled=true", "tracing.enabled needs tracing.endpoint"),
        ("redis.cluster=true", "redis.cluster is for an external Redis Cluster"),
    ],
)
def test_bad_values_fail_at_install_naming_the_field(helm: Helm, value: str, named: str) -> None:
    proc = helm("template", "t", str(CHART), "--set", value, check=False)
    assert proc.returncode != 0 and named in proc.stderr, proc.stderr


def test_external_redis_is_required_without_the_bundled_one(helm: Helm) -> None:
    proc = helm("template", "t", str(CHART), "--set", "redis.enabled=false", check=False)
    assert proc.returncode != 0 and "redis.externalURL" in proc.stderr
    docs = render(helm, "redis.enabled=false", "redis.externalURL=redis://r:6379/0")
    assert not [d for d in docs if d["kind"] == "StatefulSet"]


def test_the_chart_clusterroles_are_the_manifests(helm: Helm) -> None:
    assert (CHART / "files" / "clusterroles.yaml").read_text() == (
        ROOT / "manifests" / "rbac.yaml"
    ).read_text(), "copy manifests/rbac.yaml to charts/agentrun/files/clusterroles.yaml"


def test_pods_get_no_service_links_and_every_port_names_its_protocol(helm: Helm) -> None:
    # Service links would inject AGENTRUN_SSE_PORT=tcp://... (the release's agentrun-sse
    # Service) into the pods, which the settings reject; server-side apply (helm v4) on
    # Kubernetes 1.20 refuses a port list entry without its key field `protocol`.
    docs = render(helm, "serviceMonitor.enabled=false")
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert len(workloads) == 4  # operator, workers, webhooks, Redis
    for w in workloads:
        pod = w["spec"]["template"]["spec"]
        assert pod["enableServiceLinks"] is False, w["metadata"]["name"]
        for c in pod["containers"]:
            assert all(p["protocol"] == "TCP" for p in c.get("ports", [])), c["name"]
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert all(p["protocol"] == "TCP" for p in svc["spec"]["ports"]), svc["metadata"]["name"]


def test_the_chart_clusterroles_carry_the_release_labels(helm: Helm) -> None:
    roles = [d for d in render(helm) if d["kind"] == "ClusterRole"]
    assert len(roles) == 9  # eight of manifests/rbac.yaml and agentrun-agent-view
    for role in roles:
        assert role["metadata"]["labels"]["app.kubernetes.io/instance"] == "t", role


def test_rendered_webhooks_match_the_webhook_servers_own_configuration(helm: Helm) -> None:
    docs = render(helm)
    expected = webhooks.configurations(client_config={"url": "https://x"}, ca_bundle="")

    def essence(cfg: dict[str, Any]) -> list[tuple[str, str, str, str]]:
        return [
            (
                h["name"],
                json.dumps(h["rules"], sort_keys=True),
                h["failurePolicy"],
                h["clientConfig"].get("service", {}).get("path") or h["clientConfig"]["url"][9:],
            )
            for h in cfg["webhooks"]
        ]

    for kind, want in zip(
        ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"), expected, strict=True
    ):
        got = next(d for d in docs if d["kind"] == kind)
        assert essence(got) == essence(want)
        assert all(h["clientConfig"]["caBundle"] for h in got["webhooks"])


def test_only_the_operator_container_gets_a_token(helm: Helm) -> None:
    deploy = next(
        d
        for d in render(helm)
        if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
    )
    pod = deploy["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    mounts = {c["name"]: {m["name"] for m in c["volumeMounts"]} for c in pod["containers"]}
    assert "token" in mounts["operator"] and "token" not in mounts["sse"]
    # Nothing writable is shared between the internet-facing sidecar and the operator.
    assert not (mounts["operator"] & mounts["sse"]), mounts
    for c in pod["containers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_bundled_redis_takes_no_anonymous_clients_and_keeps_its_data(helm: Helm) -> None:
    docs = render(helm)
    redis = next(d for d in docs if d["kind"] == "StatefulSet")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("default") - 1 : args.index("default") + 2] == [
        "--user",
        "default",
        "off",
    ]
    sse = args[args.index("agentrun-sse") :]
    assert "%R~agentrun:*" in sse and "-@all" in sse and "+xadd" not in sse
    assert ">$(SSE_PASSWORD)" in sse, "the kubelet puts the password in; no manifest shows it"
    secret = next(
        d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-redis-auth")
    )
    assert set(secret["data"]) == {"operator-password", "sse-password"}
    operator = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
    )
    env = {
        c["name"]: {e["name"]: e for e in c["env"]}
        for c in operator["spec"]["template"]["spec"]["containers"]
    }
    assert env["operator"]["AGENTRUN_REDIS_URL"]["value"].startswith(
        "redis://agentrun-operator:$(REDIS_PASSWORD)@"
    )
    assert env["sse"]["AGENTRUN_REDIS_URL"]["value"].startswith("redis://agentrun-sse:")
    assert env["sse"]["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "sse-password"
    # Data on a PersistentVolumeClaim by default: checkpoints and call records survive the pod.
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    # An external Redis: the sidecar gets its own (limited) user's URL when one is given.
    docs = render(
        helm, "redis.enabled=false", "redis.externalSecret.name=r", "redis.externalSecret.sseKey=s"
    )
    operator = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
    )
    keys = {
        c["name"]: next(
            e["valueFrom"]["secretKeyRef"]["key"]
            for e in c["env"]
            if e["name"] == "AGENTRUN_REDIS_URL"
        )
        for c in operator["spec"]["template"]["spec"]["containers"]
    }
    assert keys == {"operator": "redis-url", "sse": "s"}
    # An existing Secret replaces the generated one.
    docs = render(helm, "redis.auth.existingSecret=my-redis")
    assert not [d for d in docs if d["kind"] == "Secret" and "redis" in d["metadata"]["name"]]
    redis = next(d for d in docs if d["kind"] == "StatefulSet")
    refs = redis["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in refs} == {"my-redis"}


def test_model_prices_reach_the_operator(helm: Helm) -> None:
    # (--set reads integers only; a values file or --set-json carries fractions.)
    docs = render(helm, "operator.prices.my-model.input=1", "operator.prices.my-model.output=3")
    operator = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
    )
    env = {e["name"]: e for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    prices = json.loads(env["AGENTRUN_PRICES"]["value"])
    assert prices == {"my-model": {"input": 1, "output": 3}}


def test_tracing_and_redis_cluster_values_reach_both_containers(helm: Helm) -> None:
    def env_of(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
        operator = next(
            d
            for d in docs
            if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
        )
        return {
            c["name"]: {e["name"]: e.get("value", "") for e in c["env"]}
            for c in operator["spec"]["template"]["spec"]["containers"]
        }

    off = env_of(render(helm))
    assert "AGENTRUN_OTEL_ENDPOINT" not in off["operator"]
    assert "AGENTRUN_TRACE_URL" not in off["sse"]
    on = env_of(
        render(
            helm,
            "tracing.enabled=true",
            "tracing.endpoint=http://jaeger-collector.tracing:4318",
            "tracing.urlTemplate=https://jaeger.example.com/trace/{traceId}",
        )
    )
    assert on["operator"]["AGENTRUN_OTEL_ENDPOINT"] == "http://jaeger-collector.tracing:4318"
    assert on["operator"]["OTEL_SERVICE_NAME"] == "agentrun-operator"
    assert on["sse"]["AGENTRUN_TRACE_URL"] == "https://jaeger.example.com/trace/{traceId}"
    # An external Redis Cluster: both containers use the cluster client.
    clustered = env_of(
        render(
            helm,
            "redis.enabled=false",
            "redis.externalURL=redis://redis-cluster.redis:6379/0",
            "redis.cluster=true",
        )
    )
    assert clustered["operator"]["AGENTRUN_REDIS_CLUSTER"] == "true"
    assert clustered["sse"]["AGENTRUN_REDIS_CLUSTER"] == "true"
    assert "AGENTRUN_REDIS_CLUSTER" not in off["operator"]


def test_ingress_and_gateway_carry_the_stream_settings(helm: Helm) -> None:
    docs = render(
        helm, "ingress.enabled=true", "gateway.enabled=true", "gateway.parentRefs[0].name=gw"
    )
    ingress = next(d for d in docs if d["kind"] == "Ingress")
    ann = ingress["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert ann["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert ann["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    assert ann["nginx.ingress.kubernetes.io/proxy-http-version"] == "1.1"
    route = next(d for d in docs if d["kind"] == "HTTPRoute")
    assert route["spec"]["rules"][0]["timeouts"]["request"] == "3600s"


def test_notification_routes_render_into_the_configmap_the_operator_reads(helm: Helm) -> None:
    from agentrun_operator import notify

    docs = render(
        helm,
        "notifications.enabled=true",
        "notifications.routes[0].url=https://hooks.example.com/x",
        "notifications.routes[0].format=slack",
    )
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    [route] = notify.parse_routes(cm["data"]["routes.yaml"])
    assert route.url == "https://hooks.example.com/x" and route.format == "slack"
    operator = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
    )
    env = {
        e["name"]: e.get("value")
        for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["AGENTRUN_NOTIFY_CONFIGMAP"] == f"agentrun-system/{cm['metadata']['name']}"


def test_with_workers_the_operator_is_the_controller_and_workers_run_the_runs(
    helm: Helm,
) -> None:
    docs = render(helm, "workers.replicas=3", "tracing.enabled=true",
                  "tracing.endpoint=http://c:4318")  # fmt: skip
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    operator, worker = deployments["t-agentrun-operator"], deployments["t-agentrun-worker"]

    def env(d: dict[str, Any]) -> dict[str, Any]:
        container = d["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}

    assert env(operator)["AGENTRUN_ROLE"] == "controller"
    # The workers run runs exactly as the operator would (the same settings, its identity);
    # only the controller elects one replica.
    controller_only = ("AGENTRUN_ROLE", "AGENTRUN_LEADER_LEASE", "AGENTRUN_LEADER_LEASE_SECONDS")
    assert {k: v for k, v in env(operator).items() if k not in controller_only} == env(worker)
    pod = worker["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"] == ["python", "-m", "agentrun_operator.worker"]
    assert pod["serviceAccountName"] == operator["spec"]["template"]["spec"]["serviceAccountName"]
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert worker["spec"]["replicas"] == 3
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 1
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    scaled = render(helm, "workers.autoscaling.enabled=true")
    (hpa,) = [d for d in scaled if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "t-agentrun-worker"
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource"]
    assert (
        "replicas"
        not in next(d for d in scaled if d["metadata"]["name"] == "t-agentrun-worker")["spec"]
    )
    # Optionally also on the runs each worker executes, the gauge the workers export.
    by_runs = render(helm, "workers.autoscaling.enabled=true",
                     "workers.autoscaling.runsPerWorker=20")  # fmt: skip
    (hpa,) = [d for d in by_runs if d["kind"] == "HorizontalPodAutoscaler"]
    pods = hpa["spec"]["metrics"][1]["pods"]
    assert pods["metric"] == {
        "name": metrics.RUNS_ACTIVE._name,
        "selector": {"matchLabels": {"state": "running"}},
    }
    assert pods["target"] == {"type": "AverageValue", "averageValue": "20"}
    # Prometheus scrapes the workers as well as the operator, through one Service.
    (svc,) = [d for d in docs if d["metadata"]["name"] == "t-agentrun-metrics"]
    labels = svc["spec"]["selector"]
    for d in (operator, worker):
        assert labels.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    # Workers are the default (two, and two controllers).
    default = {d["metadata"]["name"]: d for d in render(helm) if d["kind"] == "Deployment"}
    assert env(default["t-agentrun-operator"])["AGENTRUN_ROLE"] == "controller"
    assert default["t-agentrun-worker"]["spec"]["replicas"] == 2
    assert default["t-agentrun-operator"]["spec"]["replicas"] == 2
    # Without workers: one operator that does everything (small clusters).
    plain = render(helm, "workers.enabled=false")
    plain_deployments = {d["metadata"]["name"]: d for d in plain if d["kind"] == "Deployment"}
    assert "AGENTRUN_ROLE" not in env(plain_deployments["t-agentrun-operator"])
    assert "t-agentrun-worker" not in plain_deployments


def test_the_operator_replicas_elect_one_through_a_lease_only_they_may_write(
    helm: Helm,
) -> None:
    docs = render(helm, "operator.leaderLeaseSeconds=20")
    operator = next(d for d in docs if d["metadata"]["name"] == "t-agentrun-operator"
                    and d["kind"] == "Deployment")  # fmt: skip
    assert operator["spec"]["replicas"] == 2
    # An upgrade replaces them all: no old leader acts on after `helm upgrade --wait`.
    assert operator["spec"]["strategy"] == {"type": "Recreate"}
    container = operator["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AGENTRUN_LEADER_LEASE"] == "agentrun-system/t-agentrun-controller"
    assert env["AGENTRUN_LEADER_LEASE_SECONDS"] == "20"
    # Its Role: create a Lease, and read or renew only that one, only in its namespace.
    (role,) = [d for d in docs if d["kind"] == "Role" and "leader" in d["metadata"]["name"]]
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["t-agentrun-controller"],
            "verbs": ["get", "update"],
        },
    ]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"
                  and d["roleRef"]["name"] == role["metadata"]["name"]]  # fmt: skip
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "t-agentrun-operator", "namespace": "agentrun-system"}
    ]


def test_the_real_api_server_accepts_the_rendered_chart(
    helm: Helm, kubectl: Kubectl, cluster: ControlPlane
) -> None:
    kubectl("create", "namespace", "agentrun-system", check=False)
    # Rendered for this server's version, as `helm install` renders for the cluster it
    # installs on (1.20 gets policy/v1beta1 and autoscaling/v2beta2).
    major, minor = cluster.version()
    docs = render(
        helm,
        "redis.persistence.enabled=true",
        "notifications.enabled=true",
        "ingress.enabled=true",
        "workers.autoscaling.enabled=true",
        "workers.autoscaling.runsPerWorker=20",
        kube_version=f"{major}.{minor}.0",
    )
    apis = {(d["kind"], d["apiVersion"]) for d in docs}
    old = (major, minor) < (1, 21)
    assert ("PodDisruptionBudget", "policy/v1beta1" if old else "policy/v1") in apis
    hpa = "autoscaling/v2beta2" if (major, minor) < (1, 23) else "autoscaling/v2"
    assert ("HorizontalPodAutoscaler", hpa) in apis
    proc = dry_run(kubectl, "agentrun-system", docs)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(server dry run)") == len(docs)


# Every API the chart can render (with every option on): all GA, none deprecated or removed
# in any release up to 1.34.
GA_APIS = {
    "v1",
    "apps/v1",
    "batch/v1",
    "rbac.authorization.k8s.io/v1",
    "admissionregistration.k8s.io/v1",
    "networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1",
    "monitoring.coreos.com/v1",
    "cert-manager.io/v1",
    "policy/v1",
    "autoscaling/v2",
}
EVERY_OPTION = (
    "redis.persistence.enabled=true",
    "notifications.enabled=true",
    "ingress.enabled=true",
    "gateway.enabled=true",
    "gateway.parentRefs[0].name=gw",
    "serviceMonitor.enabled=true",
    "grafanaDashboard.enabled=true",
    "webhooks.certManager.enabled=true",
    "webhooks.certManager.issuerRef.name=ca",
    "workers.enabled=true",
    "workers.autoscaling.enabled=true",
)


def test_the_chart_renders_only_ga_apis(helm: Helm) -> None:
    rendered = sorted({(d["apiVersion"], d["kind"]) for d in render(helm, *EVERY_OPTION)})
    print("\n".join(f"{api} {kind}" for api, kind in rendered))
    assert {api for api, _ in rendered} == GA_APIS


def test_chart_pods_meet_pod_security_restricted(
    helm: Helm, kubectl: Kubectl, cluster: ControlPlane
) -> None:
    if cluster.version() < (1, 25):
        pytest.skip("Pod Security admission is GA from 1.25 (this is 1.20: no such check)")
    kubectl("create", "namespace", "psa-restricted", check=False)
    kubectl(
        "label",
        "namespace",
        "psa-restricted",
        "--overwrite",
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/warn=restricted",
    )
    workloads = [
        d
        for d in render(helm, "redis.persistence.enabled=true")
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
    ]
    assert len(workloads) == 5
    proc = dry_run(kubectl, "psa-restricted", workloads)
    assert proc.returncode == 0, proc.stderr
    # The API server warns about a workload whose pods the namespace would refuse.
    assert "PodSecurity" not in proc.stderr, proc.stderr


def test_the_dashboard_graphs_metrics_the_operator_exports(helm: Helm) -> None:
    import re

    from prometheus_client.metrics import MetricWrapperBase

    from agentrun_operator import metrics

    docs = render(helm, "grafanaDashboard.enabled=true", "serviceMonitor.enabled=true")
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "dashboard" in d["metadata"]["name"])
    dashboard = json.loads(cm["data"]["agentrun.json"])
    exported = {
        next(iter(m.describe())).name
        for m in vars(metrics).values()
        if isinstance(m, MetricWrapperBase)
    }

    used = {
        re.sub(r"_(bucket|total|count|sum)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"agentrun_[a-z_]+", target["expr"])
    }
    assert used and used <= {re.sub(r"_total$", "", n) for n in exported}, used - exported
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_the_operators_egress_policy_lists_the_mcp_servers_only_when_asked(helm: Helm) -> None:
    assert not [d for d in render(helm) if d["metadata"]["name"].endswith("-operator-egress")]
    mcp_peer = {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                "podSelector": {"matchLabels": {"app": "prom-mcp"}},
            }
        ],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }
    api = {
        "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}],
        "ports": [{"port": 443, "protocol": "TCP"}],
    }
    args = [
        "template",
        "t",
        str(CHART),
        "--namespace",
        "agentrun-system",
        "--set",
        "networkPolicy.operatorEgress.enabled=true",
        "--set-json",
        f"mcp.egress=[{json.dumps(mcp_peer)}]",
        "--set-json",
        f"networkPolicy.operatorEgress.apiServer=[{json.dumps(api)}]",
    ]
    docs = [d for d in yaml.safe_load_all(helm(*args).stdout) if d]
    [policy] = [d for d in docs if d["metadata"]["name"] == "t-agentrun-operator-egress"]
    assert policy["spec"]["policyTypes"] == ["Egress"]
    # The operator's pods and the workers', which reach what the operator reaches.
    assert policy["spec"]["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "In", "values": ["operator", "worker"]}
    ]
    egress = policy["spec"]["egress"]
    assert egress[0]["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    assert egress[1]["ports"] == [{"port": 6379, "protocol": "TCP"}]
    assert egress[2:] == [api, mcp_peer]
    # A peer of the wrong shape is refused by the chart's schema, naming the field.
    bad = helm(
        "template",
        "t",
        str(CHART),
        "--set-json",
        'mcp.egress=[{"to": [{"cidr": "10.0.0.0/8"}]}]',
        check=False,
    )
    assert bad.returncode != 0 and "/mcp/egress/0/to/0" in bad.stderr, bad.stderr
