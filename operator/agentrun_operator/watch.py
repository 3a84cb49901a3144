"""``agentrun watch NS/NAME``: print a run's events live in the terminal.

Owns rendering events for people. Reads the run's stream from the first event (or an id)
and follows it until ``end``: through the agentrun SSE server with the person's own
Kubernetes token (the server checks it against the API server, as for the web UI), or,
as an explicit development option, straight from Redis. Never writes anything.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
from typing import Any, TextIO

import httpx

from agentrun_operator import events, kube, sseclient
from agentrun_operator.store import RunStore

_COLOURS = {"workflow": "36", "tool": "33", "approval": "35", "fault": "31", "end": "32"}


class Renderer:
    def __init__(self, out: TextIO, *, colour: bool) -> None:
        self.out = out
        self.colour = colour
        self._in_tokens = False

    def _paint(self, kind: str, text: str) -> str:
        code = _COLOURS.get(kind)
        return f"\033[{code}m{text}\033[0m" if self.colour and code else text

    def line(self, kind: str, text: str) -> None:
        if self._in_tokens:
            self.out.write("\n")
            self._in_tokens = False
        self.out.write(self._paint(kind, text) + "\n")

    def event(self, event: dict[str, Any]) -> None:
        kind, data = event.get("type", "?"), event.get("data") or {}
        if kind == "token":
            self.out.write(str(data.get("text", "")))
            self._in_tokens = True
        elif kind == "workflow":
            self.line(
                kind,
                f"── {data.get('state')} (node {data.get('node') or '-'}, step {data.get('step')})",
            )
        elif kind == "tool":
            detail = json.dumps(data.get("arguments", {}), separators=(",", ":"))
            line = f"⚙ {data.get('name')} {detail} → {data.get('status')}"
            if data.get("status") not in ("started", None):
                result = json.dumps(data.get("result"), default=str)
                line += f" {result[:300]}{'…' if len(result) > 300 else ''}"
            self.line(kind, line)
        elif kind == "approval":
            self.line(
                kind,
                f"✋ approval {data.get('approval')} for {data.get('tool')}: "
                f"{data.get('state')} {data.get('decidedBy') or ''}".rstrip(),
            )
        elif kind == "metrics":
            self.line(
                kind,
                f"  tokens in/out {data.get('inputTokens')}/{data.get('outputTokens')}"
                f" ttft {data.get('ttftMs')}ms cost ${data.get('costUSD')}",
            )
        elif kind == "fault":
            self.line(kind, f"✗ {data.get('code')}: {data.get('message')}")
        elif kind == "end":
            self.line(kind, f"■ {data.get('phase')}")
            if data.get("result"):
                self.line("end", str(data["result"]))
        self.out.flush()


class WatchError(Exception):
    """Why the stream cannot be watched, said so that the person can fix it."""


async def watch_server(
    *,
    namespace: str,
    name: str,
    server: str,
    token: str | None = None,
    out: TextIO = sys.stdout,
    colour: bool | None = None,
) -> str | None:
    """Follow the run's stream through the SSE server until ``end``; return the end phase.

    The token is the person's own (``token``, else their kubeconfig's): the server opens the
    stream only for someone the API server lets read the AgentRun."""
    parts = urllib.parse.urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WatchError(f"--server {server}: expected an http:// or https:// URL")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
        raise WatchError(
            f"--server {server}: your Kubernetes token would cross the network in clear "
            "text; use https://, or a port-forward to 127.0.0.1"
        )
    if token is None:
        try:
            k = await kube.Kube.from_env()
        except Exception as e:  # no kubeconfig, or one the client cannot load
            raise WatchError(
                f"cannot read your kubeconfig ({type(e).__name__}: {e}); pass --token"
            ) from None
        try:
            token = k.bearer_token()
        finally:
            await k.close()
        if token is None:
            raise WatchError(
                "your kubeconfig authenticates without a bearer token (a client "
                "certificate?); the agentrun server needs one: pass --token (e.g. "
                "$(kubectl create token NAME)), or set AGENTRUN_TOKEN"
            )
    quote = urllib.parse.quote
    url = f"{server.rstrip('/')}/api/v1/runs/{quote(namespace, safe='')}/{quote(name, safe='')}"
    render = Renderer(out, colour=out.isatty() if colour is None else colour)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as http:
        try:
            async for msg in sseclient.follow(
                http, url + "/events", headers=headers, retry_delay=0.5
            ):
                if msg.event == "heartbeat" or msg.event not in _KNOWN:
                    continue
                event = msg.json()
                render.event(event)
                if event.get("type") == "end":
                    return str((event.get("data") or {}).get("phase"))
        except httpx.HTTPStatusError as e:
            raise WatchError(_refusal(e.response, namespace, name, server)) from None
        except (httpx.TransportError, ConnectionError) as e:
            raise WatchError(f"cannot reach the agentrun server at {server}: {e}") from None
    return None


_KNOWN = frozenset({"workflow", "token", "tool", "approval", "metrics", "fault", "end"})


def _refusal(response: httpx.Response, namespace: str, name: str, server: str) -> str:
    code = response.status_code
    if code == 401:
        return f"the agentrun server at {server} did not accept your token (401)"
    if code == 403:
        return f"you may not read AgentRun {namespace}/{name} (403 from the API server)"
    if code == 404:
        return f"AgentRun {namespace}/{name} not found (or {server} is not an agentrun server)"
    return f"the agentrun server at {server} answered {code}"


async def watch(
    *,
    namespace: str,
    name: str,
    redis_url: str,
    after: str = "0-0",
    out: TextIO = sys.stdout,
    colour: bool | None = None,
    block_ms: int = 5000,
) -> str | None:
    """Development only: follow the run's stream straight from Redis until ``end``."""
    k = await kube.Kube.from_env()
    try:
        body = await k.get_agentrun(namespace=namespace, name=name)
    finally:
        await k.close()
    if body is None:
        raise SystemExit(f"agentrun watch: AgentRun {namespace}/{name} not found")
    uid = body["metadata"]["uid"]
    render = Renderer(out, colour=out.isatty() if colour is None else colour)
    store = RunStore(events.connect(redis_url, max_connections=2))
    last = after
    try:
        while True:
            for event in await store.read_events(uid, after=last, block_ms=block_ms):
                last = event["id"]
                render.event(event)
                if event.get("type") == "end":
                    return str((event.get("data") or {}).get("phase"))
    finally:
        await store.close()
