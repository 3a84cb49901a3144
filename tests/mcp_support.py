"""Real MCP servers for the tests, written with the official SDK and served by uvicorn on
127.0.0.1 (each in a thread, on its own port), so the operator's client code runs against
the real protocol:

- ``open``: tools with annotations (a read-only one, a destructive one), a slow tool that
  reports progress and records its cancellation, a tool that fails, a tool returning an
  image and a resource, and one that adds a tool at runtime (``tools/list_changed``);
- ``sse``: the same server over the older HTTP+SSE transport;
- ``token``: requires a bearer token, verified by the control plane's TokenReview, and
  answers ``whoami`` with the identity it carried;
- ``keyed``: requires the header ``X-Api-Key``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mcp.types as types
import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from starlette.types import ASGIApp, Receive, Scope, Send

from agentrun_harness.controlplane import free_port

API_KEY = "s3cret-key"
SECRET_B64 = "aHVudGVyMi10b3Atc2VjcmV0"  # base64 of "hunter2-top-secret"


@dataclass
class Record:
    """What the servers saw, for the tests to assert on (one process: no IPC)."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    cancelled: dict[str, float] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    identities: list[str] = field(default_factory=list)
    sessions: list[Any] = field(default_factory=list)
    # The W3C traceparent header of each get_pod call (None: the client sent none).
    traceparents: list[str | None] = field(default_factory=list)


def tool_server(name: str, record: Record, **kwargs: Any) -> MCPServer:
    async def remember_sessions(ctx: Any, call_next: Any) -> Any:
        # Every connected client (e.g. the operator's, which only lists tools) gets
        # tools/list_changed: the SDK keeps no list of sessions to broadcast to.
        if all(ctx.session is not s for s in record.sessions):
            record.sessions.append(ctx.session)
        return await call_next(ctx)

    server = MCPServer(
        name, version="1.0", log_level="WARNING", middleware=[remember_sessions], **kwargs
    )
    read_only = types.ToolAnnotations(read_only_hint=True, title="Get a pod")
    destructive = types.ToolAnnotations(read_only_hint=False, destructive_hint=True)

    @server.tool(annotations=read_only)
    async def get_pod(namespace: str, name: str, ctx: Context) -> str:
        """Describe a pod."""
        record.calls.append(("get_pod", {"namespace": namespace, "name": name}))
        record.traceparents.append((ctx.headers or {}).get("traceparent"))
        return f"pod {namespace}/{name} is Running"

    @server.tool(annotations=destructive)
    async def delete_pod(namespace: str, name: str) -> str:
        """Delete a pod."""
        record.calls.append(("delete_pod", {"namespace": namespace, "name": name}))
        return f"deleted pod {namespace}/{name}"

    @server.tool(annotations=types.ToolAnnotations(read_only_hint=True))
    async def slow(steps: int, delay: float, tag: str, ctx: Context) -> str:
        """Count slowly, reporting progress."""
        record.started[tag] = time.monotonic()
        try:
            for i in range(steps):
                await ctx.report_progress(i + 1, steps, f"step {i + 1} of {steps}")
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            record.cancelled[tag] = time.monotonic()
            raise
        return f"counted to {steps}"

    @server.tool(annotations=destructive)
    async def drain(node: str, seconds: float, ctx: Context) -> str:
        """Drain a node, slowly (it changes something: never repeated after a crash)."""
        record.calls.append(("drain", {"node": node}))
        record.started[f"drain-{node}"] = time.monotonic()
        await asyncio.sleep(seconds)
        return f"drained {node}"

    @server.tool(annotations=read_only)
    async def get_secret(name: str) -> str:
        """A Secret, as YAML (as a Kubernetes MCP server answers)."""
        return (
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: " + name + "\n"
            "data:\n  password: " + SECRET_B64 + "\n"
        )

    @server.tool(annotations=read_only)
    async def fail(reason: str) -> str:
        """Fail with a reason."""
        raise ToolError(reason)

    @server.tool(annotations=read_only)
    async def media() -> list:  # type: ignore[type-arg]  # bare: no structured output
        """An image and a resource."""
        png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 1000
        res = types.EmbeddedResource(
            type="resource",
            resource=types.TextResourceContents(
                uri="k8s://team/pod/web", mime_type="text/yaml", text="kind: Pod"
            ),
        )
        return ["a picture", Image(data=png, format="png"), res]

    @server.tool()
    async def add_tool(name: str, ctx: Context) -> str:
        """Add a tool at runtime (then say tools/list_changed)."""

        async def added() -> str:
            return f"I am {name}"

        server.add_tool(added, name=name, description="added at runtime")
        for session in list(record.sessions):
            try:
                await session.send_tool_list_changed()
            except Exception:  # a session that is gone
                pass
        return "added"

    return server


