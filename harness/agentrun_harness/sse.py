"""Test and benchmark harness: the real app under real uvicorn on a free loopback port, in
this event loop, and a stand-in operator that appends a run's events to Redis.

Owns nothing the server runs in production. Never: fakes what it stands for (the server is
the production app and ``uvicorn.Server`` subclass; events go through the operator's own
fenced ``events.EventWriter``) or reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import httpx
from redis import asyncio as aioredis
from starlette.applications import Starlette

from agentrun_operator import events
from agentrun_operator import sseclient as client
from agentrun_sse import api
from agentrun_sse import app as app_mod
from agentrun_sse import settings as settings_mod


class _InProcessServer(app_mod.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The test runner keeps its own signal handlers (Ctrl-C still stops pytest).
        yield


class LiveServer:
    """``async with LiveServer(settings) as s:`` serves the app at ``s.url``."""

    def __init__(self, settings: settings_mod.Settings, *, access_log: bool = False) -> None:
        self.settings = dataclasses.replace(settings, host="127.0.0.1", port=0)
        self.app: Starlette = app_mod.create_app(self.settings)
        config = app_mod.uvicorn_config(
            self.app,
            self.settings,
            log_level="info" if access_log else "warning",
            access_log=access_log,
            timeout_graceful_shutdown=5,
            log_config=None,  # the test's logging stays as it is (caplog sees records)
        )
        self.server = _InProcessServer(config, app=self.app)
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ctx(self) -> api.Context:
        return app_mod.context_of(self.app)

    async def __aenter__(self) -> LiveServer:
        self._task = asyncio.create_task(self.server.serve(), name="agentrun-sse-test-server")
        async with asyncio.timeout(15):
            while not self.server.started:
                if self._task.done():
                    self._task.result()  # raises the startup failure
                    raise RuntimeError("uvicorn exited during startup")
                await asyncio.sleep(0.01)  # uvicorn offers no startup event to await
        self.port = int(self.server.servers[0].sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        async with asyncio.timeout(20):
            await self._task
        self._task = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class FakeOperator:
    """Appends one run's events the way the operator does (lease, fenced writer)."""

    def __init__(self, redis: aioredis.Redis, *, uid: str, run: str, maxlen: int = 100_000):
        self.redis = redis
        self.uid = uid
        self.run = run
        self.maxlen = maxlen
        self.writer: events.EventWriter | None = None

    async def start(self) -> FakeOperator:
        lease = await events.Lease.acquire(
            self.redis, uid=self.uid, operator_id=f"test-{uuid.uuid4().hex[:6]}", ttl_seconds=600
        )
        if lease is None:
            raise RuntimeError(f"run {self.uid}: lease held by another writer")
        self.writer = events.EventWriter(
            self.redis, uid=self.uid, run=self.run, lease=lease, maxlen=self.maxlen
        )
        return self

    async def emit(self, type: events.EventType, data: dict[str, Any]) -> str:
        assert self.writer is not None, "call start() first"
        return await self.writer.append(type, data)

    async def tokens(self, n: int, *, prefix: str = "t", start: int = 0) -> list[str]:
        return [
            await self.emit("token", {"text": f"{prefix}{i} ", "node": "act"})
            for i in range(start, start + n)
        ]

    async def end(self, phase: str = "Succeeded", *, result: str = "done") -> str:
        return await self.emit("end", {"phase": phase, "result": result, "stoppedBy": ""})


class StreamClosed(AssertionError):
    """The stream ended while a test still waited for a message."""


class StreamTap:
    """One SSE response read in the background, so a test can await its messages.

    ``async with StreamTap(http, url) as tap:`` returns once the response headers are in
    (``tap.status``, ``tap.headers``); ``await tap.next()`` gives the next message (skipping
    heartbeats unless asked), failing after a bounded wait with what it waited for.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        json: Any = None,
    ) -> None:
        self._http = http
        self._url = url
        self._method = method
        self._headers = headers or {}
        self._json = json
        self._queue: asyncio.Queue[client.Message | None] = asyncio.Queue()
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self.status = 0
        self.headers: httpx.Headers = httpx.Headers()
        self.body = b""
        self.closed = False
        self.error: BaseException | None = None
        # time.monotonic() at which each message with an id was parsed off the socket.
        self.arrived: dict[str, float] = {}

    async def __aenter__(self) -> StreamTap:
        self._task = asyncio.create_task(self._run(), name=f"tap {self._url}")
        async with asyncio.timeout(15):
            await asyncio.shield(self._opened)
        return self

    async def _run(self) -> None:
        try:
            async with self._http.stream(
                self._method, self._url, headers=self._headers, json=self._json
            ) as r:
                self.status, self.headers = r.status_code, r.headers
                self._opened.set_result(None)
                if not r.headers.get("content-type", "").startswith("text/event-stream"):
                    self.body = await r.aread()
                    return
                async for msg in client.messages(r):
                    if msg.id is not None:
                        self.arrived[msg.id] = time.monotonic()
                    await self._queue.put(msg)
        except Exception as e:
            self.error = e
            if not self._opened.done():
                self._opened.set_exception(e)
        finally:
            self.closed = True
            await self._queue.put(None)

    async def next(
        self, *, timeout: float = 10.0, heartbeats: bool = False, what: str = "a message"
    ) -> client.Message:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    msg = await self._queue.get()
                    if msg is None:
                        await self._queue.put(None)  # stays closed for later calls
                        raise StreamClosed(f"{self._url}: stream ended while waiting for {what}")
                    if msg.event == "heartbeat" and not heartbeats:
                        continue
                    return msg
        except TimeoutError:
            raise AssertionError(f"{self._url}: no {what} within {timeout}s") from None

    async def heartbeat(self, *, timeout: float = 10.0) -> client.Message:
        while True:
            msg = await self.next(timeout=timeout, heartbeats=True, what="a heartbeat")
            if msg.event == "heartbeat":
                return msg

    async def take(self, n: int, *, timeout: float = 10.0) -> list[client.Message]:
        return [await self.next(timeout=timeout, what=f"message {i + 1} of {n}") for i in range(n)]

    async def until_closed(
        self, *, timeout: float = 10.0, heartbeats: bool = False
    ) -> list[client.Message]:
        """Every message left, once the server has closed the stream."""
        out: list[client.Message] = []
        try:
            while True:
                out.append(await self.next(timeout=timeout, heartbeats=heartbeats, what="the end"))
        except StreamClosed:
            return out

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
