"""Every run as one OpenTelemetry trace, read back from a real Jaeger (v2, built from the Go
module proxy) through its query API, as a user's tracing UI reads it.

An operator process of this module's own exports to Jaeger over OTLP HTTP/protobuf (runs in
``tr-*`` namespaces); covers: a run with a tool call and an approval is one trace, with the
run as its root, a span per workflow node, per LLM call (GenAI semantic conventions), per
tool call and for the wait for people; ``status.traceId`` and the ``workflow`` events carry
the trace id, and the model server sees each call's ``traceparent``; a run resumed after
kill -9 of the operator continues the same trace; a stop is a span with who stopped and the
latency; a collector that cannot be reached fails no run, and the spans it never got are
counted. Version-independent: these run on the newest Kubernetes only (CI time).
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_sync
from mcp_support import MCPServers

from agentrun_harness.controlplane import ControlPlane, free_port
from agentrun_harness.jaeger import Jaeger

from support import (
    Kubectl,
    OperatorProcess,
    Script,
    approved_scale,
    create_run,
    get_run,
    judged_namespace,
    marker,
    newest_only,
    own_operator,
    stream,
    wait_for,
    wait_phase,
)

pytestmark = newest_only("tracing does not depend on the Kubernetes version")


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    with Jaeger(workdir=tmp_path_factory.mktemp("jaeger")) as j:
        yield j


@pytest.fixture(scope="module")
def traced(
    cluster: ControlPlane,
    rbac: None,
    webhooks: Any,
    redis_server: Any,
    script: Script,
    jaeger: Jaeger,
    mcp: MCPServers,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    proc = own_operator(
        cluster, redis_url=redis_server.url, script=script, workdir=tmp_path_factory.mktemp("tr"),
        namespaces="tr-*", ident="op-tr",
        env={"AGENTRUN_OTEL_ENDPOINT": jaeger.otlp_url, "AGENTRUN_MCP_URL_ALLOW": mcp.allow},
    )  # fmt: skip
    with proc:
        yield proc


@pytest.fixture
def namespace(
    kubectl: Kubectl, request: pytest.FixtureRequest, traced: OperatorProcess
) -> Iterator[str]:
    yield from judged_namespace(kubectl, request, "tr-", ("tracing operator", traced))


def finished_trace(jaeger: Jaeger, trace_id: str, root: str) -> list[dict[str, Any]]:
    """The trace once its root span (recorded when the run ends) has arrived."""

    def arrived() -> list[dict[str, Any]] | None:
        spans = jaeger.trace(trace_id)
        return spans if any(s["name"] == root for s in spans) else None

    found = wait_for(f"trace {trace_id} with its root {root!r} in Jaeger", arrived, timeout=30)
    assert isinstance(found, list)
    return found


def by_name(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["name"] == name]


def test_a_run_with_a_tool_call_and_an_approval_is_one_trace(
    kubectl: Kubectl, namespace: str, script: Script, r: redis_sync.Redis, jaeger: Jaeger
) -> None:
    uid, approval, st = approved_scale(kubectl, namespace, script, "story")
    assert st["phase"] == "Succeeded", st
    trace_id = st["traceId"]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id), st

    spans = finished_trace(jaeger, trace_id, f"run {namespace}/story")
    assert {s["traceId"] for s in spans} == {trace_id}
    ids = {s["spanId"]: s for s in spans}
    (root,) = [s for s in spans if s["parent"] is None]
    assert root["name"] == f"run {namespace}/story"
    assert root["tags"]["agentrun.run.uid"] == uid
    assert root["tags"]["agentrun.run.phase"] == "Succeeded"
    assert root["tags"]["agentrun.run.created_by"] == "admin"
    assert root["tags"]["agentrun.usage.toolCalls"] == 1
    assert root["tags"]["agentrun.usage.llmCalls"] == 4  # plan, act, act, verify
    assert root["process"]["serviceName"] == "agentrun-operator"
    # Every other span belongs to the tree under the run.
    assert all(s["parent"] in ids for s in spans if s is not root), "a span outside the tree"

    nodes = [s for s in spans if s["name"].startswith("workflow ")]
    assert {s["name"] for s in nodes} == {
        f"workflow {n}" for n in ("plan", "act", "judge", "gate", "tools", "verify")
    }
    assert all(s["parent"] == root["spanId"] for s in nodes)

    chats = by_name(spans, "chat mock")
    assert len(chats) == 4, [s["name"] for s in spans]
    for chat in chats:
        assert ids[chat["parent"]]["name"] in ("workflow plan", "workflow act", "workflow verify")
        tags = chat["tags"]
        assert tags["gen_ai.operation.name"] == "chat"
        assert tags["gen_ai.request.model"] == "mock"
        assert tags["gen_ai.usage.input_tokens"] > 0 and tags["gen_ai.usage.output_tokens"] > 0
        assert "gen_ai.response.time_to_first_chunk" in tags
        assert tags["span.kind"] == "client"

    (tool,) = by_name(spans, "execute_tool k8s_scale")
    assert ids[tool["parent"]]["name"] == "workflow tools"
    events = stream(r, uid)
    (started,) = [
        e["data"] for e in events if e["type"] == "tool" and e["data"]["status"] == "started"
    ]
    assert tool["tags"]["gen_ai.tool.call.id"] == started["callId"]
    assert tool["tags"]["agentrun.tool.outcome"] == "succeeded"
    assert tool["tags"]["agentrun.target"] == f"Deployment {namespace}/web"
    assert tool["tags"]["agentrun.approval"] == approval

    (wait,) = by_name(spans, "approval k8s_scale")
    assert wait["parent"] == root["spanId"]
    assert wait["tags"]["agentrun.approval"] == approval
    assert wait["tags"]["agentrun.approval.outcome"] == "approved"
    assert wait["tags"]["agentrun.approval.decided_by"] == "approver"
    assert wait["tags"]["agentrun.approval.wait_seconds"] >= 0

    # The id is in the stream, and the model server saw each call's span (W3C traceparent).
    workflow = [e["data"] for e in events if e["type"] == "workflow"]
    assert workflow and all(w.get("traceId") == trace_id for w in workflow), workflow
    seen = [c["traceparent"] for c in script.llm.calls if trace_id in (c["traceparent"] or "")]
    assert len(seen) == 4, seen
    chat_ids = {c["spanId"] for c in chats}
    for header in seen:
        version, trace, parent, flags = header.split("-")
        assert (version, trace, flags) == ("00", trace_id, "01") and parent in chat_ids, header


def test_an_mcp_server_sees_the_tool_calls_span(
    kubectl: Kubectl, namespace: str, script: Script, jaeger: Jaeger, mcp: MCPServers
) -> None:
    server = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": "tools"},
        "spec": {"url": mcp.open.url},
    }
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(server))

    def ready() -> bool:
        out = kubectl("get", "mcp", "tools", "-n", namespace, "-o", "json")
        conditions = (json.loads(out.stdout).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    wait_for("MCPServer tools Ready", ready, timeout=30)
    get_pod = {"name": "tools__get_pod", "arguments": {"namespace": namespace, "name": "p"}}
    goal = script.add(
        marker("trace-mcp"), [{"text": "plan"}, {"tool_calls": [get_pod]}, {"text": "done"}]
    )
    before = len(mcp.record.traceparents)
    create_run(kubectl, namespace, "mcp", goal=goal, tools=["mcp:tools/get_pod"])
    st = wait_phase(kubectl, namespace, "mcp", "Succeeded", "Failed", timeout=60)
    assert st["phase"] == "Succeeded", st
    spans = finished_trace(jaeger, st["traceId"], f"run {namespace}/mcp")
    (tool,) = by_name(spans, "execute_tool tools__get_pod")
    assert tool["tags"]["agentrun.tool.server"] == "tools"
    (header,) = mcp.record.traceparents[before:]
    assert header is not None, "the MCP call carried no traceparent"
    _, trace_id, parent, _ = header.split("-")
    assert (trace_id, parent) == (st["traceId"], tool["spanId"])


def test_a_run_resumed_after_kill_9_stays_one_trace(
    kubectl: Kubectl,
    namespace: str,
    script: Script,
    jaeger: Jaeger,
    traced: OperatorProcess,
) -> None:
    words = " ".join(f"w{i}" for i in range(120))
    goal = script.add(
        marker("trace-kill"),
        [
            {"text": "Plan: talk."},
            {"text": f"Talking {words}", "tokens_per_second": 40},
            {"text": "done."},
        ],
    )
    create_run(kubectl, namespace, "kill", goal=goal)

    def known() -> str | None:
        return (get_run(kubectl, namespace, "kill").get("status") or {}).get("traceId")

    trace_id = wait_for("status.traceId", known, timeout=60)
    assert isinstance(trace_id, str)
    # The first process's spans reach Jaeger (plan is done), then it dies mid-act.
    wait_for(
        "the planning spans in Jaeger",
        lambda: by_name(jaeger.trace(trace_id), "workflow plan"),
        timeout=30,
    )
    traced.kill()
    traced.start()
    st = wait_phase(kubectl, namespace, "kill", "Succeeded", "Failed", timeout=90)
    assert st["phase"] == "Succeeded" and st["traceId"] == trace_id, st
    spans = finished_trace(jaeger, trace_id, f"run {namespace}/kill")
    roots = [s for s in spans if s["parent"] is None]
    assert [s["name"] for s in roots] == [f"run {namespace}/kill"], "one trace, one root"
    assert len(by_name(spans, "workflow plan")) == 1, "plan was not done again"
    # The act the kill cut short left no span (a gap); the resumed one and verify did.
    assert by_name(spans, "workflow act") and by_name(spans, "workflow verify")
    assert roots[0]["start"] <= min(s["start"] for s in spans), "the root began first"


def test_a_stop_is_a_span_with_who_stopped_and_the_latency(
    kubectl: Kubectl, namespace: str, script: Script, r: redis_sync.Redis, jaeger: Jaeger
) -> None:
    words = " ".join(f"w{i}" for i in range(2000))
    goal = script.add(marker("trace-stop"), [{"text": words, "tokens_per_second": 30}])
    uid = create_run(kubectl, namespace, "stopme", goal=goal)
    wait_for("tokens", lambda: any(e["type"] == "token" for e in stream(r, uid)), timeout=60)
    kubectl(
        "patch", "agentrun", "stopme", "-n", namespace, "--type=merge",
        "-p", '{"spec":{"stop":true}}',
    )  # fmt: skip
    st = wait_phase(kubectl, namespace, "stopme", "Stopped", timeout=30)
    spans = finished_trace(jaeger, st["traceId"], f"run {namespace}/stopme")
    (stop,) = by_name(spans, "stop")
    assert stop["tags"]["agentrun.stopped_by"] == "admin"
    assert 0 <= stop["tags"]["agentrun.stop.latency_ms"] < 2000
    (root,) = [s for s in spans if s["parent"] is None]
    assert stop["parent"] == root["spanId"]
    assert root["tags"]["agentrun.run.phase"] == "Stopped"
    assert root["tags"]["agentrun.run.stopped_by"] == "admin"


def dropped(proc: OperatorProcess) -> float:
    url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(r'agentrun_trace_spans_dropped_total\{reason="export_failed"\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_an_unreachable_collector_fails_no_run_and_lost_spans_are_counted(
    cluster: ControlPlane,
    rbac: None,
    webhooks: Any,
    redis_server: Any,
    kubectl: Kubectl,
    request: pytest.FixtureRequest,
    script: Script,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    proc = own_operator(
        cluster, redis_url=redis_server.url, script=script, workdir=tmp_path_factory.mktemp("trx"),
        namespaces="trx-*", ident="op-trx", env={"AGENTRUN_OTEL_ENDPOINT": nowhere},
    )  # fmt: skip
    with proc:
        for ns in judged_namespace(kubectl, request, "trx-", ("operator", proc)):
            goal = script.add(marker("trace-nowhere"), [{"text": "plan"}, {"text": "done"}])
            create_run(kubectl, ns, "lonely", goal=goal)
            st = wait_phase(kubectl, ns, "lonely", "Succeeded", "Failed", timeout=60)
            assert st["phase"] == "Succeeded", st
            assert re.fullmatch(r"[0-9a-f]{32}", st["traceId"])
            wait_for("the lost spans to be counted", lambda: dropped(proc) > 0, timeout=30)
            assert "traces: the collector at" in proc.log_tail(200)
