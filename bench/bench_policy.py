"""What judging a call costs: the dry-run preview and the AgentPolicy rules, before anyone is
asked.

Figures:
- rule evaluation alone (pure, in-process): one call judged by 100 rules, p50/p99;
- on the real control plane (kube-apiserver of K8S_VERSION, default 1.34, on 127.0.0.1): a
  k8s_scale call judged as the operator judges it (read the policies, dry run as the run's
  service account, evaluate the rules), p50/p99, against the same call without policies.

Usage: .venv/bin/python bench/bench_policy.py [--calls 200] [--rules 100]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from agentrun_harness.controlplane import ControlPlane, k8s_release
from agentrun_operator import kube, models, policy
from agentrun_operator.engine.common import RunRef, Services
from agentrun_operator.engine.judging import Judge, read_policies
from agentrun_operator.engine.policybook import PolicyBook


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms (n={len(ordered)})"


def rules(count: int) -> list[dict[str, Any]]:
    """A realistic mix: argument thresholds, label checks, namespaces, changes, time."""
    shapes = [
        "tool == 'k8s_scale' && int(args.replicas) > {n}",
        "target != null && 'tier' in target.labels && target.labels['tier'] == 'batch-{n}'",
        "namespaceObject.metadata.name == 'ns-{n}'",
        "target != null && target.changes.exists(c, c.path == 'spec.x{n}')",
        "now.getHours() == 25 && tool == 'k8s_patch-{n}'",
    ]
    return [
        {"name": f"r{i}", "when": shapes[i % len(shapes)].format(n=i + 50), "action": "require"}
        for i in range(count)
    ]


def bench_rules(count: int, rounds: int) -> None:
    p = policy.Policy.of(
        {
            "kind": "AgentPolicy",
            "metadata": {"name": "bench", "namespace": "b"},
            "spec": {"rules": rules(count)},
        }
    )
    preview = models.Preview(
        summary="spec.replicas 1→3",
        operation="update",
        changes=[models.PreviewChange(path="spec.replicas", before="1", after="3")],
        target=models.PreviewTarget(
            api_version="apps/v1",
            kind="Deployment",
            namespace="b",
            name="web",
            labels={"app": "web"},
        ),
    )
    ctx = policy.context(
        tool="k8s_scale",
        args={"kind": "Deployment", "name": "web", "replicas": 3},
        run={"namespace": "b", "name": "r", "createdBy": "alice", "serviceAccount": "agent"},
        preview=preview,
        namespace="b",
        namespace_labels={"team": "b"},
        now=dt.datetime.now(dt.UTC),
    )
    policy.judge([p], ctx)  # compile once, as the operator's cache does
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        verdict = policy.judge([p], ctx)
        samples.append(time.perf_counter() - started)
    assert verdict.action is None, verdict
    print(f"{count} rules per call, evaluation only: {percentiles(samples)}")
    started = time.perf_counter()
    policy.compile_rule.cache_clear()
    policy.check({"rules": rules(count)})
    print(f"{count} rules compiled at admission: {(time.perf_counter() - started) * 1000:.1f} ms")


async def bench_judging(plane: ControlPlane, calls: int, count: int) -> None:
    k8s = await kube.Kube.from_kubeconfig(plane.kubeconfig("admin"))
    try:
        ns = "bench-policy"
        services = Services(settings=None, k8s=k8s, store=None, saver=None)  # type: ignore[arg-type]
        ref = RunRef(namespace=ns, name="r", uid="u", generation=1, created="")
        spec = models.AgentRunSpec(goal="g", service_account_name="agent")
        judge = Judge(services, ref, spec, models.EffectiveApproval(), "alice")
        call: dict[str, Any] = {
            "name": "k8s_scale",
            "args": {"kind": "Deployment", "name": "web", "replicas": 3},
        }

        async def timed(label: str) -> None:
            samples = []
            for i in range(calls):
                started = time.perf_counter()
                verdicts = await judge.calls([{**call, "call_id": f"c-{i:012x}"}])
                samples.append(time.perf_counter() - started)
            assert all(v.get("preview") for v in verdicts.values()), verdicts
            print(f"judging one k8s_scale call ({label}): {percentiles(samples)}")

        # The policy CRDs' storage initialises a moment after they are established.
        for _ in range(100):
            try:
                await read_policies(services, ns)
                break
            except kube.KubeError as e:
                if not e.transient:
                    raise
                await asyncio.sleep(0.1)
        await timed("no policies: dry run only")
        body = {
            "apiVersion": "agentrun.dev/v1alpha1",
            "kind": "AgentPolicy",
            "metadata": {"name": "bench"},
            "spec": {"rules": rules(count)},
        }
        subprocess.run(
            [
                str(plane.kubectl),
                f"--kubeconfig={plane.kubeconfig('admin')}",
                "apply",
                "-n",
                ns,
                "-f",
                "-",
            ],
            input=json.dumps(body),
            text=True,
            check=True,
            capture_output=True,
        )
        await timed(f"an AgentPolicy of {count} rules, read from the API: dry run, rules")
        book = PolicyBook(k8s)
        book.start()
        while not book.synced or not await book.for_namespace(ns):
            await asyncio.sleep(0.05)
        services.policies = book
        await timed(f"an AgentPolicy of {count} rules, from the watches: dry run, rules")
        services.policies = None
        await book.close()
        # Without the dry run: reading the policies and evaluating the rules only.
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            found = await read_policies(services, ns)
            policy.judge(
                found,
                policy.context(
                    tool="k8s_scale",
                    args=call["args"],
                    run={},
                    preview=None,
                    namespace=ns,
                    namespace_labels={},
                    now=dt.datetime.now(dt.UTC),
                ),
            )
            samples.append(time.perf_counter() - started)
        print(f"reading the policies and evaluating {count} rules: {percentiles(samples)}")
    finally:
        await k8s.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rules", type=int, default=100)
    args = parser.parse_args()
    bench_rules(args.rules, rounds=1000)
    work = Path(tempfile.mkdtemp(prefix="bench-policy-"))
    plane = ControlPlane(workdir=work / "cp")
    plane.start()
    try:
        kubectl = [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig('admin')}"]
        root = Path(__file__).resolve().parent.parent
        for args_ in (
            ["apply", "-f", str(root / "crds")],
            ["create", "namespace", "bench-policy"],
            ["create", "serviceaccount", "agent", "-n", "bench-policy"],
            [
                "create",
                "role",
                "agent",
                "-n",
                "bench-policy",
                "--verb=get,patch",
                "--resource=deployments,deployments/scale",
            ],
            [
                "create",
                "rolebinding",
                "agent",
                "-n",
                "bench-policy",
                "--role=agent",
                "--serviceaccount=bench-policy:agent",
            ],
            ["create", "deployment", "web", "--image=nginx", "-n", "bench-policy"],
        ):
            subprocess.run(kubectl + args_, check=True, capture_output=True)
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Established", "crd/agentpolicies.agentrun.dev"],
            check=True,
            capture_output=True,
        )
        print(f"Kubernetes {k8s_release()}, all on 127.0.0.1")
        asyncio.run(bench_judging(plane, args.calls, args.rules))
    finally:
        plane.stop()


if __name__ == "__main__":
    main()
