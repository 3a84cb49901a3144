"""MCP tools in a run: pinned when the run is first seen, offered to the model as functions
``<server>__<tool>``, their arguments checked against the tool's input schema before
anyone is asked, and called on the server as the run (its service account's header
Secrets and token), with progress in the stream and stop cancelling the call.

Owns the mapping between a run's ``mcp:<server>/<tool>`` references, the pinned tools in
``status.effective.mcpTools`` and the MCPServers' current status. Never: gates a call
(``judging``), or acts as the operator towards an MCP server.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema

from agentrun_operator import approvals, config, kube, mcpclient, mcpservers, models, policy, tools

PROGRESS_EVERY = 0.25  # seconds between two progress events of one call (coalesced)


class Unavailable(Exception):
    """A run names an MCP tool that cannot be offered; the message says why and the fix."""


def function_name(server: str, tool: str) -> str:
    """The function name the model sees: <server>__<tool>, as OpenAI allows names."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", f"{server}__{tool}")[:64]


def server_of(ref: str) -> tuple[str, str] | None:
    """(server, tool or '*') of an mcp:<server>/<tool> reference, else None."""
    if not ref.startswith(models.MCP_PREFIX):
        return None
    server, _, tool = ref[len(models.MCP_PREFIX) :].partition("/")
    return server, tool


async def _server(k8s: kube.Kube, namespace: str, name: str) -> dict[str, Any]:
    found = await k8s.get_mcpserver(namespace=namespace, name=name)
    if found is None:
        raise Unavailable(
            f"spec.tools: MCPServer {namespace}/{name} does not exist (kubectl get mcp -n "
            f"{namespace} lists those there are)"
        )
    return found


async def pin(k8s: kube.Kube, namespace: str, refs: list[str]) -> list[models.PinnedMCPTool]:
    """The MCP tools a run's spec.tools names, as their servers offer them now. Raises
    Unavailable (a server missing or not Ready, a tool it does not offer, two tools the
    model could not tell apart) and KubeError."""
    pinned: dict[str, models.PinnedMCPTool] = {}
    servers: dict[str, dict[str, Any]] = {}
    for ref in refs:
        parts = server_of(ref)
        if parts is None:
            continue
        name, wanted = parts
        if name not in servers:
            servers[name] = await _server(k8s, namespace, name)
        body = servers[name]
        st = body.get("status") or {}
        ready = [c for c in st.get("conditions") or [] if c.get("type") == "Ready"]
        if not ready or ready[0].get("status") != "True":
            why = st.get("lastError") or "it has not listed its tools yet"
            raise Unavailable(f"spec.tools: MCPServer {namespace}/{name} is not Ready ({why})")
        spec = models.MCPServerSpec.model_validate(body.get("spec") or {})
        offered = [models.MCPTool.model_validate(t) for t in st.get("tools") or []]
        chosen = [t for t in offered if wanted == "*" or t.name == wanted]
        if not chosen:
            names = ", ".join(t.name for t in offered) or "none"
            raise Unavailable(
                f"spec.tools: MCPServer {namespace}/{name} offers no tool {wanted} (it offers: "
                f"{names[:500]})"
            )
        for tool in chosen:
            fn = function_name(name, tool.name)
            approval = next(
                (
                    mode
                    for pattern, mode in spec.approval.items()
                    if policy.tool_matches(tool.name, [pattern])
                ),
                None,
            )
            entry = models.PinnedMCPTool(
                server=name,
                name=tool.name,
                function=fn,
                schema_hash=tool.schema_hash,
                read_only=bool(tool.annotations.read_only_hint),
                approval=approval,
            )
            other = pinned.get(fn)
            if other is not None and other.ref != entry.ref:
                raise Unavailable(
                    f"spec.tools: {other.ref} and {entry.ref} would both be offered to the "
                    f"model as {fn}; name only one of them"
                )
            if fn in models.ALL_TOOLS:
                raise Unavailable(f"spec.tools: {entry.ref} would shadow the built-in tool {fn}")
            pinned[fn] = entry
    return list(pinned.values())


@dataclass
class Offered:
    pinned: models.PinnedMCPTool
    tool: models.MCPTool
    spec: models.MCPServerSpec


