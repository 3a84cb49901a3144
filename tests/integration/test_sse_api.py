"""The SSE server's API as each test user: every call to Kubernetes carries the caller's own
token, so the real kube-apiserver's RBAC answers.

Covers: 401 without a token or with a bad one and 403 without rights on every endpoint; a
viewer with a Role granting `get agentruns` can watch; list and get; stop (spec.stop on the
CR, checked with kubectl, and the message on the control channel); chat creating a run as
the caller with the first event naming it; approvals patching the ToolApproval's decision
and streaming the continuation; 422/415/413 on bad requests; the login cookie (HttpOnly,
SameSite=Strict) with its CSRF token; the access_token query parameter redacted in access
logs; the --no-auth mode; the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from redis import asyncio as aioredis

from agentrun_harness import sse as sse_harness
from agentrun_harness.controlplane import ControlPlane
from agentrun_harness.redisserver import RedisServer
from agentrun_operator import events
from agentrun_sse import auth, settings

from sse_support import create_run, sse_settings
from support import Kubectl


def create_approval(kubectl: Kubectl, namespace: str, *, run: str, call_id: str) -> str:
    name = f"{run}-{call_id}"
    manifest = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "ToolApproval",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"agentrun.dev/run": run, "agentrun.dev/call-id": call_id},
        },
        "spec": {
            "runName": run,
            "callId": call_id,
            "tool": "k8s_scale",
            "arguments": {"kind": "Deployment", "name": "web", "replicas": 3},
            "reason": "more traffic",
        },
    }
    kubectl("create", "-f", "-", input=json.dumps(manifest))
    return name


def grant(kubectl: Kubectl, namespace: str, *, user: str, rules: list[dict[str, object]]) -> None:
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": f"sse-{user}", "namespace": namespace},
        "rules": rules,
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": f"sse-{user}", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"sse-{user}"},
        "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
    }
    kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"kind": "List", "apiVersion": "v1", "items": [role, binding]}),
    )


def rule(resource: str, *verbs: str) -> dict[str, object]:
    return {"apiGroups": ["agentrun.dev"], "resources": [resource], "verbs": list(verbs)}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


def bearer(cluster: ControlPlane, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {cluster.token(user)}"}


API = "/api/v1"
APPROVE = {"namespace": "NS", "decision": "approve"}


def endpoints(ns: str) -> list[tuple[str, str, object]]:
    return [
        ("GET", f"{API}/runs?namespace={ns}", None),
        ("GET", f"{API}/runs/{ns}/r1", None),
        ("GET", f"{API}/runs/{ns}/r1/events", None),
        ("POST", f"{API}/runs/{ns}/r1/stop", None),
        ("POST", f"{API}/agent/chat?stream=false", {"goal": "g", "namespace": ns}),
        (
            "POST",
            f"{API}/agent/approvals/c-000000000001?stream=false",
            {**APPROVE, "namespace": ns},
        ),
        ("POST", f"{API}/runs/{ns}/r1/approvals/c-000000000001?stream=false", {"decision": "deny"}),
    ]


async def test_every_endpoint_answers_401_without_a_token_or_with_a_bad_one(
    server: sse_harness.LiveServer, http: httpx.AsyncClient, kubectl: Kubectl, namespace: str
) -> None:
    create_run(kubectl, namespace)
    create_approval(kubectl, namespace, run="r1", call_id="c-000000000001")
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic eDp5"}):
        for method, path, body in endpoints(namespace):
            r = await http.request(method, server.url + path, json=body, headers=headers)
            assert r.status_code == 401, (headers, method, path, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["status"] == 401


async def test_every_endpoint_answers_403_to_a_user_without_rights(
    server: sse_harness.LiveServer,
    http: httpx.AsyncClient,
    cluster: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
) -> None:
    create_run(kubectl, namespace)
    create_approval(kubectl, namespace, run="r1", call_id="c-000000000001")
    for method, path, body in endpoints(namespace):
        r = await http.request(
            method, server.url + path, json=body, headers=bearer(cluster, "nobody")
        )
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["reason"] == "Forbidden"


async def test_a_viewer_with_a_role_to_get_runs_can_watch_but_not_stop(
    server: sse_harness.LiveServer,
    http: httpx.AsyncClient,
    cluster: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    redis: aioredis.Redis,
) -> None:
    uid = create_run(kubectl, namespace)
    grant(kubectl, namespace, user="viewer", rules=[rule("agentruns", "get")])
    op = await sse_harness.FakeOperator(redis, uid=uid, run=f"{namespace}/r1").start()
    await op.tokens(2)
    viewer = bearer(cluster, "viewer")
    r = await http.get(f"{server.url}{API}/runs/{namespace}/r1", headers=viewer)
    assert r.status_code == 200
    assert r.json()["summary"]["uid"] == uid
    url = f"{server.url}{events.stream_path(namespace, 'r1')}"
    async with sse_harness.StreamTap(http, url, headers=viewer) as tap:
        assert tap.status == 200
        assert [m.json()["seq"] for m in await tap.take(2)] == [1, 2]
    r = await http.post(f"{server.url}{API}/runs/{namespace}/r1/stop", headers=viewer)
    assert r.status_code == 403
    r = await http.get(f"{server.url}{API}/runs?namespace={namespace}", headers=viewer)
    assert r.status_code == 403  # the Role grants get, not list


async def test_list_and_get_runs_as_the_caller(
    server: sse_harness.LiveServer,
    http: httpx.AsyncClient,
    cluster: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
) -> None:
    uid = create_run(kubectl, namespace, "r1")
    create_run(kubectl, namespace, "r2")
    r = await http.get(
        f"{server.url}{API}/runs?namespace={namespace}", headers=bearer(cluster, "admin")
    )
    assert r.status_code == 200
    items = {i["name"]: i for i in r.json()["items"]}
    assert set(items) == {"r1", "r2"}
    assert items["r1"]["uid"] == uid
    assert items["r1"]["phase"] == "Pending"
    assert items["r1"]["streamPath"] == events.stream_path(namespace, "r1")
    r = await http.get(f"{server.url}{API}/runs/{namespace}/nope", headers=bearer(cluster, "admin"))
    assert r.status_code == 404


async def test_stop_patches_spec_stop_and_publishes_on_the_control_channel(
    server: sse_harness.LiveServer,
    http: httpx.AsyncClient,
    cluster: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    redis: aioredis.Redis,
) -> None:
    uid = create_run(kubectl, namespace)
    pubsub = redis.pubsub()
    await pubsub.subscribe(events.control_key(uid))
    try:
        await pubsub.get_message(timeout=5)  # the subscribe confirmation
        r = await http.post(
            f"{server.url}{API}/runs/{namespace}/r1/stop", headers=bearer(cluster, "admin")
        )
        assert r.status_code == 202, r.text
        assert r.json()["uid"] == uid and r.json()["stop"] is True
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None, "nothing published on the control channel"
        assert json.loads(message["data"]) == {"action": "stop", "by": r.json()["by"]}
    finally:
        await pubsub.aclose()
    stop = kubectl("get", "agentrun", "r1", "-n", namespace, "-o", "jsonpath={.spec.stop}")
    assert stop.stdout == "true"


async def test_chat_creates_the_run_as_the_caller_and_streams_it_run_first(
    server: sse_harness.LiveServer,
    http: httpx.AsyncClient,
    cluster: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    redis: aioredis.Redis,
) -> None:
    creator = bearer(cluster, "creator")
    body = {
        "goal": "count the pods",
        "namespace": namespace,
        "tools": ["k8s_list"],
        "limits": {"maxSteps": 5},
    }
    r = await http.post(f"{server.url}{API}/agent/chat?stream=false", json=body, headers=creator)
    assert r.status_code == 403, "creator has no Role yet"
    grant(kubectl, namespace, user="creator", rules=[rule("agentruns", "create", "get")])
    async with sse_harness.StreamTap(
        http, f"{server.url}{API}/agent/chat", method="POST", json=body, headers=creator
    ) as tap:
        assert tap.status == 201
        first = await tap.next()
        assert first.event == "run" and first.id is None
        named = first.json()
        assert named["namespace"] == namespace and named["name"].startswith("chat-")
        got = kubectl("get", "agentrun", named["name"], "-n", namespace, "-o", "json")
        obj = json.loads(got.stdout)
        assert obj["metadata"]["uid"] == named["uid"]
        assert obj["spec"]["goal"] == "count the pods"
        assert obj["spec"]["tools"] == ["k8s_list"]
        assert obj["spec"]["limits"]["maxSteps"] == 5
        op = await sse_harness.FakeOperator(
            redis, uid=named["uid"], run=f"{namespace}/{named['name']}"
        ).start()
        await op.emit("workflow", {"state": "planning", "node": "plan", "step": 1})
        await op.tokens(2)
        await op.end()
        rest = await tap.until_closed()
        assert [m.event for m in rest] == ["workflow", "token", "token", "end"]
    # A named run, answered as JSON; the API server's schema judges nested fields.
    r = await http.post(
        f"{server.url}{API}/agent/chat",
        json={**body, "name": "mine"},
        headers={**creator, "Accept": "application/json"},
    )
    assert r.status_code == 201 and r.json()["name"] == "mine"
    r = await http.post(
        f"{server.url}{API}/agent/chat?stream=false",
        json={**body, "limits": {"maxSteps": 0}},
        headers=creator,
    )
    assert r.status_code == 422 and "maxSteps" in r.text


async def test_approvals_patch_the_decision_and_stream_the_continuation(
    server: sse_harness.LiveServer,
    http: httpx.AsyncClient,
    cluster: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    redis: aioredis.Redis,
) -> None:
    uid = create_run(kubectl, namespace)
    first = create_approval(kubectl, namespace, run="r1", call_id="c-0000000000aa")
    second = create_approval(kubectl, namespace, run="r1", call_id="c-0000000000bb")
    grant(
        kubectl,
        namespace,
        user="approver",
        rules=[rule("toolapprovals", "list", "patch"), rule("agentruns", "get")],
    )
    op = await sse_harness.FakeOperator(redis, uid=uid, run=f"{namespace}/r1").start()
    await op.emit("approval", {"callId": "c-0000000000aa", "approval": first, "state": "pending"})
    approver = bearer(cluster, "approver")
    url = f"{server.url}{API}/agent/approvals/c-0000000000aa"
    decision = {"namespace": namespace, "decision": "approve", "comment": "go ahead"}
    async with sse_harness.StreamTap(
        http, url, method="POST", json=decision, headers=approver
    ) as tap:
        assert tap.status == 200, tap.body
        spec = json.loads(kubectl("get", "ta", first, "-n", namespace, "-o", "json").stdout)["spec"]
        # (No admission webhook judges this namespace: the SSE server's own part is the
        # patch it sends, as the person.)
        assert spec["decision"] == "Approved" and spec["comment"] == "go ahead"
        await op.emit(
            "approval", {"callId": "c-0000000000aa", "approval": first, "state": "approved"}
        )
        await op.emit(
            "tool", {"callId": "c-0000000000aa", "name": "k8s_scale", "status": "succeeded"}
        )
        await op.end()
        rest = await tap.until_closed()
        # The continuation only: from the end as it was before the decision.
        assert [m.json()["seq"] for m in rest] == [2, 3, 4]
    r = await http.post(
        f"{server.url}{API}/runs/{namespace}/r1/approvals/c-0000000000bb?stream=false",
        json={"decision": "deny"},
        headers=approver,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "namespace": namespace,
        "approval": second,
        "callId": "c-0000000000bb",
        "run": "r1",
        "decision": "Denied",
    }
    out = kubectl("get", "ta", second, "-n", namespace, "-o", "jsonpath={.spec.decision}")
    assert out.stdout == "Denied"
    r = await http.post(
        f"{server.url}{API}/runs/{namespace}/other/approvals/c-0000000000bb?stream=false",
        json={"decision": "deny"},
        headers=approver,
    )
    assert r.status_code == 404  # the call belongs to another run
    r = await http.post(
        f"{server.url}{API}/agent/approvals/c-0000000000cc?stream=false",
        json={"namespace": namespace, "decision": "deny"},
        headers=approver,
    )
    assert r.status_code == 404


async def test_bad_requests_get_422_415_and_413(
    server: sse_harness.LiveServer, http: httpx.AsyncClient, cluster: ControlPlane, namespace: str
) -> None:
    admin = bearer(cluster, "admin")
    chat = f"{server.url}{API}/agent/chat?stream=false"
    r = await http.post(chat, json={"namespace": namespace}, headers=admin)
    assert r.status_code == 422
    assert ["body", "goal"] in [d["loc"] for d in r.json()["detail"]]
    r = await http.post(chat, json={"goal": "g", "namespace": "Not_A_Namespace"}, headers=admin)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "namespace"]
    r = await http.post(chat, json={"goal": "g", "namespace": namespace, "goall": 1}, headers=admin)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "goall"]
    r = await http.post(
        chat, content=b"{not json", headers={**admin, "Content-Type": "application/json"}
    )
    assert r.status_code == 422
    r = await http.post(
        f"{server.url}{API}/agent/approvals/c-000000000001",
        json={"namespace": namespace, "decision": "maybe"},
        headers=admin,
    )
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "decision"]
    r = await http.post(
        f"{server.url}{API}/agent/approvals/c-000000000001",
        json={"decision": "deny"},
        headers=admin,
    )
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "namespace"]
    r = await http.post(chat, content=b"goal=g", headers={**admin, "Content-Type": "text/plain"})
    assert r.status_code == 415
    big = json.dumps({"goal": "x" * 70_000, "namespace": namespace}).encode()
    r = await http.post(chat, content=big, headers={**admin, "Content-Type": "application/json"})
    assert r.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        for _ in range(20):
            yield b" " * 4096

    r = await http.post(
        chat, content=chunks(), headers={**admin, "Content-Type": "application/json"}
    )
    assert r.status_code == 413
    r = await http.get(f"{server.url}{API}/runs/{namespace}/BAD_NAME", headers=admin)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "name"]
    r = await http.get(f"{server.url}{API}/runs/{namespace}/r1/events?replay=some", headers=admin)
    assert r.status_code == 422
    r = await http.get(
        f"{server.url}{API}/runs/{namespace}/r1/events", headers={**admin, "Last-Event-ID": "x"}
    )
    assert r.status_code == 422


async def test_the_login_cookie_streams_and_writes_need_its_csrf_token(
    server: sse_harness.LiveServer, cluster: ControlPlane, kubectl: Kubectl, namespace: str
) -> None:
    create_run(kubectl, namespace)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as browser:
        r = await browser.post("/login", json={"token": "wrong"})
        assert r.status_code == 401
        r = await browser.post(
            "/login",
            json={"token": cluster.token("admin")},
            headers={"Sec-Fetch-Site": "cross-site"},
        )
        assert r.status_code == 403
        r = await browser.post("/login", data={"token": cluster.token("admin")})  # the form
        assert r.status_code == 303
        cookies = r.headers.get_list("set-cookie")
        session = next(c for c in cookies if c.startswith(f"{auth.SESSION_COOKIE}="))
        assert "HttpOnly" in session and "SameSite=strict" in session and "Path=/" in session
        csrf = browser.cookies[auth.CSRF_COOKIE]
        url = events.stream_path(namespace, "r1")
        async with sse_harness.StreamTap(browser, url) as tap:
            assert tap.status == 200
            await tap.heartbeat()
        r = await browser.post(f"{API}/runs/{namespace}/r1/stop")
        assert r.status_code == 403 and "CSRF" in r.text
        r = await browser.post(
            f"{API}/runs/{namespace}/r1/stop", headers={"X-CSRF-Token": "forged"}
        )
        assert r.status_code == 403
        r = await browser.post(f"{API}/runs/{namespace}/r1/stop", headers={"X-CSRF-Token": csrf})
        assert r.status_code == 202
        r = await browser.post("/logout")
        assert r.status_code == 200
        assert (await browser.get(f"{API}/runs/{namespace}/r1")).status_code == 401


async def test_access_token_in_the_query_works_for_reads_and_is_redacted_in_logs(
    cluster: ControlPlane,
    redis_server: RedisServer,
    http: httpx.AsyncClient,
    kubectl: Kubectl,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    create_run(kubectl, namespace)
    token = cluster.token("admin")
    caplog.set_level(logging.INFO)
    async with sse_harness.LiveServer(
        sse_settings(cluster, redis_server.url), access_log=True
    ) as s:
        url = f"{s.url}{events.stream_path(namespace, 'r1')}?replay=all&access_token={token}"
        async with sse_harness.StreamTap(http, url) as tap:
            assert tap.status == 200
            await tap.heartbeat()
        r = await http.get(f"{s.url}{API}/runs?access%5Ftoken={token}&namespace={namespace}")
        assert r.status_code == 200
        r = await http.post(f"{s.url}{API}/runs/{namespace}/r1/stop?access_token={token}")
        assert r.status_code == 401, "a token in the URL is for reads only"
    access = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert any("/events?replay=all&access_token=[REDACTED]" in line for line in access), access
    assert any("access%5Ftoken=[REDACTED]" in line for line in access), access
    # Nothing the server logged holds the token (this test's own client logs its URLs).
    server_side = [r for r in caplog.records if not (r.name == "httpx" and s.url in r.getMessage())]
    assert not [r.getMessage() for r in server_side if token in r.getMessage()]


async def test_no_auth_mode_uses_the_servers_kubeconfig_on_loopback_only(
    cluster: ControlPlane,
    redis_server: RedisServer,
    http: httpx.AsyncClient,
    kubectl: Kubectl,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    create_run(kubectl, namespace)
    env = {"KUBECONFIG": str(cluster.kubeconfig("admin")), "AGENTRUN_REDIS_URL": redis_server.url}
    with pytest.raises(settings.ConfigError, match="loopback"):
        settings.load(env, argv=["--no-auth", "--host", "0.0.0.0"])
    conf = settings.load(env, argv=["--no-auth"])
    assert conf.host == "127.0.0.1" and conf.auth == "none"
    assert conf.kube is not None and conf.kube.token == cluster.token("admin")
    caplog.set_level(logging.WARNING)
    async with sse_harness.LiveServer(conf) as s:
        assert any("NO AUTHENTICATION" in r.getMessage() for r in caplog.records)
        r = await http.get(f"{s.url}{API}/runs?namespace={namespace}")
        assert r.status_code == 200 and [i["name"] for i in r.json()["items"]] == ["r1"]
        # DNS rebinding: a page whose own name resolves to 127.0.0.1 sends its Host.
        rebound = await http.get(
            f"{s.url}{API}/runs?namespace={namespace}", headers={"Host": "attacker.example"}
        )
        assert rebound.status_code == 400 and "r1" not in rebound.text
        for name in ("localhost:8080", "[::1]:8080", "127.0.0.1"):
            local = await http.get(f"{s.url}/healthz", headers={"Host": name})
            assert local.status_code == 200, name


async def test_probes_and_the_openapi_document(
    server: sse_harness.LiveServer, http: httpx.AsyncClient
) -> None:
    assert (await http.get(f"{server.url}/healthz")).text == "ok"
    assert (await http.get(f"{server.url}/readyz")).status_code == 200
    doc = (await http.get(f"{server.url}/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    for path in (
        "/api/v1/runs",
        "/api/v1/runs/{ns}/{name}",
        "/api/v1/runs/{ns}/{name}/events",
        "/api/v1/runs/{ns}/{name}/stop",
        "/api/v1/runs/{ns}/{name}/approvals/{call_id}",
        "/api/v1/agent/chat",
        "/api/v1/agent/approvals/{call_id}",
    ):
        assert path in doc["paths"], path
    page = await http.get(f"{server.url}/")
    assert page.status_code == 200 and "<title>agentrun</title>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert (await http.get(f"{server.url}/static/app.js")).status_code == 200


async def test_two_viewers_stop_concurrently_without_trouble(
    server: sse_harness.LiveServer,
    http: httpx.AsyncClient,
    cluster: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
) -> None:
    create_run(kubectl, namespace)
    url = f"{server.url}{API}/runs/{namespace}/r1/stop"
    answers = await asyncio.gather(
        *(http.post(url, headers=bearer(cluster, "admin")) for _ in range(2))
    )
    assert [a.status_code for a in answers] == [202, 202]
