"""An OpenAI-compatible mock LLM over a real socket, for integration tests and ``make demo``.

Owns one Starlette app served by uvicorn, its script and the log of requests it received.
It must never call a real model, never block the event loop (all latency is ``asyncio.sleep``),
and never keep the server from shutting down (a ``hang`` reply ends when the server stops).
The operator's run-time code never imports it; ``agentrun mock-llm`` (cli.py) serves it.

Endpoints::

    POST   /v1/chat/completions  stream true/false, tools, stream_options.include_usage
    GET    /v1/models
    GET    /healthz
    GET    /_calls               the recorded requests; DELETE /_calls forgets them
    GET    /_script              the rules in force; PUT /_script replaces them (YAML or JSON)

With an API key set, ``/v1/*`` requires ``Authorization: Bearer <key>`` (401 in OpenAI's error
shape otherwise); ``/healthz`` and the ``/_*`` test controls never do.

Script: a list of rules (YAML or JSON)::

    - match: "scale"           # substring of the FIRST user message (the goal); absent = any
      tools_present: true      # optional: only when the request offers tools (false: offers none)
      replies:                 # replies[n], n = assistant messages already in the request;
        - text: "I will scale it."              # past the end, the last reply repeats
        - tool_calls:
            - name: k8s_scale
              arguments: {kind: deployment, name: web, replicas: 3}
          delay_ms: 200        # before the first token
          tokens_per_second: 0 # override the server's rate; 0 = no pacing
        - text: "Done."
          usage: {prompt_tokens: 1000, completion_tokens: 2, cached_tokens: 800}
        - error: {status: 503, message: "overloaded", retry: false}  # retry sets x-should-retry
        - hang: true           # headers, then nothing until the client or the server goes away

The first matching rule applies; when none does, a built-in default plays a read-only
Kubernetes agent: a short plan, then a ``k8s_list`` call for pods if tools are offered (text
otherwise), then a summary, whatever the goal. Choosing a reply is stateless, so a client that
restarts and replays the conversation gets the same reply again. Tool-call ids are minted
fresh (``call_<hex>``), as OpenAI does.

Usage, unless a reply overrides it: prompt_tokens = words in all request messages,
completion_tokens = streamed pieces (text tokens, i.e. a word and its following whitespace,
plus one per tool-call header and per argument fragment), cached_tokens = 0.

``MockLLM`` runs in the caller's event loop (``await start()`` / ``await stop()``);
``MockLLMThread`` runs one on its own loop in a thread for sync code. From a shell:
``agentrun mock-llm``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pydantic
import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

DEFAULT_TOKENS_PER_SECOND = 50.0
MODEL_ID = "mock"
_FINGERPRINT = "fp_mockllm"


# --- the script -------------------------------------------------------------------------------


class _Strict(pydantic.BaseModel):
    # Typos in a hand-written script should fail loudly, not silently do nothing.
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class ToolCall(_Strict):
    name: str = pydantic.Field(min_length=1)
    arguments: dict[str, Any] | str = pydantic.Field(default_factory=dict)


class ErrorReply(_Strict):
    status: int = pydantic.Field(default=500, ge=400, le=599)
    message: str = "The mock LLM was scripted to fail."
    type: str | None = None
    code: str | None = None
    retry: bool | None = None


class UsageOverride(_Strict):
    prompt_tokens: int | None = pydantic.Field(default=None, ge=0)
    completion_tokens: int | None = pydantic.Field(default=None, ge=0)
    cached_tokens: int | None = pydantic.Field(default=None, ge=0)


class Reply(_Strict):
    text: str = ""
    tool_calls: list[ToolCall] = pydantic.Field(default_factory=list)
    delay_ms: float = pydantic.Field(default=0, ge=0)
    tokens_per_second: float | None = pydantic.Field(default=None, ge=0)
    error: ErrorReply | None = None
    usage: UsageOverride | None = None
    hang: bool = False


class Rule(_Strict):
    match: str | None = None
    tools_present: bool | None = None
    replies: list[Reply] = pydantic.Field(min_length=1)


class ScriptError(ValueError):
    pass


_RULES = pydantic.TypeAdapter(list[Rule])


def parse_script(data: object) -> list[Rule]:
    """Validate a script (already decoded from YAML/JSON); ``None`` means no rules."""
    if data is None:
        return []
    try:
        return _RULES.validate_python(data)
    except pydantic.ValidationError as e:
        raise ScriptError(f"invalid mock LLM script: {e}") from e


def load_script(path: Path) -> list[Rule]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ScriptError(f"{path}: not YAML or JSON: {e}") from e
    return parse_script(data)


_PLAN = "Plan: I will list the pods in this namespace, check their status, and then summarise."
DEFAULT_SCRIPT: list[Rule] = parse_script(
    [
        {
            "tools_present": True,
            "replies": [
                {"text": _PLAN},
                {"tool_calls": [{"name": "k8s_list", "arguments": {"kind": "pods"}}]},
                {"text": "Summary: I listed the pods; nothing needs changing. No writes made."},
            ],
        },
        {
            "replies": [
                {"text": _PLAN},
                {"text": "I have no tools here, so I can only reason about the goal."},
                # Also the verify turn of a run that used tools (verify offers none).
                {
                    "text": "Final answer: I listed the pods in this namespace and reported "
                    "their state above. I changed nothing."
                },
            ],
        },
    ]
)


def _text_of(content: object) -> str:
    """A message's text: a plain string or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return ""