class Toolset:
    """A run's MCP tools as offered now (the pinned ones whose schema did not change)."""

    def __init__(self, offered: dict[str, Offered]) -> None:
        self.offered = offered

    @classmethod
    async def load(
        cls, k8s: kube.Kube, namespace: str, pinned: list[models.PinnedMCPTool]
    ) -> tuple[Toolset, list[str]]:
        """The toolset, and what cannot be offered any more (said in the stream)."""
        offered: dict[str, Offered] = {}
        problems: list[str] = []
        bodies: dict[str, dict[str, Any] | None] = {}
        for p in pinned:
            if p.server not in bodies:
                bodies[p.server] = await k8s.get_mcpserver(namespace=namespace, name=p.server)
            body = bodies[p.server]
            if body is None:
                problems.append(f"{p.ref}: MCPServer {p.server} was deleted; not offered")
                continue
            tools_now = [
                models.MCPTool.model_validate(t)
                for t in (body.get("status") or {}).get("tools") or []
            ]
            same = [t for t in tools_now if t.name == p.name and t.schema_hash == p.schema_hash]
            if not same:
                problems.append(
                    f"{p.ref}: the server changed or withdrew it since the run started (its "
                    "input schema is not the one pinned); not offered"
                )
                continue
            spec = models.MCPServerSpec.model_validate(body.get("spec") or {})
            offered[p.function] = Offered(p, same[0], spec)
        return cls(offered), problems

    def has(self, function: str) -> bool:
        return function in self.offered

    def specs(self) -> list[dict[str, Any]]:
        return [
            {
                "type": "function",
                "function": {
                    "name": fn,
                    "description": f"[MCP server {o.pinned.server}] {o.tool.description}"[:1024],
                    "parameters": o.tool.input_schema or {"type": "object", "properties": {}},
                },
            }
            for fn, o in self.offered.items()
        ]

    def argument_error(self, function: str, arguments: dict[str, Any]) -> str | None:
        """What makes a call's arguments invalid for the tool's input schema (naming the
        argument), or None."""
        deep = approvals.deeper_than(arguments, approvals.MAX_ARGUMENT_NESTING)
        if deep is not None:
            return (
                f"{function}: arguments are nested deeper than "
                f"{approvals.MAX_ARGUMENT_NESTING} levels (at {'.'.join(deep[:8])}...)"
            )
        schema = self.offered[function].tool.input_schema
        try:
            validator = jsonschema.validators.validator_for(schema)(schema)
            error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
        except jsonschema.exceptions.SchemaError as e:
            return f"{function}: the server's input schema is invalid ({e.message[:200]})"
        if error is None:
            return None
        where = ".".join(str(p) for p in error.absolute_path)
        field = f"argument '{where}'" if where else "arguments"
        return f"{function}: {field}: {error.message[:300]}"

    def ref(self, function: str) -> str:
        return self.offered[function].pinned.ref

    async def call(
        self,
        function: str,
        arguments: dict[str, Any],
        *,
        k8s: kube.Kube,
        settings: config.Settings,
        namespace: str,
        account: str,
        on_progress: Callable[[dict[str, Any]], Awaitable[None]],
        max_bytes: int,
        trace_headers: Mapping[str, str] | None = None,
    ) -> tools.ToolOutcome:
        """The call, as the run's service account. Cancelling the task cancels it on the
        server (notifications/cancelled) and closes the connection."""
        o = self.offered[function]
        last = 0.0

        async def report(progress: float, total: float | None, message: str | None) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < PROGRESS_EVERY and (total is None or progress < total):
                return  # coalesced: the stream is for people, not for every tick
            last = now
            said = {"progress": progress, "total": total, "message": message}
            await on_progress({k: v for k, v in said.items() if v is not None})

        try:
            ep = await mcpservers.endpoint(
                k8s, settings, namespace=namespace, spec=o.spec, account=account
            )
            if trace_headers:
                ep = dataclasses.replace(ep, headers={**trace_headers, **ep.headers})
            result = await mcpclient.call_tool(ep, o.tool.name, arguments, on_progress=report)
        except mcpclient.MCPFailure as e:
            return tools.ToolOutcome("failed", None, f"{function}: {e.message}")
        # A Kubernetes-aware server may answer with objects: Secret data is redacted in
        # them as in the built-in tools' results.
        shown: Any = tools.redact_deep(result.content)
        if result.structured is not None and not result.content:
            shown = tools.redact_deep(result.structured)
        if result.is_error:
            text = " ".join(str(c) for c in tools.redact_deep(result.content)) or "the tool failed"
            return tools.ToolOutcome("failed", None, f"{function}: {text[:max_bytes]}")
        return tools.ToolOutcome("succeeded", tools.cap(shown, max_bytes), None)
