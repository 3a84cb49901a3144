"""Helpers of the fault scenarios: the SSE server as a process one can kill -9, an operator of
a module's own (its own Redis, its own namespaces, so the session's operator is undisturbed),
namespaces with a service account the agent acts as, RSS readings, a tail of many runs'
streams (kill points chosen by events), an SSE follower that resumes with Last-Event-ID
and keeps what it got, and the cluster-side count of executed tool calls.

Counting on the cluster side: every side-effecting call in these scenarios is a JSON patch
that *appends* an entry to a Deployment's container env. Appending is not idempotent, so a
call executed twice leaves two entries (and bumps ``metadata.generation`` twice); the
operator's own events are never the evidence.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync

from agentrun_harness import procs
from agentrun_harness.controlplane import ControlPlane, free_port
from agentrun_harness.operatorproc import OperatorProcess
from agentrun_operator import events
from agentrun_operator import sseclient as client

from support import Kubectl, Script, fresh_namespace, own_operator, wait_for

# The label the session's webhook configuration selects (tests/conftest.py WEBHOOK_LABEL).
WEBHOOK_LABEL = "agentrun-test/webhooks"
FINISHED = ("Succeeded", "Failed", "Stopped")
ENV_NAME = "AGENTRUN_CALL"  # the env entries the tool calls append


def rss_mib(pid: int) -> float:
    """Resident set size of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# -- processes ----------------------------------------------------------------------------


def start_operator(
    cluster: ControlPlane,
    *,
    redis_url: str,
    script: Script,
    workdir: Path,
    namespaces: str,
    env: dict[str, str] | None = None,
) -> OperatorProcess:
    """An operator process of the module's own, with the product's least-privilege identity."""
    proc = own_operator(
        cluster, redis_url=redis_url, script=script, workdir=workdir, namespaces=namespaces, env=env
    )
    proc.start()
    return proc


class SSEProcess(procs.Managed):
    """``python -m agentrun_sse`` as its own process on a fixed loopback port: kill -9 it and
    start it again on the same address, as a crashed container comes back behind a Service."""

    def __init__(
        self,
        *,
        plane: ControlPlane,
        redis_url: str,
        workdir: Path,
        heartbeat_seconds: float = 1.0,
        args: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.args = args
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AGENTRUN_")},
            "KUBECONFIG": str(plane.kubeconfig("admin")),  # where the API is; no credentials
            "AGENTRUN_REDIS_URL": redis_url,
            "AGENTRUN_SSE_HOST": "127.0.0.1",
            "AGENTRUN_SSE_PORT": str(self.port),
            "AGENTRUN_HEARTBEAT_SECONDS": str(heartbeat_seconds),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "sse.log"

    def start(self, *, timeout: float = 30) -> None:
        self.starts += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentrun_sse",
                "--no-access-log",
                "--log-level",
                "warning",
                *self.args,
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the SSE server exited at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)  # a child process: polling /healthz is its readiness signal
        raise AssertionError(f"the SSE server not healthy after {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        procs.kill(self.proc)

    def stop(self) -> None:
        procs.stop(self.proc)

    def metric(self, name: str) -> float:
        """One unlabelled sample of the server's /metrics (0 when absent)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# -- namespaces and cluster-side counting ----------------------------------------------------


def fault_namespace(kubectl: Kubectl, request: pytest.FixtureRequest, prefix: str) -> Iterator[str]:
    """A fresh namespace judged by the webhooks, with service account ``agent`` that may
    read and patch Deployments, and user ``approver`` who may decide ToolApprovals."""
    for ns in fresh_namespace(kubectl, request, prefix):
        kubectl("label", "namespace", ns, f"{WEBHOOK_LABEL}=on")
        kubectl("create", "serviceaccount", "agent", "-n", ns)
        kubectl(
            "create",
            "role",
            "agent",
            "-n",
            ns,
            "--verb=get,list,watch,patch",
            "--resource=pods,deployments,events",
        )
        kubectl(
            "create",
            "rolebinding",
            "agent",
            "-n",
            ns,
            "--role=agent",
            f"--serviceaccount={ns}:agent",
        )
        kubectl(
            "create",
            "rolebinding",
            "approver",
            "-n",
            ns,
            "--clusterrole=agentrun-approver",
            "--user=approver",
        )

        def may_approve(ns: str = ns) -> bool:
            answer = kubectl.as_user("approver")(
                "auth", "can-i", "patch", "toolapprovals.agentrun.dev", "-n", ns, check=False
            )
            return answer.stdout.strip() == "yes"

        wait_for("the approver's role binding to take effect", may_approve)
        yield ns


def create_target(kubectl: Kubectl, namespace: str, name: str) -> None:
    """A Deployment (no replicas, so no pods are needed) whose env the tool calls append to."""
    doc = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {"name": "c", "image": "nginx", "env": [{"name": "BASE", "value": "-"}]}
                    ]
                },
            },
        },
    }
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(doc))


def append_call(target: str, tag: str) -> dict[str, Any]:
    """The model's tool call that appends one env entry to ``target`` (not idempotent)."""
    return {
        "name": "k8s_patch",
        "arguments": {
            "kind": "Deployment",
            "name": target,
            "patchType": "json",
            "patch": [
                {
                    "op": "add",
                    "path": "/spec/template/spec/containers/0/env/-",
                    "value": {"name": ENV_NAME, "value": tag},
                }
            ],
        },
    }


@dataclass(frozen=True)
class Executions:
    """What the cluster says happened to a target Deployment."""

    tags: list[str]  # the env entries appended, in order
    generation: int

    def count(self, tag: str) -> int:
        return self.tags.count(tag)


def executions(kubectl: Kubectl, namespace: str, target: str) -> Executions:
    out = kubectl("get", "deployment", target, "-n", namespace, "-o", "json")
    body = json.loads(out.stdout)
    env = body["spec"]["template"]["spec"]["containers"][0].get("env") or []
    return Executions(
        tags=[e["value"] for e in env if e["name"] == ENV_NAME],
        generation=int(body["metadata"]["generation"]),
    )


def approvals_of(kubectl: Kubectl, namespace: str, run: str) -> list[dict[str, Any]]:
    out = kubectl(
        "get", "toolapprovals", "-n", namespace, "-l", f"agentrun.dev/run={run}", "-o", "json"
    )
    return list(json.loads(out.stdout)["items"])


def decide(kubectl: Kubectl, namespace: str, approval: str, decision: str) -> None:
    kubectl.as_user("approver")(
        "patch",
        "toolapproval",
        approval,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"decision": decision}}),
    )


