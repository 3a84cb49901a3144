"""The one module that speaks the Model Context Protocol: the official SDK's client
(``mcp``) over streamable HTTP or the older HTTP+SSE transport.

Owns connecting (headers, timeouts, the initialize handshake), listing tools (with their
schema hashes), calling one tool (progress, cancellation, results summarised for the
model), following ``notifications/tools/list_changed``, and turning the SDK's errors
(often nested ExceptionGroups) into one ``MCPFailure`` that says what happened. Never logs
a header value (tokens and keys travel in them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2
from mcp import ClientSession, MCPError
from mcp import types as mcp_types
from mcp.client.session import MessageHandlerFnT
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.dispatcher import ProgressFnT

from agentrun_operator import models

MAX_TEXT = 65536  # of one text part, before the tool-result cap applies
MAX_PAGES = 50


@dataclass(frozen=True)
class Endpoint:
    url: str
    transport: str = "streamable-http"
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeout: float = 60.0


class MCPFailure(Exception):
    """The server could not be used; ``message`` says why (never a header value)."""

    def __init__(self, message: str, *, denied: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.denied = denied  # 401/403: the identity, not the server, is the problem


class _Denied(Exception):
    pass


class _FromCallback(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


async def _raise_on_denied(response: httpx2.Response) -> None:
    # The streamable-HTTP client turns a 401 into a bare "-32603 internal error"; read it here.
    if response.status_code in (401, 403):
        raise _Denied(f"HTTP {response.status_code}")


def schema_hash(schema: Mapping[str, Any]) -> str:
    canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _flat(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _flat(sub)]
    return [exc]


def failure(exc: BaseException, ep: Endpoint) -> MCPFailure:
    """One clear failure from whatever the SDK raised (ExceptionGroups flattened)."""
    leaves = _flat(exc)
    for leaf in leaves:
        if isinstance(leaf, _Denied):
            return MCPFailure(
                f"MCP server {ep.url} refused the credentials ({leaf}): check the MCPServer's "
                "auth and headers, and what the server accepts",
                denied=True,
            )
    for leaf in leaves:
        if isinstance(leaf, httpx2.HTTPStatusError):
            code = leaf.response.status_code
            return MCPFailure(
                f"MCP server {ep.url} answered HTTP {code}", denied=code in (401, 403)
            )
        if isinstance(leaf, httpx2.ConnectError | httpx2.ConnectTimeout | OSError):
            return MCPFailure(f"MCP server {ep.url} unreachable: {type(leaf).__name__}: {leaf}")
        if isinstance(leaf, MCPError):
            if leaf.code == mcp_types.REQUEST_TIMEOUT:
                return MCPFailure(f"MCP server {ep.url}: no answer within {ep.timeout:g}s")
            if leaf.code == mcp_types.CONNECTION_CLOSED:
                return MCPFailure(f"MCP server {ep.url} closed the connection: {leaf.message}")
            return MCPFailure(f"MCP server {ep.url}: error {leaf.code}: {leaf.message}")
        if isinstance(leaf, TimeoutError | httpx2.TimeoutException):
            return MCPFailure(f"MCP server {ep.url}: no answer within {ep.timeout:g}s")
    first = leaves[0] if leaves else exc
    return MCPFailure(f"MCP server {ep.url}: {type(first).__name__}: {first}")


def _cancelled(e: BaseException) -> bool:
    """Whether a failure is really a cancellation (a stop, a shutdown): the SDK's task groups
    may wrap it in an ExceptionGroup, and it must never become a tool failure."""
    if isinstance(e, asyncio.CancelledError):
        return True
    if isinstance(e, BaseExceptionGroup) and e.subgroup(asyncio.CancelledError) is not None:
        return True
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


MessageHandler = MessageHandlerFnT


@contextlib.asynccontextmanager
async def session(
    ep: Endpoint, *, on_message: MessageHandler | None = None
) -> AsyncIterator[tuple[ClientSession, mcp_types.InitializeResult]]:
    """An initialized session (enter and leave it in one task: the SDK's task groups)."""
    headers = dict(ep.headers)
    if ep.transport == "sse":
        transport: Any = sse_client(
            ep.url, headers=headers, timeout=10, sse_read_timeout=ep.timeout + 30
        )
        async with transport as (read, write):
            async with ClientSession(
                read, write, message_handler=on_message, read_timeout_seconds=ep.timeout
            ) as s:
                yield s, await s.initialize()
        return
    http = httpx2.AsyncClient(
        headers=headers,
        timeout=httpx2.Timeout(10.0, read=ep.timeout + 30),
        event_hooks={"response": [_raise_on_denied]},
    )
    async with http, streamable_http_client(ep.url, http_client=http) as (read, write):
        async with ClientSession(
            read, write, message_handler=on_message, read_timeout_seconds=ep.timeout
        ) as s:
            yield s, await s.initialize()


def _tool(tool: mcp_types.Tool) -> models.MCPTool:
    a = tool.annotations
    schema = dict(tool.input_schema or {})
    return models.MCPTool(
        name=tool.name,
        description=(tool.description or "")[:4096],
        annotations=models.MCPToolAnnotations(
            title=a.title if a else None,
            read_only_hint=a.read_only_hint if a else None,
            destructive_hint=a.destructive_hint if a else None,
            idempotent_hint=a.idempotent_hint if a else None,
            open_world_hint=a.open_world_hint if a else None,
        ),
        input_schema=schema,
        schema_hash=schema_hash(schema),
    )


async def tools_of(s: ClientSession) -> list[models.MCPTool]:
    found: list[models.MCPTool] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await s.list_tools(params=params)
        found += [_tool(t) for t in page.tools]
        cursor = page.next_cursor
        if not cursor:
            break
    return found


def server_name(init: mcp_types.InitializeResult) -> str:
    info = init.server_info
    return f"{info.name} {info.version}".strip() if info else ""


async def list_tools(ep: Endpoint) -> tuple[str, list[models.MCPTool]]:
    """The server's name and tools. Raises MCPFailure."""
    try:
        async with session(ep) as (s, init):
            return server_name(init), await tools_of(s)
    except (Exception, BaseExceptionGroup) as e:
        if _cancelled(e):
            raise asyncio.CancelledError() from e
        raise failure(e, ep) from None


async def follow(
    ep: Endpoint,
    on_tools: Callable[[str, list[models.MCPTool]], Awaitable[None]],
    *,
    lifetime: float,
) -> None:
    """List the tools, then again on every tools/list_changed, for ``lifetime`` seconds
    (then return: the caller reconnects with fresh credentials). Raises MCPFailure."""
    changed = asyncio.Event()

    async def tell(name: str, tools: list[models.MCPTool]) -> None:
        try:
            await on_tools(name, tools)
        except Exception as e:  # the caller's own failure (its status write), not the server's
            raise _FromCallback(e) from e

    async def on_message(message: Any) -> None:
        if isinstance(message, mcp_types.ToolListChangedNotification):
            changed.set()

    try:
        async with session(ep, on_message=on_message) as (s, init):
            name = server_name(init)
            await tell(name, await tools_of(s))
            deadline = asyncio.get_running_loop().time() + lifetime
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=left)
                if changed.is_set():
                    changed.clear()
                    await tell(name, await tools_of(s))
    except (Exception, BaseExceptionGroup) as e:
        if _cancelled(e):
            raise asyncio.CancelledError() from e
        for leaf in _flat(e):
            if isinstance(leaf, _FromCallback):
                raise leaf.error from None
        raise failure(e, ep) from None


