"""What an MCP tool call costs next to a built-in one, and how fast a stop reaches the server.

Figures (all on 127.0.0.1):
- a read-only MCP call (``get_pod`` of an SDK server over streamable HTTP: connect, the
  initialize handshake, the call, as the operator makes each call) vs the built-in
  ``k8s_get`` of a Deployment as a service account on the real kube-apiserver of
  K8S_VERSION (default 1.34), p50/p99;
- cancelling a call in flight (what a stop does): ``task.cancel()`` → the server's tool sees
  the cancellation, p50/p99.

Usage: .venv/bin/python bench/bench_mcp.py [--calls 200] [--stops 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mcp_support import Record, serve, tool_server

from agentrun_harness.controlplane import ControlPlane, k8s_release
from agentrun_operator import kube, mcpclient, tools


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    p50 = statistics.median(ordered)
    return f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms (n={len(ordered)})"


async def mcp_calls(url: str, calls: int) -> list[float]:
    ep = mcpclient.Endpoint(url=url)
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        result = await mcpclient.call_tool(ep, "get_pod", {"namespace": "b", "name": "web"})
        samples.append(time.perf_counter() - started)
        assert not result.is_error
    return samples


async def stops(url: str, record: Record, count: int) -> list[float]:
    ep = mcpclient.Endpoint(url=url)
    samples = []
    for i in range(count):
        tag = f"stop-{i}"
        task = asyncio.create_task(
            mcpclient.call_tool(ep, "slow", {"steps": 1000, "delay": 0.01, "tag": tag})
        )
        while tag not in record.started:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        cancelled_at = time.monotonic()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        while tag not in record.cancelled:
            await asyncio.sleep(0.001)
        samples.append(record.cancelled[tag] - cancelled_at)
    return samples


async def builtin_calls(plane: ControlPlane, calls: int) -> list[float]:
    k8s = await kube.Kube.from_kubeconfig(plane.kubeconfig("admin"))
    sa = k8s.as_service_account(namespace="bench-mcp", name="agent")
    samples = []
    try:
        for i in range(calls):
            started = time.perf_counter()
            outcome = await tools.run_tool(
                sa,
                name="k8s_get",
                arguments={"kind": "Deployment", "name": "web"},
                namespace="bench-mcp",
                call_id=f"c-{i:012x}",
                max_bytes=16384,
            )
            samples.append(time.perf_counter() - started)
            assert outcome.status == "succeeded", outcome.error
    finally:
        await k8s.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--stops", type=int, default=20)
    args = parser.parse_args()
    record = Record()
    with serve(tool_server("bench", record).streamable_http_app(), "/mcp") as served:
        calls = asyncio.run(mcp_calls(served.url, args.calls))
        print(f"MCP call (get_pod, streamable HTTP): {percentiles(calls)}")
        cancels = asyncio.run(stops(served.url, record, args.stops))
        print(f"stop during an MCP call -> the server's tool cancelled: {percentiles(cancels)}")
    work = Path(tempfile.mkdtemp(prefix="bench-mcp-"))
    plane = ControlPlane(workdir=work / "cp")
    plane.start()
    try:
        kubectl = [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig('admin')}"]
        for step in (
            ["create", "namespace", "bench-mcp"],
            ["create", "serviceaccount", "agent", "-n", "bench-mcp"],
            ["create", "role", "agent", "-n", "bench-mcp", "--verb=get", "--resource=deployments"],
            [
                "create",
                "rolebinding",
                "agent",
                "-n",
                "bench-mcp",
                "--role=agent",
                "--serviceaccount=bench-mcp:agent",
            ],
            ["create", "deployment", "web", "--image=nginx", "-n", "bench-mcp"],
        ):
            subprocess.run([*kubectl, *step], check=True, capture_output=True)
        samples = asyncio.run(builtin_calls(plane, args.calls))
        print(f"built-in call (k8s_get, Kubernetes {k8s_release()}): {percentiles(samples)}")
    finally:
        plane.stop()


if __name__ == "__main__":
    main()
