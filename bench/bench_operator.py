"""Operator benchmarks on real parts (kube-apiserver of K8S_VERSION, default 1.34;
redis-server, the operator process, the mock LLM over HTTP), all on 127.0.0.1.

Figures:
- stop latency: `spec.stop` patch → `end` event in the stream and → `status.phase=Stopped`;
  Redis control message → `end` event and → Stopped;
- create → first event of the run in Redis;
- N concurrent runs in one operator process: wall time to all Succeeded, operator peak RSS,
  object writes per run (status and kopf bookkeeping, counted from a watch).

With --tracing the operator exports every run as a trace to a real Jaeger (OTLP HTTP; `make
jaeger` builds it): compare wall time and operator CPU with and without.

Usage: .venv/bin/python bench/bench_operator.py [--runs 200] [--stops 10] [--tps 100] [--tracing]
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, cast

import redis as redis_sync

from agentrun_harness.controlplane import ControlPlane, k8s_release
from agentrun_harness.jaeger import Jaeger
from agentrun_harness.operatorproc import OperatorProcess
from agentrun_harness.redisserver import RedisServer
from agentrun_operator import events
from agentrun_operator.mockllm import MockLLMThread

ROOT = Path(__file__).resolve().parent.parent
BASE = "/apis/agentrun.dev/v1alpha1"


class Api:
    """Just enough of the Kubernetes API over urllib, as admin, to time things precisely."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.ctx = ssl.create_default_context(cafile=str(plane.ca_file))

    def call(
        self, method: str, path: str, body: Any = None, ctype: str = "application/json"
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.plane.server + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.plane.token('admin')}", "Content-Type": ctype},
        )
        with urllib.request.urlopen(req, context=self.ctx, timeout=30) as r:
            return json.loads(r.read() or b"{}")

    def create_run(self, ns: str, name: str, **spec: Any) -> str:
        doc = {
            "apiVersion": "agentrun.dev/v1alpha1",
            "kind": "AgentRun",
            "metadata": {"name": name},
            "spec": spec,
        }
        return str(self.call("POST", f"{BASE}/namespaces/{ns}/agentruns", doc)["metadata"]["uid"])

    def count_writes(self, ns: str) -> tuple[Counter[str], threading.Event]:
        """Counts the writes to each AgentRun of ``ns`` (MODIFIED events of a watch) from
        now until the returned event is set."""
        writes: Counter[str] = Counter()
        stop = threading.Event()

        def watcher() -> None:
            req = urllib.request.Request(
                self.plane.server + f"{BASE}/namespaces/{ns}/agentruns?watch=1",
                headers={"Authorization": f"Bearer {self.plane.token('admin')}"},
            )
            with urllib.request.urlopen(req, context=self.ctx, timeout=1800) as resp:
                for line in resp:
                    if stop.is_set():
                        return
                    ev = json.loads(line)
                    if ev["type"] == "MODIFIED":
                        writes[ev["object"]["metadata"]["name"]] += 1

        threading.Thread(target=watcher, daemon=True).start()
        return writes, stop

    def phase(self, ns: str, name: str) -> str | None:
        return (
            self.call("GET", f"{BASE}/namespaces/{ns}/agentruns/{name}").get("status") or {}
        ).get("phase")


def wait_first(r: redis_sync.Redis, uid: str, pred: Any, timeout: float = 60) -> float:
    """Block on the stream until an event matches; return the monotonic time it was seen."""
    last = "0-0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = cast(
            list[tuple[bytes, list[tuple[bytes, dict[bytes | str, bytes | str]]]]],
            r.xread({events.events_key(uid): last}, block=1000, count=100),
        )
        for _s, entries in reply or []:
            for event_id, fields in entries:
                ev = events.decode(event_id, fields)
                last = ev["id"]
                if pred(ev):
                    return time.monotonic()
    raise TimeoutError(f"no matching event for {uid}")


