"""A small client of the SSE server's run streams, over httpx: for `agentrun watch`, tests and
benchmarks.

Owns parsing the ``text/event-stream`` format into :class:`Message` (id, event, data) and
following one run's stream across dropped connections by ``Last-Event-ID``.
Never: renders anything, or talks to Redis or Kubernetes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Message:
    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


class Parser:
    """Incremental SSE parser: feed it lines, it returns a message at each blank line."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self.last_id: str | None = None

    def feed(self, line: str) -> Message | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data and not self._event:
                self._id = None
                return None
            msg = Message(self._event or "message", "\n".join(self._data), self._id)
            if self._id is not None:
                self.last_id = self._id
            self._event, self._data, self._id = "", [], None
            return msg
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        elif field == "id" and "\0" not in value:
            self._id = value
        return None


async def messages(response: httpx.Response) -> AsyncIterator[Message]:
    """The messages of one streaming response, until it ends."""
    parser = Parser()
    async for line in response.aiter_lines():
        msg = parser.feed(line)
        if msg is not None:
            yield msg


async def follow(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    last_id: str | None = None,
    max_reconnects: int = 5,
    retry_delay: float = 0.0,
) -> AsyncIterator[Message]:
    """One run's events until `end`, reconnecting with Last-Event-ID when a stream drops
    (or the server is unreachable or answers 5xx, e.g. while its pod is replaced): after
    ``retry_delay`` seconds, doubling up to 5 s, at most ``max_reconnects`` times in a row."""
    attempts = 0
    while True:
        h = dict(headers or {})
        if last_id:
            h["Last-Event-ID"] = last_id
        try:
            async with client.stream("GET", url, headers=h) as response:
                if response.status_code == 204:
                    return
                if response.status_code < 500:
                    response.raise_for_status()
                    async for msg in messages(response):
                        attempts = 0
                        if msg.id is not None:
                            last_id = msg.id
                        yield msg
                        if msg.event == "end":
                            return
        except (httpx.TransportError, httpx.RemoteProtocolError):
            pass
        attempts += 1
        if attempts > max_reconnects:
            raise ConnectionError(f"stream {url} dropped {attempts} times in a row")
        if retry_delay:
            await asyncio.sleep(min(retry_delay * 2 ** (attempts - 1), 5.0))
