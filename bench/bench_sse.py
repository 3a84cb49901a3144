"""Benchmark of the SSE server's fan-out: many viewers of one run, on 127.0.0.1.

Starts the real parts (the local kube-apiserver from ``make controlplane``, a redis-server,
``python -m agentrun_sse`` as its own process), creates one AgentRun, opens N viewer streams
from separate client processes, appends token events at a fixed rate through the operator's
own fenced writer, and reports the delivery latency (the writer's clock to the viewer's,
one machine, CLOCK_MONOTONIC), the server's RSS and CPU, and the single-stream throughput.

    .venv/bin/python bench/bench_sse.py                     # 100 viewers, 200 events/s
    .venv/bin/python bench/bench_sse.py --viewers 1,100,1000 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "sse")]

from agentrun_harness import procs  # noqa: E402
from agentrun_harness import sse as sse_harness  # noqa: E402
from agentrun_harness.controlplane import ControlPlane, default_bin_dir, free_port  # noqa: E402
from agentrun_harness.redisserver import RedisServer  # noqa: E402
from agentrun_operator import events  # noqa: E402

SENT_AT = re.compile(rb'"sentAt":([0-9.]+)')


def clock() -> float:
    # System-wide on Linux, so comparable between the producer and viewer processes.
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def kubectl(plane: ControlPlane, *args: str, input: str | None = None) -> str:
    cmd = [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig('admin')}", *args]
    return subprocess.run(cmd, input=input, capture_output=True, text=True, check=True).stdout


def create_run(plane: ControlPlane, namespace: str, name: str) -> str:
    manifest = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "AgentRun",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"goal": "benchmark"},
    }
    out = kubectl(
        plane, "create", "-f", "-", "-o", "jsonpath={.metadata.uid}", input=json.dumps(manifest)
    )
    return out.strip()


# -- viewer processes -------------------------------------------------------------------
async def _view(port: int, path: str, token: str, lags: list[float], opened: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(head.decode(errors="replace"))
    opened.set()
    while line := await reader.readline():
        if line.startswith(b"data: "):
            now = clock()
            m = SENT_AT.search(line)
            if m:
                lags.append(now - float(m.group(1)))
            elif b'"type":"end"' in line:
                break
    writer.close()


def viewer_process(port: int, path: str, token: str, count: int, pipe: Connection) -> None:
    async def main() -> list[float]:
        lags: list[float] = []
        opened = [asyncio.Event() for _ in range(count)]
        tasks = [asyncio.create_task(_view(port, path, token, lags, o)) for o in opened]
        await asyncio.gather(*(o.wait() for o in opened))
        pipe.send("open")
        await asyncio.gather(*tasks)
        return lags

    pipe.send(asyncio.run(main()))
    pipe.close()


# -- the server process -----------------------------------------------------------------
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    viewers: int
    rate: float
    events: int
    received: int
    p50: float
    p90: float
    p99: float
    worst: float
    rss_idle: int
    rss_open: int
    rss_peak: int
    cpu: float
    lagged: float
    readers: float


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def scenario(
    *,
    plane: ControlPlane,
    redis_url: str,
    server_port: int,
    server_pid: int,
    namespace: str,
    viewers: int,
    rate: float,
    seconds: float,
    per_process: int,
) -> Result:
    name = f"bench-{viewers}-{int(time.time() * 1000) % 100000}"
    uid = create_run(plane, namespace, name)
    redis = events.connect(redis_url)
    op = await sse_harness.FakeOperator(redis, uid=uid, run=f"{namespace}/{name}").start()
    path = events.stream_path(namespace, name)
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    rss_idle = rss_kib(server_pid)
    for start in range(0, viewers, per_process):
        parent, child = ctx.Pipe(duplex=False)
        count = min(per_process, viewers - start)
        p = ctx.Process(
            target=viewer_process, args=(server_port, path, plane.token("admin"), count, child)
        )
        p.start()
        child.close()
        pipes.append(parent)
        procs.append(p)
    for pipe in pipes:  # every stream open
        assert await asyncio.to_thread(pipe.recv) == "open"
    rss_open = rss_kib(server_pid)
    total = int(rate * seconds)
    cpu0, peak, readers = cpu_seconds(server_pid), rss_open, 0.0
    began = clock()
    for i in range(total):
        due = began + i / rate
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)  # the producer's fixed rate
        await op.emit("token", {"text": f"tok{i} ", "node": "act", "sentAt": clock()})
        if i % 100 == 0:
            peak = max(peak, rss_kib(server_pid))
        if i == total // 2:  # mid-run: how many Redis readers serve the viewers
            async with httpx.AsyncClient() as http:
                readers = metric(
                    (await http.get(f"http://127.0.0.1:{server_port}/metrics")).text,
                    "agentrun_sse_redis_readers",
                )
    await op.end()
    lags: list[float] = []
    for pipe in pipes:
        lags.extend(await asyncio.to_thread(pipe.recv))
    cpu = (cpu_seconds(server_pid) - cpu0) / (clock() - began)
    for p in procs:
        p.join(30)
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{server_port}/metrics")).text
    await redis.aclose()
    lags.sort()
    q = statistics.quantiles(lags, n=100, method="inclusive") if len(lags) > 1 else [0.0] * 99
    return Result(
        viewers=viewers,
        rate=rate,
        events=total,
        received=len(lags),
        p50=q[49] * 1000,
        p90=q[89] * 1000,
        p99=q[98] * 1000,
        worst=lags[-1] * 1000 if lags else 0.0,
        rss_idle=rss_idle,
        rss_open=rss_open,
        rss_peak=max(peak, rss_kib(server_pid)),
        cpu=cpu * 100,
        lagged=metric(text, "agentrun_sse_viewers_lagged_total"),
        readers=readers,
    )


async def throughput(
    *, plane: ControlPlane, redis_url: str, port: int, namespace: str, n: int
) -> float:
    """Events per second one viewer receives when the writer appends as fast as it can."""
    name = f"bench-rate-{int(time.time() * 1000) % 100000}"
    uid = create_run(plane, namespace, name)
    redis = events.connect(redis_url)
    op = await sse_harness.FakeOperator(redis, uid=uid, run=f"{namespace}/{name}").start()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    path = events.stream_path(namespace, name)
    p = ctx.Process(target=viewer_process, args=(port, path, plane.token("admin"), 1, child))
    p.start()
    child.close()
    assert await asyncio.to_thread(parent.recv) == "open"
    began = clock()
    # Pipelined appends (as a busy writer would), so Redis round trips do not set the pace.
    for start in range(0, n, 500):
        await asyncio.gather(
            *(
                op.emit("token", {"text": "x", "node": "act", "sentAt": clock()})
                for _ in range(start, min(n, start + 500))
            )
        )
    await op.end()
    got = await asyncio.to_thread(parent.recv)
    elapsed = clock() - began
    p.join(30)
    await redis.aclose()
    assert len(got) == n, f"received {len(got)} of {n}"
    return n / elapsed


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--viewers", default="100", help="comma-separated viewer counts")
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--per-process", type=int, default=25, help="viewers per client process")
    parser.add_argument("--throughput-events", type=int, default=20000)
    parser.add_argument(
        "--server-path",
        default="",
        help="extra PYTHONPATH for the server only (e.g. a --target dir with uvloop, httptools)",
    )
    args = parser.parse_args()
    counts = [int(c) for c in args.viewers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="agentrun-bench-"))
    plane = ControlPlane(workdir=work / "controlplane", bin_dir=default_bin_dir())
    redis = RedisServer(workdir=work / "redis", appendonly=False)
    server: subprocess.Popen[bytes] | None = None
    began = time.monotonic()
    try:
        plane.start()
        kubectl(plane, "apply", "-f", str(ROOT / "crds"))
        kubectl(plane, "wait", "--for=condition=Established", "crd/agentruns.agentrun.dev")
        kubectl(plane, "create", "namespace", "bench")
        redis.start()
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AGENTRUN_")},
            "PYTHONPATH": os.pathsep.join(
                [p for p in (args.server_path, str(ROOT / "operator"), str(ROOT / "sse")) if p]
            ),
            "KUBECONFIG": str(plane.kubeconfig("admin")),
            "AGENTRUN_REDIS_URL": redis.url,
            "AGENTRUN_SSE_HOST": "127.0.0.1",
            "AGENTRUN_SSE_PORT": str(port),
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "agentrun_sse", "--no-access-log", "--log-level", "warning",
             "--viewer-queue", "4096"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        async with httpx.AsyncClient() as http:
            for _ in range(400):  # a child process: polling /healthz is its readiness signal
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        results = []
        for n in counts:
            results.append(
                await scenario(
                    plane=plane,
                    redis_url=redis.url,
                    server_port=port,
                    server_pid=server.pid,
                    namespace="bench",
                    viewers=n,
                    rate=args.rate,
                    seconds=args.seconds,
                    per_process=args.per_process,
                )
            )
        rate = await throughput(
            plane=plane, redis_url=redis.url, port=port, namespace="bench", n=args.throughput_events
        )
    finally:
        procs.stop(server, timeout=15)
        redis.stop()
        plane.stop()
        shutil.rmtree(work, ignore_errors=True)
    cores = os.cpu_count()
    print(
        f"\nagentrun SSE fan-out, one run, 127.0.0.1, {cores} CPUs, Python {sys.version.split()[0]}"
    )
    print(
        f"{args.rate:.0f} events/s for {args.seconds:.0f} s; latency: writer append -> viewer read"
    )
    header = (
        f"{'viewers':>7} {'events':>7} {'received':>9} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'RSS idle':>9} {'RSS open':>9} {'RSS peak':>9} {'KiB/strm':>9} "
        f"{'CPU %':>6} {'readers':>7} {'lagged':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        per = (r.rss_open - r.rss_idle) / r.viewers
        mib = [f"{v / 1024:>7.1f}Mi" for v in (r.rss_idle, r.rss_open, r.rss_peak)]
        print(
            f"{r.viewers:>7} {r.events:>7} {r.received:>9} {r.p50:>7.2f} {r.p90:>7.2f} "
            f"{r.p99:>7.2f} {r.worst:>7.1f} {' '.join(mib)} {per:>9.1f} {r.cpu:>6.1f} "
            f"{r.readers:>7.0f} {r.lagged:>6.0f}"
        )
    n = args.throughput_events
    print(f"\nsingle-stream throughput: {rate:,.0f} events/s ({n} pipelined appends)")
    print(f"bench wall time: {time.monotonic() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
