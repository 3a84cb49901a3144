"""MCPServers on real parts: MCP servers written with the official SDK (tests/mcp_support.py,
over real sockets), the admission webhook server, and the operator process discovering
their tools with the official client.

Covers: a URL outside the operator's allow-list refused at admission; agentrun-editor cannot
write MCPServers, agentrun-mcp-admin can; discovery over streamable HTTP and HTTP+SSE
(status Ready, tools with annotations and schema hashes, spec.tools filtering, the printer
columns); tools/list_changed followed; an unreachable server (Ready False, lastError, an
Event); auth: serviceAccountToken (the server sees the discovery account, checked by
TokenReview); header values from a Secret read as the discovery account.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis as redis_sync
from mcp_support import API_KEY, SECRET_B64, MCPServers

from agentrun_operator import mcpclient

from support import (
    Kubectl,
    OperatorProcess,
    Script,
    bind_roles,
    create_run,
    marker,
    stream,
    wait_event,
    wait_for,
    wait_phase,
)


@pytest.fixture
def namespace(op_namespace: str, kubectl: Kubectl) -> str:
    bind_roles(kubectl, op_namespace, [("creator", "agentrun-editor")])
    kubectl(
        "create",
        "rolebinding",
        "madmin",
        "-n",
        op_namespace,
        "--clusterrole=agentrun-mcp-admin",
        "--user=madmin",
    )

    def may() -> bool:
        found = kubectl(
            "--as=madmin",
            "auth",
            "can-i",
            "create",
            "mcpservers.agentrun.dev",
            "-n",
            op_namespace,
            check=False,
        )
        return found.stdout.strip() == "yes"

    wait_for("the MCP admin binding", may)
    return op_namespace


pytestmark = pytest.mark.usefixtures("operator_log_on_failure")


def server_doc(name: str, url: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": name},
        "spec": {"url": url, **spec},
    }


def create(kubectl: Kubectl, namespace: str, doc: dict[str, Any], *flags: str) -> Any:
    return kubectl(*flags, "apply", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)


def status_of(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    proc = kubectl("get", "mcpserver", name, "-n", namespace, "-o", "json")
    return dict(json.loads(proc.stdout).get("status") or {})


def wait_ready(kubectl: Kubectl, namespace: str, name: str, ready: str = "True") -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        st = status_of(kubectl, namespace, name)
        found = [c for c in st.get("conditions") or [] if c.get("type") == "Ready"]
        return st if found and found[0]["status"] == ready else None

    st = wait_for(f"MCPServer {name} Ready={ready}", reached, timeout=30)
    assert isinstance(st, dict)
    return st


def test_an_mcp_server_outside_the_allow_list_is_refused_at_admission(
    kubectl: Kubectl, namespace: str
) -> None:
    proc = create(kubectl, namespace, server_doc("elsewhere", "https://mcp.example.com/mcp"))
    assert proc.returncode != 0
    assert "spec.url https://mcp.example.com/mcp is not in the operator's allow-list" in proc.stderr


def test_editors_cannot_write_mcp_servers_and_mcp_admins_can(
    kubectl: Kubectl, namespace: str, mcp: MCPServers
) -> None:
    doc = server_doc("tools", mcp.open.url)
    proc = create(kubectl.as_user("creator"), namespace, doc)
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), proc.stderr
    assert kubectl.as_user("creator")("get", "mcpservers", "-n", namespace).returncode == 0
    proc = create(kubectl, namespace, doc, "--as=madmin")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("transport", ["streamable-http", "sse"])
def test_the_operator_lists_the_tools_with_their_hints_and_schema_hashes(
    kubectl: Kubectl, namespace: str, mcp: MCPServers, transport: str
) -> None:
    url = mcp.open.url if transport == "streamable-http" else mcp.sse.url
    doc = server_doc("tools", url, transport=transport, tools=["get_pod", "delete_pod", "sl*"])
    assert create(kubectl, namespace, doc).returncode == 0
    st = wait_ready(kubectl, namespace, "tools")
    tools = {t["name"]: t for t in st["tools"]}
    assert sorted(tools) == ["delete_pod", "get_pod", "slow"], "spec.tools filters them"
    assert st["toolCount"] == 3 and st["observedGeneration"] == 1
    assert st["serverName"].startswith("test-tools")
    assert tools["get_pod"]["annotations"] == {"title": "Get a pod", "readOnlyHint": True}
    assert tools["delete_pod"]["annotations"]["destructiveHint"] is True
    schema = tools["get_pod"]["inputSchema"]
    assert schema["required"] == ["namespace", "name"]
    assert tools["get_pod"]["schemaHash"] == mcpclient.schema_hash(schema)
    assert tools["get_pod"]["description"] == "Describe a pod."
    columns = kubectl("get", "mcp", "-n", namespace).stdout
    assert "READY" in columns and "True" in columns and url in columns


def test_a_tool_added_at_runtime_shows_after_list_changed(
    kubectl: Kubectl, namespace: str, mcp: MCPServers
) -> None:
    assert create(kubectl, namespace, server_doc("growing", mcp.open.url)).returncode == 0
    st = wait_ready(kubectl, namespace, "growing")
    before = {t["name"] for t in st["tools"]}
    added = f"tool_{namespace.replace('-', '_')}"

    async def add() -> None:
        ep = mcpclient.Endpoint(url=mcp.open.url)
        result = await mcpclient.call_tool(ep, "add_tool", {"name": added})
        assert not result.is_error, result

    asyncio.run(add())

    def grew() -> bool:
        return added in {t["name"] for t in status_of(kubectl, namespace, "growing")["tools"]}

    # Well within the refresh period (30 s here): the notification, not a poll.
    wait_for("the added tool in status", grew, timeout=10)
    assert before < {t["name"] for t in status_of(kubectl, namespace, "growing")["tools"]}


def test_an_unreachable_server_is_not_ready_and_says_why(
    kubectl: Kubectl, namespace: str, dead_endpoint: str
) -> None:
    assert create(kubectl, namespace, server_doc("gone", dead_endpoint)).returncode == 0
    st = wait_ready(kubectl, namespace, "gone", ready="False")
    assert "unreachable" in st["lastError"] and dead_endpoint in st["lastError"]
    events = kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    assert "MCPServerUnreachable" in events


def test_a_service_account_token_reaches_the_server_as_the_discovery_account(
    kubectl: Kubectl, namespace: str, mcp: MCPServers
) -> None:
    kubectl("create", "serviceaccount", "mcp-discovery", "-n", namespace)
    doc = server_doc(
        "k8s-aware",
        mcp.token.url,
        auth="serviceAccountToken",
        discoveryServiceAccountName="mcp-discovery",
    )
    assert create(kubectl, namespace, doc).returncode == 0
    st = wait_ready(kubectl, namespace, "k8s-aware")
    assert [t["name"] for t in st["tools"]] == ["whoami"]
    # Without a token the same server refuses, and the status says so.
    doc = server_doc("tokenless", mcp.token.url)
    assert create(kubectl, namespace, doc).returncode == 0
    st = wait_ready(kubectl, namespace, "tokenless", ready="False")
    assert "refused the credentials" in st["lastError"], st


def test_header_values_come_from_a_secret_read_as_the_discovery_account(
    kubectl: Kubectl, namespace: str, mcp: MCPServers
) -> None:
    kubectl(
        "create",
        "secret",
        "generic",
        "mcp-key",
        "-n",
        namespace,
        f"--from-literal=key={API_KEY}",
    )
    headers = [{"name": "X-Api-Key", "secretKeyRef": {"name": "mcp-key", "key": "key"}}]
    doc = server_doc("keyed", mcp.keyed.url, headers=headers)
    assert create(kubectl, namespace, doc).returncode == 0
    # The namespace's default account may not read the Secret yet: refused, and said so.
    st = wait_ready(kubectl, namespace, "keyed", ready="False")
    assert "cannot build the request identity" in st["lastError"], st
    assert API_KEY not in json.dumps(st)
    kubectl("create", "role", "read-key", "-n", namespace, "--verb=get", "--resource=secrets")
    kubectl(
        "create",
        "rolebinding",
        "read-key",
        "-n",
        namespace,
        "--role=read-key",
        f"--serviceaccount={namespace}:default",
    )
    st = wait_ready(kubectl, namespace, "keyed", ready="True")
    assert st["toolCount"] >= 5
    assert API_KEY not in json.dumps(st)


# -- runs using MCP tools ------------------------------------------------------------------


def ready_server(kubectl: Kubectl, namespace: str, name: str, url: str, **spec: Any) -> None:
    assert create(kubectl, namespace, server_doc(name, url, **spec)).returncode == 0
    wait_ready(kubectl, namespace, name)


def calling(script: Script, name: str, *calls: dict[str, Any]) -> str:
    return script.add(
        marker(name), [{"text": "plan"}, {"tool_calls": list(calls)}, {"text": "done"}]
    )


def tool_events(r: redis_sync.Redis, uid: str) -> list[dict[str, Any]]:
    return [e["data"] for e in stream(r, uid) if e["type"] == "tool"]


def test_a_read_only_mcp_tool_runs_freely_and_a_destructive_one_waits_for_approval(
    kubectl: Kubectl, namespace: str, mcp: MCPServers, script: Script, r: redis_sync.Redis
) -> None:
    bind_roles(kubectl, namespace, [("approver", "agentrun-approver")])
    ready_server(kubectl, namespace, "tools", mcp.open.url)
    goal = calling(
        script,
        "mcp-run",
        {"name": "tools__get_pod", "arguments": {"namespace": namespace, "name": "web"}},
        {"name": "tools__delete_pod", "arguments": {"namespace": namespace, "name": "web"}},
    )
    uid = create_run(kubectl, namespace, "mcp-run", goal=goal, tools=["mcp:tools/*"])
    st = wait_phase(kubectl, namespace, "mcp-run", "AwaitingApproval", "Failed", "Succeeded")
    assert st["phase"] == "AwaitingApproval", st
    pinned = {t["function"]: t for t in st["effective"]["mcpTools"]}
    assert pinned["tools__get_pod"]["readOnly"] is True
    assert pinned["tools__delete_pod"]["schemaHash"].startswith("sha256:")
    approvals = json.loads(
        kubectl("get", "ta", "-n", namespace, "-l", "agentrun.dev/run=mcp-run", "-o", "json").stdout
    )["items"]
    assert [a["spec"]["tool"] for a in approvals] == ["tools__delete_pod"]
    assert approvals[0]["spec"]["server"] == "tools"
    # The turn's calls run together once people have decided; nothing ran yet.
    assert ("delete_pod", {"namespace": namespace, "name": "web"}) not in mcp.record.calls
    name = approvals[0]["metadata"]["name"]
    proc = kubectl.as_user("approver")(
        "patch",
        "ta",
        name,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"decision":"Approved"}}',
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert wait_phase(kubectl, namespace, "mcp-run", "Succeeded", "Failed")["phase"] == "Succeeded"
    assert ("delete_pod", {"namespace": namespace, "name": "web"}) in mcp.record.calls
    assert ("get_pod", {"namespace": namespace, "name": "web"}) in mcp.record.calls
    done = {e["name"]: e for e in tool_events(r, uid) if e["status"] == "succeeded"}
    assert done["tools__get_pod"]["server"] == "tools"
    assert done["tools__get_pod"]["result"] == [f"pod {namespace}/web is Running"]
    assert done["tools__delete_pod"]["result"] == [f"deleted pod {namespace}/web"]


def test_bad_mcp_arguments_fail_naming_the_argument_and_nobody_is_asked(
    kubectl: Kubectl, namespace: str, mcp: MCPServers, script: Script, r: redis_sync.Redis
) -> None:
    ready_server(kubectl, namespace, "tools", mcp.open.url)
    goal = calling(script, "mcp-bad", {"name": "tools__delete_pod", "arguments": {"namespace": 3}})
    uid = create_run(kubectl, namespace, "mcp-bad", goal=goal, tools=["mcp:tools/delete_pod"])
    assert wait_phase(kubectl, namespace, "mcp-bad", "Succeeded", "Failed")["phase"] == "Succeeded"
    [failed] = [e for e in tool_events(r, uid) if e["status"] != "started"]
    assert failed["status"] == "failed", failed
    error = failed["result"]["error"]
    assert error.startswith("tools__delete_pod: argument") or "'name' is a required" in error, error
    assert kubectl("get", "ta", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_results_summarise_images_and_errors_come_back_as_tool_errors(
    kubectl: Kubectl, namespace: str, mcp: MCPServers, script: Script, r: redis_sync.Redis
) -> None:
    ready_server(kubectl, namespace, "tools", mcp.open.url)
    goal = calling(
        script,
        "mcp-media",
        {"name": "tools__media", "arguments": {}},
        {"name": "tools__fail", "arguments": {"reason": "quota exceeded"}},
    )
    uid = create_run(kubectl, namespace, "mcp-media", goal=goal, tools=["mcp:tools/*"])
    assert (
        wait_phase(kubectl, namespace, "mcp-media", "Succeeded", "Failed")["phase"] == "Succeeded"
    )
    done = {e["name"]: e for e in tool_events(r, uid) if e["status"] != "started"}
    text, image, resource = done["tools__media"]["result"]
    assert text == "a picture"
    assert image == {"type": "image", "mimeType": "image/png", "bytes": 1008}
    assert resource == {
        "type": "resource",
        "uri": "k8s://team/pod/web",
        "mimeType": "text/yaml",
        "text": "kind: Pod",
    }
    assert done["tools__fail"]["status"] == "failed"
    assert "quota exceeded" in done["tools__fail"]["result"]["error"]


def test_a_run_naming_a_tool_its_server_does_not_offer_fails_at_once(
    kubectl: Kubectl, namespace: str, mcp: MCPServers
) -> None:
    ready_server(kubectl, namespace, "tools", mcp.open.url, tools=["get_pod"])
    create_run(kubectl, namespace, "missing", goal="g", tools=["mcp:tools/delete_pod"])
    st = wait_phase(kubectl, namespace, "missing", "Failed", "Succeeded")
    assert st["phase"] == "Failed"
    assert "offers no tool delete_pod (it offers: get_pod)" in st["message"], st
    create_run(kubectl, namespace, "nowhere", goal="g", tools=["mcp:absent/*"])
    st = wait_phase(kubectl, namespace, "nowhere", "Failed", "Succeeded")
    assert f"MCPServer {namespace}/absent does not exist" in st["message"], st


def test_stop_during_a_slow_mcp_call_cancels_it_on_the_server_at_once(
    kubectl: Kubectl, namespace: str, mcp: MCPServers, script: Script, r: redis_sync.Redis
) -> None:
    ready_server(kubectl, namespace, "tools", mcp.open.url)
    tag = f"stop-{namespace}"
    goal = calling(
        script,
        "mcp-slow",
        {"name": "tools__slow", "arguments": {"steps": 600, "delay": 0.05, "tag": tag}},
    )
    uid = create_run(kubectl, namespace, "slow", goal=goal, tools=["mcp:tools/slow"])
    progress = wait_event(
        r,
        uid,
        "a progress event",
        lambda e: e["type"] == "tool" and e["data"]["status"] == "progress",
    )
    assert progress["data"]["server"] == "tools" and progress["data"]["result"]["total"] == 600
    stopped_at = time.monotonic()
    kubectl("patch", "ar", "slow", "-n", namespace, "--type=merge", "-p", '{"spec":{"stop":true}}')
    wait_for("the server to see the cancellation", lambda: tag in mcp.record.cancelled, timeout=5)
    seen = mcp.record.cancelled[tag] - stopped_at
    assert seen < 1.0, f"the server saw the cancellation {seen:.2f}s after the stop"
    st = wait_phase(kubectl, namespace, "slow", "Stopped", "Failed", "Succeeded", timeout=10)
    assert st["phase"] == "Stopped"
    took = time.monotonic() - stopped_at
    assert took < 2.0, f"Stopped {took:.2f}s after the stop"
    cancelled = [e for e in tool_events(r, uid) if e["status"] == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0]["server"] == "tools", tool_events(r, uid)


def test_a_kubernetes_aware_server_sees_the_runs_own_service_account(
    kubectl: Kubectl,
    namespace: str,
    mcp: MCPServers,
    script: Script,
    r: redis_sync.Redis,
    agent_sa: str,
) -> None:
    ready_server(kubectl, namespace, "k8s", mcp.token.url, auth="serviceAccountToken")
    goal = calling(script, "mcp-who", {"name": "k8s__whoami", "arguments": {}})
    uid = create_run(
        kubectl, namespace, "who", goal=goal, tools=["mcp:k8s/whoami"], serviceAccountName=agent_sa
    )
    assert wait_phase(kubectl, namespace, "who", "Succeeded", "Failed")["phase"] == "Succeeded"
    done = [e for e in tool_events(r, uid) if e["status"] == "succeeded"]
    assert done[0]["result"] == [f"system:serviceaccount:{namespace}:{agent_sa}"], done


# -- the reference server (@modelcontextprotocol/server-everything, npm) -------------------


def test_the_reference_server_its_annotations_progress_and_content_kinds(
    kubectl: Kubectl, namespace: str, mcp: MCPServers, script: Script, r: redis_sync.Redis
) -> None:
    ready_server(kubectl, namespace, "everything", mcp.everything.url)
    tools = {t["name"]: t for t in status_of(kubectl, namespace, "everything")["tools"]}
    long_op = tools["trigger-long-running-operation"]
    assert long_op["annotations"]["readOnlyHint"] is True
    assert long_op["annotations"]["idempotentHint"] is True
    assert "duration" in long_op["inputSchema"]["properties"]
    goal = calling(
        script,
        "everything",
        {
            "name": "everything__trigger-long-running-operation",
            "arguments": {"duration": 1, "steps": 4},
        },
        {"name": "everything__get-tiny-image", "arguments": {}},
        {"name": "everything__echo", "arguments": {"message": "hello"}},
    )
    uid = create_run(
        kubectl,
        namespace,
        "everything",
        goal=goal,
        tools=[
            "mcp:everything/trigger-long-running-operation",
            "mcp:everything/get-tiny-image",
            "mcp:everything/echo",
        ],
    )
    st = wait_phase(kubectl, namespace, "everything", "Succeeded", "Failed", timeout=60)
    assert st["phase"] == "Succeeded", st
    events = tool_events(r, uid)
    progress = [e["result"] for e in events if e["status"] == "progress"]
    assert progress and progress[-1] == {"progress": 4, "total": 4}, progress
    done = {e["name"]: e for e in events if e["status"] == "succeeded"}
    assert (
        "Long running operation completed"
        in done["everything__trigger-long-running-operation"]["result"][0]
    )
    image = [p for p in done["everything__get-tiny-image"]["result"] if isinstance(p, dict)]
    assert image and image[0]["type"] == "image" and image[0]["mimeType"] == "image/png"
    assert image[0]["bytes"] > 0
    assert done["everything__echo"]["result"] == ["Echo: hello"]


def test_after_a_crash_a_changing_mcp_call_is_reported_unknown_never_repeated(
    kubectl: Kubectl,
    namespace: str,
    mcp: MCPServers,
    script: Script,
    r: redis_sync.Redis,
    operator: OperatorProcess,
) -> None:
    ready_server(kubectl, namespace, "tools", mcp.open.url, approval={"drain": "never"})
    node = f"node-{namespace}"
    goal = calling(
        script, "mcp-crash", {"name": "tools__drain", "arguments": {"node": node, "seconds": 30}}
    )
    uid = create_run(kubectl, namespace, "crash", goal=goal, tools=["mcp:tools/drain"])
    wait_for("the drain to start on the server", lambda: f"drain-{node}" in mcp.record.started)
    operator.kill()
    operator.start()
    st = wait_phase(kubectl, namespace, "crash", "Succeeded", "Failed", timeout=60)
    assert st["phase"] == "Succeeded", st
    outcomes = [e for e in tool_events(r, uid) if e["status"] not in ("started", "progress")]
    assert [e["status"] for e in outcomes] == ["unknown"], outcomes
    assert "not repeated" in outcomes[0]["result"]["error"]
    assert mcp.record.calls.count(("drain", {"node": node})) == 1, "it ran once"


def test_secret_data_in_mcp_results_and_arguments_never_reaches_the_stream(
    kubectl: Kubectl, namespace: str, mcp: MCPServers, script: Script, r: redis_sync.Redis
) -> None:
    ready_server(kubectl, namespace, "tools", mcp.open.url)
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "x"},
        "data": {"k": SECRET_B64},
    }
    goal = calling(
        script,
        "mcp-secret",
        {"name": "tools__get_secret", "arguments": {"name": "db"}},
        # An argument carrying a Secret manifest as text (the result does not echo it).
        {"name": "tools__slow", "arguments": {"steps": 1, "delay": 0, "tag": json.dumps(manifest)}},
    )
    uid = create_run(kubectl, namespace, "secret", goal=goal, tools=["mcp:tools/*"])
    assert wait_phase(kubectl, namespace, "secret", "Succeeded", "Failed")["phase"] == "Succeeded"
    raw = json.dumps(stream(r, uid))
    assert SECRET_B64 not in raw, "a Secret's data reached the stream"
    done = {e["name"]: e for e in tool_events(r, uid) if e["status"] == "succeeded"}
    assert "password" in done["tools__get_secret"]["result"][0], "the key stays visible"


def test_naming_a_discovery_account_needs_the_right_to_use_it(
    kubectl: Kubectl, namespace: str, mcp: MCPServers
) -> None:
    kubectl("create", "serviceaccount", "powerful", "-n", namespace)
    doc = server_doc("borrowed", mcp.token.url, discoveryServiceAccountName="powerful")
    proc = create(kubectl, namespace, doc, "--as=madmin")
    assert proc.returncode != 0
    assert "madmin may not have MCP servers reached as service account" in proc.stderr, proc.stderr
    assert "spec.discoveryServiceAccountName" in proc.stderr and "agentrun-sa-user" in proc.stderr
