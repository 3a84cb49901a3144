"""Pure parts of agentrun_sse.auth, settings and bodies: where the token comes from, CSRF
binding, log redaction, the short run cache, settings validation (no-auth only on loopback,
typos named), and request bodies turned into an AgentRun."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from starlette.requests import Request

from agentrun_sse import auth, bodies, openapi, settings


def request(
    *, method: str = "GET", headers: dict[str, str] | None = None, query: str = ""
) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request(
        {
            "type": "http",
            "method": method,
            "path": "/",
            "headers": raw,
            "query_string": query.encode(),
        }
    )


def test_the_token_comes_from_the_header_then_the_query_then_the_cookie() -> None:
    both = {"Authorization": "Bearer h", "Cookie": f"{auth.SESSION_COOKIE}=c"}
    assert auth.caller(request(headers=both), mode="kubernetes") == auth.Caller("h", "header")
    assert auth.caller(request(query="access_token=q"), mode="kubernetes").source == "query"
    cookie = {"Cookie": f"{auth.SESSION_COOKIE}=c"}
    assert auth.caller(request(headers=cookie), mode="kubernetes") == auth.Caller("c", "cookie")
    assert auth.caller(request(), mode="none") == auth.Caller(None, "none")


@pytest.mark.parametrize(
    ("method", "headers", "query"),
    [
        ("GET", {}, ""),
        ("GET", {"Authorization": "Basic eDp5"}, ""),
        ("GET", {"Authorization": "Bearer "}, ""),
        ("POST", {}, "access_token=q"),  # a token in the URL is for reads only
    ],
)
def test_no_usable_token_is_a_401(method: str, headers: dict[str, str], query: str) -> None:
    with pytest.raises(auth.AuthError) as e:
        auth.caller(request(method=method, headers=headers, query=query), mode="kubernetes")
    assert e.value.status == 401


def test_cookie_writes_need_the_csrf_token_bound_to_the_session() -> None:
    who = auth.Caller("secret", "cookie")
    with pytest.raises(auth.AuthError):
        auth.check_csrf(request(method="POST"), who)
    with pytest.raises(auth.AuthError):
        auth.check_csrf(request(method="POST", headers={"X-CSRF-Token": auth.csrf_token("x")}), who)
    auth.check_csrf(
        request(method="POST", headers={"X-CSRF-Token": auth.csrf_token("secret")}), who
    )
    auth.check_csrf(request(method="POST"), auth.Caller("secret", "header"))  # not forgeable
    assert "secret" not in auth.csrf_token("secret") and "secret" not in repr(who)


def test_logins_from_another_site_are_refused() -> None:
    assert auth.same_origin(request(headers={"Sec-Fetch-Site": "same-origin"}))
    assert not auth.same_origin(request(headers={"Sec-Fetch-Site": "cross-site"}))
    assert auth.same_origin(request(headers={"Origin": "http://a:1", "Host": "a:1"}))
    assert not auth.same_origin(request(headers={"Origin": "http://evil", "Host": "a:1"}))
    assert auth.same_origin(request())  # curl and friends send neither


def test_access_tokens_are_redacted_in_log_lines() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s"',
        ("ip", "GET", "/x?a=1&access_token=s3cr3t&b=2"),
        None,
    )
    auth.RedactingFilter().filter(record)
    assert record.getMessage() == 'ip - "GET /x?a=1&access_token=[REDACTED]&b=2"'
    assert auth.redact("/x?ACCESS%5FTOKEN=abc") == "/x?ACCESS%5FTOKEN=[REDACTED]"


def test_the_run_cache_forgets_after_its_ttl_and_is_bounded() -> None:
    cache = auth.RunCache(ttl=60, size=2)
    for i in range(3):
        cache.put(("t", "ns", str(i)), {"i": i})
    assert cache.get(("t", "ns", "0")) is None and cache.get(("t", "ns", "2")) == {"i": 2}
    expired = auth.RunCache(ttl=-1)
    expired.put(("t", "ns", "x"), {})
    assert expired.get(("t", "ns", "x")) is None


def test_settings_flags_override_the_environment(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://1.2.3.4:6443',\n"
        "  certificate-authority: ca.crt}}]\n"
        "users: [{name: u, user: {token: abc}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    env = {
        "KUBECONFIG": str(kubeconfig),
        "AGENTRUN_SSE_PORT": "9000",
        "AGENTRUN_HEARTBEAT_SECONDS": "2",
    }
    conf = settings.load(env, argv=["--port", "9100"])
    assert (conf.port, conf.heartbeat_seconds, conf.auth, conf.host) == (
        9100,
        2.0,
        "kubernetes",
        "0.0.0.0",
    )
    assert conf.kube == settings.KubeTarget(
        server="https://1.2.3.4:6443", ca_file=str(tmp_path / "ca.crt")
    )
    assert conf.kube.token is None  # the caller's token, never the kubeconfig's


@pytest.mark.parametrize(
    ("env", "argv", "named"),
    [
        ({"AGENTRUN_AUTH": "nope"}, [], "AGENTRUN_AUTH"),
        ({"AGENTRUN_SSE_PORT": "http"}, [], "AGENTRUN_SSE_PORT"),
        ({"AGENTRUN_HEARTBEAT_SECONDS": "0"}, [], "AGENTRUN_HEARTBEAT_SECONDS"),
        ({"AGENTRUN_SSE_HOTS": "x"}, [], "AGENTRUN_SSE_HOTS"),
        ({"AGENTRUN_HEARTBEAT_SECOND": "1"}, [], "AGENTRUN_HEARTBEAT_SECONDS"),
        ({"AGENTRUN_AUTH": "none", "AGENTRUN_SSE_HOST": "0.0.0.0"}, [], "loopback"),
        ({}, ["--no-auth", "--host", "10.0.0.5"], "loopback"),
        ({"AGENTRUN_REDIS_URL": "http://x"}, [], "AGENTRUN_REDIS_URL"),
        ({"AGENTRUN_TRACE_URL": "https://jaeger/trace/"}, [], "AGENTRUN_TRACE_URL"),
        ({"AGENTRUN_TRACE_URL": "jaeger/{traceId}"}, [], "AGENTRUN_TRACE_URL"),
    ],
)
def test_bad_settings_stop_the_start_naming_the_variable(
    env: dict[str, str], argv: list[str], named: str
) -> None:
    with pytest.raises(settings.ConfigError, match=named):
        settings.load({"KUBERNETES_SERVICE_HOST": "10.0.0.1", **env}, argv=argv)


def test_the_operators_variables_pass_through() -> None:
    conf = settings.load(
        {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "AGENTRUN_NAMESPACES": "a"}, argv=[]
    )
    assert conf.kube is not None and conf.kube.server == "https://10.0.0.1:443"


def test_a_chat_body_becomes_an_agentrun_with_only_what_was_given() -> None:
    body = bodies.ChatRequest.model_validate(
        {"goal": "g", "namespace": "ns", "tools": ["k8s_get"], "serviceAccountName": "sa"}
    )
    assert body.agentrun() == {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "AgentRun",
        "metadata": {"namespace": "ns", "generateName": "chat-"},
        "spec": {"goal": "g", "tools": ["k8s_get"], "serviceAccountName": "sa"},
    }


def test_the_openapi_document_resolves_every_reference() -> None:
    doc = openapi.document()
    schemas = doc["components"]["schemas"]

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        assert ref.split("/")[-1] in schemas, ref
    assert set(schemas["ChatRequest"]["required"]) == {"goal", "namespace"}
