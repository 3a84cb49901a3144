"""Scale-out benchmark: N concurrent runs (the mock LLM's default script) through a controller
and 1, 2 and 3 worker processes, all real processes on 127.0.0.1 (kube-apiserver of
K8S_VERSION, default 1.34; redis-server; the mock LLM over HTTP).

Per worker count: wall time to all Succeeded, runs/s, p99 create → first event (sampled),
peak RSS per worker, worker CPU per run, status writes per run; then the hand-over time after
SIGKILL of the busiest worker (its runs resumed elsewhere). On a machine with fewer cores
than processes, the ratio 3 workers / 1 worker is bounded by the cores: the CPU seconds per
run are printed so the ratio can be projected for a machine with enough of them.

Also per worker count, the stop latency through the workers (``spec.stop`` patch and Redis
control message → the run's ``end`` event), to compare with bench_operator.py's one process.

Usage: .venv/bin/python bench/bench_scale.py [--runs 2000] [--workers 1,2,3] [--tps 100]
       [--stops 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis as redis_sync
from bench_operator import (  # type: ignore[import-not-found]  # a sibling script
    BASE,
    STOP_SCRIPT,
    Api,
    apply_crds,
    cpu_seconds,
    ms,
    pct,
    rss_kib,
    stops,
    wait_first,
)

from agentrun_harness.controlplane import ControlPlane, k8s_release
from agentrun_harness.operatorproc import OperatorProcess
from agentrun_harness.redisserver import RedisServer
from agentrun_operator.mockllm import MockLLMThread


def process(
    plane: ControlPlane, redis_url: str, llm: str, work: Path, **kw: Any
) -> OperatorProcess:
    env = kw.pop("env", {})
    return OperatorProcess(
        plane=plane,
        redis_url=redis_url,
        model_base_url=llm,
        workdir=work,
        env={"AGENTRUN_STATUS_INTERVAL_SECONDS": "2", "AGENTRUN_LEASE_SECONDS": "5", **env},
        **kw,
    )


def one_round(
    plane: ControlPlane, api: Api, r: redis_sync.Redis, redis_url: str, llm: str, work: Path,
    *, workers: int, runs: int, stop_rounds: int,
) -> dict[str, Any]:  # fmt: skip
    ns = f"scale-{workers}-{uuid.uuid4().hex[:6]}"
    api.call("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    ctl = process(
        plane, redis_url, llm, work / f"ctl-{workers}", operator_id="controller",
        env={"AGENTRUN_ROLE": "controller", "AGENTRUN_NAMESPACES": ns,
             # Cluster-wide now: every run at once, as each worker takes them.
             "AGENTRUN_MAX_CONCURRENT_RUNS": str(runs + 10)},
    )  # fmt: skip
    procs = [
        process(
            plane,
            redis_url,
            llm,
            work / f"w{workers}-{i}",
            operator_id=f"w{i}",
            module="agentrun_operator.worker",
            env={"AGENTRUN_MAX_CONCURRENT_RUNS": str(runs + 10)},
        )
        for i in range(workers)
    ]
    ctl.start()
    for p in procs:
        p.start()
    # Stops reach the worker holding a run through the same control channel as before.
    stopped = stops(api, r, ns, stop_rounds)
    writes, stop = api.count_writes(ns)
    pids = [p.proc.pid for p in procs if p.proc]
    cpu0 = {pid: cpu_seconds(pid) for pid in pids}
    peak = dict.fromkeys(pids, 0)
    names = [f"run-{i}" for i in range(runs)]
    load = set(names)
    firsts: list[float] = []
    t0 = time.monotonic()
    for i, name in enumerate(names):
        t = time.monotonic()
        uid = api.create_run(ns, name, goal=f"bench-scale {name}")
        if i % max(1, runs // 50) == 0:  # a sample: waiting on each would pace the creates
            firsts.append(wait_first(r, uid, lambda e: True) - t)
    while True:
        for pid in pids:
            peak[pid] = max(peak[pid], rss_kib(pid))
        items = api.call("GET", f"{BASE}/namespaces/{ns}/agentruns")["items"]
        done = [
            i
            for i in items
            if i["metadata"]["name"] in load
            and (i.get("status") or {}).get("phase") in ("Succeeded", "Failed")
        ]
        if len(done) == runs:
            break
        if time.monotonic() - t0 > 1800:
            raise TimeoutError(f"only {len(done)}/{runs} finished")
        time.sleep(0.5)
    wall = time.monotonic() - t0
    failed = sum(1 for i in done if i["status"]["phase"] != "Succeeded")
    cpu = sum(cpu_seconds(pid) - cpu0[pid] for pid in pids)
    time.sleep(3)
    stop.set()
    result = {
        "workers": workers,
        "wall": wall,
        "rate": runs / wall,
        "p99_first": pct(firsts, 99),
        "rss_mib": max(peak.values()) / 1024,
        "cpu_ms_per_run": cpu / runs * 1000,
        "writes_per_run": sum(writes.values()) / runs,
        "failed": failed,
        "stops": stopped,
    }
    if workers > 1:
        result["handover"] = handover(api, r, ns, procs, llm)
    for p in procs:
        p.stop()
    ctl.stop()
    return result


def handover(
    api: Api, r: redis_sync.Redis, ns: str, procs: list[OperatorProcess], llm: str
) -> float:
    """SIGKILL the busiest worker while 10 long runs stream: seconds until all its runs
    are held by others."""
    names = [f"long-{i}" for i in range(10)]
    for name in names:
        api.create_run(ns, name, goal=f"bench-handover {name}")

    def holders() -> dict[str, str | None]:
        return {
            n: (api.call("GET", f"{BASE}/namespaces/{ns}/agentruns/{n}").get("status") or {}).get(
                "worker"
            )
            for n in names
        }

    deadline = time.monotonic() + 60
    while not all(holders().values()):
        if time.monotonic() > deadline:
            raise TimeoutError("the long runs were not all held")
        time.sleep(0.2)
    held = holders()
    victim = Counter(held.values()).most_common(1)[0][0]
    orphans = [n for n, w in held.items() if w == victim]
    proc = next(p for p in procs if p.env["AGENTRUN_OPERATOR_ID"] == victim)
    proc.kill()
    t = time.monotonic()
    while any(holders()[n] == victim for n in orphans):
        if time.monotonic() - t > 120:
            raise TimeoutError("the runs of the killed worker were not taken over")
        time.sleep(0.1)
    return time.monotonic() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--tps", type=float, default=100, help="mock LLM tokens per second")
    parser.add_argument("--stops", type=int, default=5, help="stops of each kind per round")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="agentrun-bench-scale-"))
    plane = ControlPlane(workdir=work / "cp")
    plane.start()
    redis_server = RedisServer(workdir=work / "redis")
    redis_server.start()
    llm = MockLLMThread(tokens_per_second=args.tps)
    llm.start()
    long_text = " ".join(f"w{i}" for i in range(600))
    llm.set_script([{"match": "bench-handover", "replies": [{"text": long_text}]}, STOP_SCRIPT])
    api = Api(plane)
    r = redis_sync.Redis.from_url(redis_server.url)
    try:
        apply_crds(plane)
        results = [
            one_round(
                plane, api, r, redis_server.url, llm.base_url, work,
                workers=int(n), runs=args.runs, stop_rounds=args.stops,
            )
            for n in args.workers.split(",")
        ]  # fmt: skip
        print(
            f"\n== agentrun scale-out ({args.runs} runs, 127.0.0.1, Kubernetes {k8s_release()}) =="
        )
        for res in results:
            print(
                f"{res['workers']} worker(s): wall {res['wall']:6.1f} s, "
                f"{res['rate']:5.1f} runs/s, "
                f"p99 create -> first event {res['p99_first'] * 1000:6.0f} ms, "
                f"peak RSS/worker {res['rss_mib']:4.0f} MiB, "
                f"worker CPU {res['cpu_ms_per_run']:4.0f} ms/run, "
                f"{res['writes_per_run']:.1f} status writes/run, {res['failed']} failed"
                + (f", SIGKILL hand-over {res['handover']:.1f} s" if "handover" in res else "")
            )
            print(f"  stop patch -> end event     {ms(res['stops']['patch_end'])}")
            print(f"  redis control -> end event  {ms(res['stops']['ctl_end'])}")
        base = results[0]
        for res in results[1:]:
            ratio = res["rate"] / base["rate"]
            print(f"ratio {res['workers']}/{base['workers']} workers (runs/s): {ratio:.2f}x")
    finally:
        llm.stop()
        redis_server.stop()
        plane.stop()


if __name__ == "__main__":
    main()