class _RequireKey:
    """401 unless the request carries X-Api-Key."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            if headers.get(b"x-api-key", b"").decode() != API_KEY:
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"missing X-Api-Key"})
                return
        await self.app(scope, receive, send)


class TokenReviewVerifier:
    """Bearer tokens checked by the control plane (TokenReview, as admin)."""

    def __init__(self, api: str, ca_file: str, admin_token: str, record: Record) -> None:
        self.api, self.admin_token, self.record = api, admin_token, record
        self.ctx = ssl.create_default_context(cafile=ca_file)

    async def verify_token(self, token: str) -> AccessToken | None:
        return await asyncio.to_thread(self._review, token)

    def _review(self, token: str) -> AccessToken | None:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        }
        req = urllib.request.Request(
            f"{self.api}/apis/authentication.k8s.io/v1/tokenreviews",
            data=json.dumps(body).encode(),
            method="POST",
            headers={
                "Authorization": f"Bearer {self.admin_token}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(req, context=self.ctx, timeout=10) as r:
            status = json.loads(r.read()).get("status") or {}
        if not status.get("authenticated"):
            return None
        user = str((status.get("user") or {}).get("username") or "")
        return AccessToken(token=token, client_id=user, scopes=[], subject=user)


def token_server(verifier: TokenReviewVerifier, record: Record) -> MCPServer:
    server = MCPServer(
        "token-tools",
        version="1.0",
        log_level="WARNING",
        token_verifier=verifier,
        auth=AuthSettings(issuer_url="https://kubernetes.default.svc", resource_server_url=None),
    )

    @server.tool(annotations=types.ToolAnnotations(read_only_hint=True))
    async def whoami() -> str:
        """Who the caller is, as the control plane says."""
        token = get_access_token()
        who = token.subject if token is not None else "anonymous"
        record.identities.append(str(who))
        return str(who)

    return server


@dataclass
class Served:
    url: str  # the MCP endpoint
    base: str  # scheme://host:port, for the allow-list


@contextmanager
def serve(app: ASGIApp, path: str) -> Iterator[Served]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the test MCP server at port {port} did not start")
        time.sleep(0.02)
    try:
        yield Served(url=f"http://127.0.0.1:{port}{path}", base=f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@dataclass
class MCPServers:
    record: Record
    open: Served
    sse: Served
    token: Served
    keyed: Served
    everything: Served

    @property
    def allow(self) -> str:
        served = (self.open, self.sse, self.token, self.keyed, self.everything)
        return ",".join(s.base for s in served)


@contextmanager
def mcp_servers(*, api: str, ca_file: str, admin_token: str, workdir: Path) -> Iterator[MCPServers]:
    record = Record()
    plain = tool_server("test-tools", record)
    over_sse = tool_server("test-tools-sse", record)
    keyed = tool_server("keyed-tools", record)
    verifier = TokenReviewVerifier(api, ca_file, admin_token, record)
    with (
        serve(plain.streamable_http_app(), "/mcp") as s_open,
        serve(over_sse.sse_app(), "/sse") as s_sse,
        serve(token_server(verifier, record).streamable_http_app(), "/mcp") as s_token,
        serve(_RequireKey(keyed.streamable_http_app()), "/mcp") as s_keyed,
        everything_server(workdir) as s_everything,
    ):
        yield MCPServers(
            record=record,
            open=s_open,
            sse=s_sse,
            token=s_token,
            keyed=s_keyed,
            everything=s_everything,
        )


EVERYTHING = Path(__file__).resolve().parent / "mcp" / "node_modules" / "@modelcontextprotocol"
EVERYTHING_MAIN = EVERYTHING / "server-everything" / "dist" / "index.js"


@contextmanager
def everything_server(workdir: Path) -> Iterator[Served]:
    """The reference server @modelcontextprotocol/server-everything (npm, from the committed
    tests/mcp/package-lock.json), over streamable HTTP, as its own Node.js process."""
    if not EVERYTHING_MAIN.exists():
        raise RuntimeError(
            f"{EVERYTHING_MAIN} is missing: run `make test` (it runs npm ci --prefix tests/mcp)"
        )
    port = free_port()
    log = (workdir / "server-everything.log").open("w")
    proc = subprocess.Popen(
        ["node", str(EVERYTHING_MAIN), "streamableHttp"],
        env={**os.environ, "PORT": str(port)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"server-everything did not listen on {port}: "
                    f"{(workdir / 'server-everything.log').read_text()[-2000:]}"
                )
            time.sleep(0.05)
        yield Served(url=f"http://127.0.0.1:{port}/mcp", base=f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