def _goal(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in messages:
        if message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def tool_names(tools: object) -> list[str]:
    names: list[str] = []
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping):
                names.append(str(tool["function"].get("name", "")))
    return names


class Choice(NamedTuple):
    rule: int | None  # index into the script; None: the default script
    answered: int  # assistant messages already in the conversation
    reply: Reply


def choose(
    *, rules: Sequence[Rule], messages: Sequence[Mapping[str, Any]], tools: Sequence[str]
) -> Choice:
    """The reply to give: a pure function of the script and the request."""
    goal = _goal(messages)
    answered = sum(1 for m in messages if m.get("role") == "assistant")

    def first_match(candidates: Sequence[Rule]) -> int | None:
        for i, rule in enumerate(candidates):
            if rule.match is not None and rule.match not in goal:
                continue
            if rule.tools_present is not None and rule.tools_present != bool(tools):
                continue
            return i
        return None

    index = first_match(rules)
    if index is not None:
        rule = rules[index]
    else:
        default = first_match(DEFAULT_SCRIPT)
        assert default is not None  # the default's last rule matches anything
        rule = DEFAULT_SCRIPT[default]
    return Choice(index, answered, rule.replies[min(answered, len(rule.replies) - 1)])


# --- replies as OpenAI wire format (pure) -----------------------------------------------------


def tokens(text: str) -> list[str]:
    """A word with its surrounding whitespace per token; joined, they give back ``text``."""
    pieces = re.findall(r"\s*\S+\s*", text)
    return pieces or ([text] if text else [])


def _fragments(arguments: str, *, size: int = 8) -> list[str]:
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


def prompt_words(messages: Sequence[Mapping[str, Any]]) -> int:
    words = 0
    for message in messages:
        words += len(_text_of(message.get("content")).split())
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else []:
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping):
                words += len(f"{function.get('name', '')} {function.get('arguments', '')}".split())
    return words


