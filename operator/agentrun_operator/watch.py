"""``agentrun watch NS/NAME``: print a run's events live in the terminal, from Redis.

Owns rendering events for people. Reads the run's stream from the first event (or an id)
and follows it until ``end``. Never writes anything.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from agentrun_operator import events, kube

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
    """Follow the run's stream until ``end``; return the end phase."""
    k = await kube.Kube.from_env()
    try:
        body = await k.get_agentrun(namespace=namespace, name=name)
    finally:
        await k.close()
    if body is None:
        raise SystemExit(f"agentrun watch: AgentRun {namespace}/{name} not found")
    uid = body["metadata"]["uid"]
    render = Renderer(out, colour=out.isatty() if colour is None else colour)
    redis = events.connect(redis_url, max_connections=2)
    last = after
    try:
        while True:
            reply: Any = await redis.xread(
                {events.events_key(uid): last}, block=block_ms, count=500
            )
            for _stream, entries in reply or []:
                for event_id, fields in entries:
                    event = events.decode(event_id, fields)
                    last = event["id"]
                    render.event(event)
                    if event.get("type") == "end":
                        return str((event.get("data") or {}).get("phase"))
    finally:
        await redis.aclose()