@dataclass
class CallResult:
    is_error: bool
    content: list[Any]
    structured: Any = None


def _part(part: Any) -> Any:
    """One content part as the model and the stream see it: text as it is, anything else
    summarised (an image or a blob is never dumped)."""
    if isinstance(part, mcp_types.TextContent):
        return part.text[:MAX_TEXT]
    if isinstance(part, mcp_types.ImageContent | mcp_types.AudioContent):
        size = len(base64.b64decode(part.data, validate=False)) if part.data else 0
        kind = "image" if isinstance(part, mcp_types.ImageContent) else "audio"
        return {"type": kind, "mimeType": part.mime_type, "bytes": size}
    if isinstance(part, mcp_types.EmbeddedResource):
        res = part.resource
        shown: dict[str, Any] = {"type": "resource", "uri": str(res.uri)}
        if getattr(res, "mime_type", None):
            shown["mimeType"] = res.mime_type
        if isinstance(res, mcp_types.TextResourceContents):
            shown["text"] = res.text[:MAX_TEXT]
        else:
            shown["bytes"] = len(getattr(res, "blob", "") or "") * 3 // 4
        return shown
    if isinstance(part, mcp_types.ResourceLink):
        return {"type": "resource_link", "uri": str(part.uri), "name": part.name}
    return {"type": str(getattr(part, "type", "unknown"))}


Progress = ProgressFnT


async def call_tool(
    ep: Endpoint, name: str, arguments: Mapping[str, Any], *, on_progress: Progress | None = None
) -> CallResult:
    """One tool call on its own connection. Cancelling the awaiting task sends
    notifications/cancelled and closes the connection. Raises MCPFailure."""
    try:
        async with session(ep) as (s, _):
            result = await s.call_tool(name, dict(arguments), progress_callback=on_progress)
    except (Exception, BaseExceptionGroup) as e:
        if _cancelled(e):
            raise asyncio.CancelledError() from e
        raise failure(e, ep) from None
    return CallResult(
        is_error=bool(result.is_error),
        content=[_part(p) for p in result.content],
        structured=result.structured_content,
    )