def _arguments_json(call: ToolCall) -> str:
    if isinstance(call.arguments, str):
        return call.arguments
    return json.dumps(call.arguments, separators=(",", ":"))


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def deltas(reply: Reply) -> list[tuple[dict[str, Any], bool]]:
    """The streamed ``delta`` objects of a reply, each flagged if it is a paced, counted token.

    As OpenAI does: a first delta with the role; text tokens; per tool call a header (index,
    id, type, name, empty arguments) and then argument fragments. A reply that is only tool
    calls carries the first header in the role delta, with ``content: null``.
    """
    out: list[tuple[dict[str, Any], bool]] = [
        (
            {
                "role": "assistant",
                "content": None if reply.tool_calls and not reply.text else "",
                "refusal": None,
            },
            False,
        )
    ]
    out.extend(({"content": token}, True) for token in tokens(reply.text))
    for index, call in enumerate(reply.tool_calls):
        header = {
            "index": index,
            "id": _new_call_id(),
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        if len(out) == 1:
            out[0] = ({**out[0][0], "tool_calls": [header]}, True)
        else:
            out.append(({"tool_calls": [header]}, True))
        out.extend(
            ({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}, True)
            for piece in _fragments(_arguments_json(call))
        )
    return out


def usage(
    *, reply: Reply, messages: Sequence[Mapping[str, Any]], completion_tokens: int
) -> dict[str, Any]:
    override = reply.usage or UsageOverride()
    prompt = override.prompt_tokens
    if prompt is None:
        prompt = prompt_words(messages)
    completion = override.completion_tokens
    if completion is None:
        completion = completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": override.cached_tokens or 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def error_body(*, message: str, type: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def _error_type(status: int) -> str:
    if status == 429:
        return "requests"
    return "server_error" if status >= 500 else "invalid_request_error"


def _sse(data: object) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# --- the HTTP side ----------------------------------------------------------------------------


class _PacedResponse(StreamingResponse):
    """A streamed body that stops when the client disconnects or the server shuts down.

    Starlette's own stops on a disconnect only for ASGI < 2.4 and never notices a shutdown;
    a ``hang`` reply needs both. Ending on shutdown returns without completing the response,
    so uvicorn closes the connection (and logs that it did): the client sees a cut stream.
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        closing: asyncio.Event,
        media_type: str,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(content, status_code=status_code, headers=headers, media_type=media_type)
        self._closing = closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pump = asyncio.create_task(self.stream_response(send))
        watchers = [asyncio.create_task(disconnected()), asyncio.create_task(self._closing.wait())]
        try:
            await asyncio.wait([pump, *watchers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, *watchers):
                task.cancel()
            await asyncio.gather(pump, *watchers, return_exceptions=True)
        if pump.done() and not pump.cancelled() and (error := pump.exception()) is not None:
            raise error


async def _forever() -> AsyncIterator[bytes]:
    await asyncio.get_running_loop().create_future()  # never resolved: a `hang` reply
    yield b""


class MockLLM:
    """The mock server in the current event loop."""

    def __init__(
        self,
        *,
        script: list[dict[str, Any]] | None = None,
        tokens_per_second: float = 0,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.rules: list[Rule] = parse_script(script)
        self.tokens_per_second = tokens_per_second
        self.api_key = api_key
        self.host = host
        self.port = port
        self._calls: list[dict[str, Any]] = []
        self._closing = asyncio.Event()
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/healthz", self._healthz, methods=["GET"]),
                Route("/_calls", self._get_calls, methods=["GET"]),
                Route("/_calls", self._delete_calls, methods=["DELETE"]),
                Route("/_script", self._get_script, methods=["GET"]),
                Route("/_script", self._put_script, methods=["PUT"]),
            ]
        )

    # -- for tests --

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
        return f"http://{host}:{self.port}/v1"

    @property
    def calls(self) -> list[dict[str, Any]]:
        """The chat requests received so far, oldest first (a copy)."""
        return list(self._calls)

    def clear_calls(self) -> None:
        self._calls.clear()

    def set_script(self, script: list[dict[str, Any]] | None) -> None:
        """Replace the rules; ``None`` or ``[]`` leaves only the default script."""
        self.rules = parse_script(script)

    # -- lifecycle --

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the mock LLM is already running")
        self._closing = asyncio.Event()
        self._server = self._make_server(handle_signals=False)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._bind()]))
        while not self._server.started:
            if self._task.done():
                await self._task
                raise RuntimeError("the mock LLM server exited during startup")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._closing.set()
        self._server.should_exit = True
        await self._task
        self._server = None
        self._task = None

    async def __aenter__(self) -> MockLLM:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM, logging requests: the command line's mode."""
        server = self._make_server(handle_signals=True)
        sock = self._bind()
        print(f"mock LLM listening on {self.base_url}", flush=True)
        await server.serve(sockets=[sock])

    def _bind(self) -> socket.socket:
        # Binding here rather than in uvicorn: port 0 becomes a known port before serving,
        # and a busy port raises OSError here instead of uvicorn's sys.exit inside a task.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        return sock

    def _make_server(self, *, handle_signals: bool) -> _Server:
        logging: dict[str, Any] = {}
        if not handle_signals:
            # Embedded in tests: leave the process's logging configuration alone.
            logging = {"log_config": None, "access_log": False}
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            ws="none",  # websockets would only import deprecated modules
            timeout_graceful_shutdown=5,
            **logging,
        )
        return _Server(config, closing=self._closing, handle_signals=handle_signals)

    # -- routes --

    def _unauthorized(self, request: Request) -> Response | None:
        if self.api_key is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(key.strip(), self.api_key):
            return None
        if not header:
            message = "You didn't provide an API key. Use 'Authorization: Bearer YOUR_KEY'."
            body = error_body(message=message, type="invalid_request_error")
        else:
            masked = f"{key[:3]}...{key[-4:]}" if len(key) > 8 else "***"
            body = error_body(
                message=f"Incorrect API key provided: {masked}.",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        return JSONResponse(body, status_code=401)

    async def _chat(self, request: Request) -> Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return JSONResponse(
                error_body(
                    message="The body must be a JSON object with a 'messages' list.",
                    type="invalid_request_error",
                ),
                status_code=400,
            )
        messages: list[dict[str, Any]] = [m for m in body["messages"] if isinstance(m, dict)]
        names = tool_names(body.get("tools"))
        model = str(body.get("model") or MODEL_ID)
        stream = bool(body.get("stream"))
        choice = choose(rules=self.rules, messages=messages, tools=names)
        reply = choice.reply
        self._calls.append(
            {
                "model": model,
                "messages": messages,
                "tools": names,
                "stream": stream,
                "timestamp": time.time(),
                "rule": choice.rule,
                "reply": choice.answered,
                # A caller that traces sends its span (W3C Trace Context), as vLLM sees it.
                "traceparent": request.headers.get("traceparent"),
            }
        )
        rate = (
            self.tokens_per_second if reply.tokens_per_second is None else reply.tokens_per_second
        )
        interval = 1 / rate if rate > 0 else 0.0
        delay = reply.delay_ms / 1000

        if reply.hang:
            media = "text/event-stream" if stream else "application/json"
            return _PacedResponse(_forever(), closing=self._closing, media_type=media)
        if reply.error is not None:
            return self._error(reply.error, delay=delay)
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        if stream:
            return _PacedResponse(
                self._stream(
                    reply=reply,
                    messages=messages,
                    model=model,
                    include_usage=include_usage,
                    delay=delay,
                    interval=interval,
                ),
                closing=self._closing,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return _PacedResponse(
            self._complete(
                reply=reply, messages=messages, model=model, delay=delay, interval=interval
            ),
            closing=self._closing,
            media_type="application/json",
        )

    def _error(self, error: ErrorReply, *, delay: float) -> Response:
        body = error_body(
            message=error.message,
            type=error.type or _error_type(error.status),
            code=error.code,
        )
        headers: dict[str, str] = {}
        if error.retry is not None:
            # The openai SDK obeys this header over its own retry rules.
            headers["x-should-retry"] = "true" if error.retry else "false"

        async def after_delay() -> AsyncIterator[bytes]:
            await asyncio.sleep(delay)
            yield json.dumps(body).encode()

        return _PacedResponse(
            after_delay(),
            closing=self._closing,
            media_type="application/json",
            status_code=error.status,
            headers=headers,
        )

    async def _stream(
        self,
        *,
        reply: Reply,
        messages: list[dict[str, Any]],
        model: str,
        include_usage: bool,
        delay: float,
        interval: float,
    ) -> AsyncIterator[bytes]:
        envelope: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }
        if include_usage:
            envelope["usage"] = None  # as OpenAI: null on every chunk but the last

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return _sse({**envelope, "choices": [choice]})

        await asyncio.sleep(delay)
        counted = 0
        for delta, paced in deltas(reply):
            if paced:
                if counted and interval:
                    await asyncio.sleep(interval)
                counted += 1
            yield chunk(delta)
        yield chunk({}, "tool_calls" if reply.tool_calls else "stop")
        if include_usage:
            spent = usage(reply=reply, messages=messages, completion_tokens=counted)
            yield _sse({**envelope, "choices": [], "usage": spent})
        yield b"data: [DONE]\n\n"

    async def _complete(
        self,
        *,
        reply: Reply,
        messages: list[dict[str, Any]],
        model: str,
        delay: float,
        interval: float,
    ) -> AsyncIterator[bytes]:
        counted = sum(1 for _, paced in deltas(reply) if paced)
        await asyncio.sleep(delay + max(counted - 1, 0) * interval)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.text or None,
            "refusal": None,
            "annotations": [],
        }
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": _new_call_id(),
                    "type": "function",
                    "function": {"name": call.name, "arguments": _arguments_json(call)},
                }
                for call in reply.tool_calls
            ]
        yield json.dumps(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                    }
                ],
                "usage": usage(reply=reply, messages=messages, completion_tokens=counted),
                "service_tier": "default",
                "system_fingerprint": _FINGERPRINT,
            }
        ).encode()

    async def _models(self, request: Request) -> Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "agentrun"}
        return JSONResponse({"object": "list", "data": [model]})

    async def _healthz(self, _: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _get_calls(self, _: Request) -> Response:
        return JSONResponse(self.calls)

    async def _delete_calls(self, _: Request) -> Response:
        count = len(self._calls)
        self.clear_calls()
        return JSONResponse({"deleted": count})

    async def _get_script(self, _: Request) -> Response:
        return JSONResponse(
            [rule.model_dump(mode="json", exclude_defaults=True) for rule in self.rules]
        )

    async def _put_script(self, request: Request) -> Response:
        try:
            self.rules = parse_script(yaml.safe_load(await request.body()))
        except (yaml.YAMLError, ScriptError) as e:
            return JSONResponse(
                error_body(message=str(e), type="invalid_request_error"), status_code=400
            )
        return JSONResponse({"rules": len(self.rules)})


class _Server(uvicorn.Server):
    """uvicorn, told about shutdown early enough to end hung replies, with optional signals."""

    def __init__(
        self, config: uvicorn.Config, *, closing: asyncio.Event, handle_signals: bool
    ) -> None:
        super().__init__(config)
        self._closing = closing
        self._handle_signals = handle_signals

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Embedded in a test process, SIGINT must stay pytest's.
        if not self._handle_signals:
            yield
            return
        with super().capture_signals():
            yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn waits for open responses before it finishes; a hung one never would.
        self._closing.set()
        await super().shutdown(sockets=sockets)


class MockLLMThread:
    """A ``MockLLM`` on its own event loop in a daemon thread, for sync tests and scripts."""

    def __init__(
        self,
        *,
        script: list[dict[str, Any]] | None = None,
        tokens_per_second: float = 0,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        # Safe outside its loop: asyncio objects bind to a loop on first use, not creation.
        self.mock = MockLLM(
            script=script,
            tokens_per_second=tokens_per_second,
            api_key=api_key,
            host=host,
            port=port,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return self.mock.base_url

    @property
    def calls(self) -> list[dict[str, Any]]:
        return self.mock.calls

    def set_script(self, script: list[dict[str, Any]] | None) -> None:
        self.mock.set_script(script)

    def clear_calls(self) -> None:
        self.mock.clear_calls()

    def start(self, *, timeout: float = 30) -> None:
        if self._loop is not None:
            raise RuntimeError("the mock LLM thread is already running")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mockllm", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.mock.start(), self._loop).result(timeout)

    def stop(self, *, timeout: float = 30) -> None:
        if self._loop is None or self._thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.mock.stop(), self._loop).result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self._loop.close()
            self._loop = None
            self._thread = None

    def __enter__(self) -> MockLLMThread:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    script: Path | None = None,
    tokens_per_second: float = DEFAULT_TOKENS_PER_SECOND,
    api_key: str | None = None,
) -> int:
    """Run the server until interrupted; the ``agentrun mock-llm`` command."""
    try:
        rules = load_script(script) if script is not None else []
    except (OSError, ScriptError) as e:
        print(f"mock-llm: {e}", file=sys.stderr)
        return 2

    async def main() -> None:
        mock = MockLLM(tokens_per_second=tokens_per_second, api_key=api_key, host=host, port=port)
        mock.rules = rules
        await mock.serve_forever()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT it handled, once it has shut down cleanly
    except OSError as e:
        print(f"mock-llm: cannot listen on {host}:{port}: {e}", file=sys.stderr)
        return 1
    return 0