def wait_phase(api: Api, ns: str, name: str, phase: str, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api.phase(ns, name) == phase:
            return time.monotonic()
        time.sleep(0.01)
    raise TimeoutError(f"{ns}/{name} did not reach {phase}")


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def apply_crds(plane: ControlPlane) -> None:
    kubectl = [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig()}"]
    subprocess.run([*kubectl, "apply", "-f", str(ROOT / "crds")], check=True, capture_output=True)
    subprocess.run(
        [*kubectl, "wait", "--for=condition=Established", "crd/agentruns.agentrun.dev"],
        check=True,
        capture_output=True,
    )


# The mock LLM's reply to a run the stop figures stop: long enough to be stopped mid-stream.
STOP_SCRIPT = {"match": "bench-stop", "replies": [{"text": " ".join(f"w{i}" for i in range(2000))}]}


def stops(api: Api, r: redis_sync.Redis, ns: str, rounds: int) -> dict[str, list[float]]:
    """Stop ``rounds`` runs by a ``spec.stop`` patch and as many by a Redis control message,
    each once it streams tokens (the mock LLM needs STOP_SCRIPT): seconds from create to the
    first event, and from the stop to the ``end`` event and to ``Stopped``."""
    found: dict[str, list[float]] = {
        k: [] for k in ("first_event", "patch_end", "patch_phase", "ctl_end", "ctl_phase")
    }
    for i in range(rounds):
        for how in ("patch", "ctl"):
            name = f"stop-{how}-{i}"
            t0 = time.monotonic()
            uid = api.create_run(ns, name, goal=f"bench-stop {uuid.uuid4().hex}")
            found["first_event"].append(wait_first(r, uid, lambda e: True) - t0)
            wait_first(r, uid, lambda e: e["type"] == "token")
            t1 = time.monotonic()
            if how == "patch":
                api.call(
                    "PATCH",
                    f"{BASE}/namespaces/{ns}/agentruns/{name}",
                    {"spec": {"stop": True}},
                    "application/merge-patch+json",
                )
            else:
                r.publish(events.control_key(uid), json.dumps({"action": "stop", "by": "bench"}))
            found[f"{how}_end"].append(wait_first(r, uid, lambda e: e["type"] == "end") - t1)
            found[f"{how}_phase"].append(wait_phase(api, ns, name, "Stopped") - t1)
    return found


def ms(xs: list[float]) -> str:
    if not xs:
        return "(none measured)"
    return f"p50 {statistics.median(xs) * 1000:7.1f} ms   p99 {pct(xs, 99) * 1000:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--stops", type=int, default=10)
    parser.add_argument("--tps", type=float, default=100, help="mock LLM tokens per second")
    parser.add_argument("--tracing", action="store_true", help="export traces to a real Jaeger")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="agentrun-bench-"))
    plane = ControlPlane(workdir=work / "cp")
    plane.start()
    redis_server = RedisServer(workdir=work / "redis")
    redis_server.start()
    llm = MockLLMThread(tokens_per_second=args.tps)
    llm.start()
    llm.set_script([STOP_SCRIPT])
    jaeger = Jaeger(workdir=work / "jaeger") if args.tracing else None
    if jaeger is not None:
        jaeger.start()
    operator = OperatorProcess(
        plane=plane,
        redis_url=redis_server.url,
        model_base_url=llm.base_url,
        workdir=work / "op",
        env={
            "AGENTRUN_MAX_CONCURRENT_RUNS": str(args.runs + 10),
            "AGENTRUN_STATUS_INTERVAL_SECONDS": "2",
            **({"AGENTRUN_OTEL_ENDPOINT": jaeger.otlp_url} if jaeger else {}),
        },
    )
    api = Api(plane)
    r = redis_sync.Redis.from_url(redis_server.url)
    try:
        apply_crds(plane)
        operator.start()
        ns = "bench"
        api.call("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})

        stopped = stops(api, r, ns, args.stops)

        # N concurrent runs: default script (plan, k8s_list, summary, verify).
        writes, stop_watch = api.count_writes(ns)
        assert operator.proc is not None
        pid = operator.proc.pid
        rss_before = rss_kib(pid)
        peak = rss_before
        cpu_before = cpu_seconds(pid)
        names = [f"load-{i}" for i in range(args.runs)]
        t0 = time.monotonic()
        for name in names:
            api.create_run(ns, name, goal=f"bench-load {name}")
        created = time.monotonic() - t0
        while True:
            peak = max(peak, rss_kib(pid))
            items = api.call("GET", f"{BASE}/namespaces/{ns}/agentruns?labelSelector=")["items"]
            done = [
                i
                for i in items
                if i["metadata"]["name"].startswith("load-")
                and (i.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            ]
            if len(done) == len(names):
                break
            if time.monotonic() - t0 > 900:
                raise TimeoutError(f"only {len(done)}/{len(names)} finished")
            time.sleep(0.2)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(pid) - cpu_before
        failed = [i["metadata"]["name"] for i in done if i["status"]["phase"] != "Succeeded"]
        time.sleep(3)  # let trailing status writes land before counting
        stop_watch.set()
        per_run = [writes[n] for n in names]

        print(f"\n== agentrun operator benchmark (127.0.0.1, Kubernetes {k8s_release()}) ==")
        first = stopped["first_event"]
        print(f"create → first event       {ms(first)}   (n={len(first)})")
        print(f"stop patch → end event     {ms(stopped['patch_end'])}")
        print(f"stop patch → Stopped       {ms(stopped['patch_phase'])}")
        print(f"redis control → end event  {ms(stopped['ctl_end'])}")
        print(f"redis control → Stopped    {ms(stopped['ctl_phase'])}")
        print(
            f"{args.runs} concurrent runs       wall {wall:6.1f} s (creates took {created:.1f} s), "
            f"{len(failed)} failed"
        )
        print(
            f"operator CPU for them      {cpu:6.1f} s ({cpu / args.runs * 1000:.0f} ms per run), "
            f"tracing {'on (Jaeger)' if jaeger else 'off'}"
        )
        print(
            f"operator RSS               before {rss_before / 1024:.0f} MiB, "
            f"peak {peak / 1024:.0f} MiB"
        )
        print(
            f"object writes per run      median {statistics.median(per_run):.0f}, "
            f"max {max(per_run)} (status + kopf bookkeeping, from a watch)"
        )
    finally:
        operator.stop()
        if jaeger is not None:
            jaeger.stop()
        llm.stop()
        redis_server.stop()
        plane.stop()


if __name__ == "__main__":
    main()