def all_finished(
    kubectl: Kubectl, namespace: str, names: list[str], *, timeout: float
) -> dict[str, dict[str, Any]]:
    """Wait until every run is in a finished phase; their statuses by name."""

    def statuses() -> dict[str, dict[str, Any]] | None:
        out = kubectl("get", "agentruns", "-n", namespace, "-o", "json")
        items = {
            i["metadata"]["name"]: i.get("status") or {} for i in json.loads(out.stdout)["items"]
        }
        if all((items.get(n) or {}).get("phase") in FINISHED for n in names):
            return items
        return None

    def unfinished() -> str:
        out = kubectl("get", "agentruns", "-n", namespace, "-o", "json")
        return ", ".join(
            f"{i['metadata']['name']}={(i.get('status') or {}).get('phase')}"
            for i in json.loads(out.stdout)["items"]
            if (i.get("status") or {}).get("phase") not in FINISHED
        )

    try:
        result = wait_for(f"{len(names)} runs to finish", statuses, timeout=timeout, interval=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}; not finished: {unfinished()}") from None
    assert isinstance(result, dict)
    return result


# -- streams --------------------------------------------------------------------------------


class Tail:
    """New events of many runs, read with one XREAD from each run's last seen id."""

    def __init__(self, r: redis_sync.Redis, uids: dict[str, str]) -> None:
        self.r = r
        self.names = {uid: name for name, uid in uids.items()}
        self.cursors = {events.events_key(uid): "0-0" for uid in uids.values()}

    def skip_to_now(self) -> None:
        for key in self.cursors:
            last: Any = self.r.xrevrange(key, count=1)
            if last:
                self.cursors[key] = last[0][0].decode()

    def awaiting(self) -> list[str]:
        """Runs whose last event says they wait for an approval now."""
        out = []
        for key in self.cursors:
            last: Any = self.r.xrevrange(key, count=1)
            if last:
                ev = events.decode(*last[0])
                if ev["type"] == "workflow" and ev["data"]["state"] == "awaiting_approval":
                    out.append(self.names[ev["uid"]])
        return out

    def wait(self, what: str, pred: Any, *, timeout: float) -> tuple[str, dict[str, Any]] | None:
        """The first new event (run name, event) matching ``pred``; None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            block = max(1, int(min(0.5, deadline - time.monotonic()) * 1000))
            streams: Any = dict(self.cursors)
            reply: Any = self.r.xread(streams, block=block, count=500) or []
            for key, entries in reply:
                k = key.decode()
                for event_id, fields in entries:
                    self.cursors[k] = event_id.decode()
                    ev = events.decode(event_id, fields)
                    if pred(ev):
                        return self.names[ev["uid"]], ev
        return None


def redis_ids(r: redis_sync.Redis, uid: str) -> list[str]:
    entries: Any = r.xrange(events.events_key(uid))
    return [i.decode() for i, _ in entries]


@dataclass
class Follower:
    """One SSE viewer of one run that reconnects with Last-Event-ID until the run's `end`.

    Every message it gets is kept (``got``: ids, ``seqs``), so the test can check it against
    the stream in Redis: no gap, no duplicate.
    """

    url: str
    token: str
    rng: random.Random
    # After this many messages it drops the connection itself (None: only when cut off).
    drop_after: tuple[int, int] | None = None
    use_query: bool = False
    got: list[str] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    end: dict[str, Any] | None = None  # the `end` event, once it came
    connects: int = 0
    cut: int = 0  # streams that broke off (server killed) rather than ended or dropped
    refused: int = 0
    done: bool = False

    async def run(self, http: httpx.AsyncClient, *, deadline: float) -> None:
        while not self.done:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.url}: no end after {self.connects} connections, {len(self.got)} events"
                )
            headers = {"Authorization": f"Bearer {self.token}"}
            url = self.url
            last = self.got[-1] if self.got else None
            if last is not None and self.use_query:
                url = f"{url}?lastEventId={last}"
            elif last is not None:
                headers["Last-Event-ID"] = last
            budget = self.rng.randint(*self.drop_after) if self.drop_after else None
            streaming = False
            try:
                async with http.stream("GET", url, headers=headers) as resp:
                    if resp.status_code == 204:  # nothing more will come: we have the end
                        self.done = True
                        return
                    if resp.status_code in (502, 503):
                        self.refused += 1
                        await asyncio.sleep(0.05)
                        continue
                    assert resp.status_code == 200, (resp.status_code, await resp.aread())
                    self.connects += 1
                    streaming = True
                    async for msg in client.messages(resp):
                        if msg.id is None:
                            assert msg.event == "heartbeat", msg
                            continue
                        self.got.append(msg.id)
                        self.seqs.append(int(msg.json()["seq"]))
                        if msg.event == "end":
                            self.end = msg.json()
                            self.done = True
                            return
                        if budget is not None:
                            budget -= 1
                            if budget <= 0:
                                break  # a client going away by itself (tab closed, network)
            except (httpx.TransportError, httpx.RemoteProtocolError):
                if streaming:
                    self.cut += 1
                else:
                    self.refused += 1
                await asyncio.sleep(0.05)  # the server is down: as EventSource, retry

    def faults(self, expected: list[str]) -> tuple[int, int]:
        """(gaps, duplicates) against the ids in Redis."""
        dupes = len(self.got) - len(set(self.got))
        gaps = len(set(expected) - set(self.got))
        # seq says the same without Redis: 1, 2, 3... with nothing missing or repeated.
        dupes = max(dupes, len(self.seqs) - len(set(self.seqs)))
        gaps = max(gaps, (max(self.seqs, default=0) - len(set(self.seqs))))
        return gaps, dupes


# -- many viewers, in processes of their own -------------------------------------------------

SEQ = re.compile(rb'"seq":(\d+)')
SENT_AT = re.compile(rb'"sentAt":([0-9.]+)')


def clock() -> float:
    """CLOCK_MONOTONIC: system-wide on Linux, so a writer and viewers in other processes
    compare their readings (delivery latency on one machine)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


async def _view(
    port: int, path: str, token: str, opened: asyncio.Event
) -> tuple[list[int], list[float]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(head.decode(errors="replace"))
    opened.set()
    seqs: list[int] = []
    lags: list[float] = []
    while line := await reader.readline():
        if not line.startswith(b"data: "):
            continue
        now = clock()
        seq = SEQ.search(line)
        if seq is None:
            continue  # a heartbeat
        seqs.append(int(seq.group(1)))
        sent = SENT_AT.search(line)
        if sent is not None:
            lags.append(now - float(sent.group(1)))
        if b'"type":"end"' in line:
            break
    writer.close()
    return seqs, lags


def viewer_process(port: int, path: str, token: str, n: int, pipe: Any) -> None:
    """``n`` viewers that read as fast as they can; sends "open" once all streams are open,
    then each viewer's (seqs, latencies) when the run has ended."""

    async def main() -> list[tuple[list[int], list[float]]]:
        opened = [asyncio.Event() for _ in range(n)]
        tasks = [asyncio.create_task(_view(port, path, token, o)) for o in opened]
        async with asyncio.timeout(60):
            await asyncio.gather(*(o.wait() for o in opened))
        pipe.send("open")
        return list(await asyncio.gather(*tasks))

    pipe.send(asyncio.run(main()))
    pipe.close()
