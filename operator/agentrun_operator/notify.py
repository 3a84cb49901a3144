"""Notifications: POST a JSON message when an approval becomes pending, is decided or
expires, and when a run ends.

Owns the routing (a ConfigMap the operator reads, per namespace), the message bodies
(Slack-compatible ``{"text": ...}`` or a generic JSON body), and delivery with retries and
backoff. Never blocks or fails a run: messages go through a bounded queue, each delivery is
its own task, and a dead receiver only costs its own retries.

The ConfigMap (AGENTRUN_NOTIFY_CONFIGMAP, "namespace/name") holds ``routes.yaml``::

    - url: https://hooks.slack.com/services/T000/B000/XXXX
      format: slack            # or json
      namespaces: [team-a, "prod-*"]     # globs; absent: every namespace
      events: [approval.pending, approval.decided, approval.expired, run.finished]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Literal

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentrun_operator import config, kube

log = logging.getLogger("agentrun.notify")

EventName = Literal["approval.pending", "approval.decided", "approval.expired", "run.finished"]
ALL_EVENTS: tuple[str, ...] = (
    "approval.pending",
    "approval.decided",
    "approval.expired",
    "run.finished",
)


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(pattern=r"^https?://")
    format: Literal["slack", "json"] = "json"
    namespaces: list[str] = Field(default_factory=list)
    events: list[EventName] = Field(default_factory=lambda: list(ALL_EVENTS))  # type: ignore[arg-type]

    def wants(self, *, namespace: str, event: str) -> bool:
        return config.in_namespaces(namespace, self.namespaces) and event in self.events


def parse_routes(text: str) -> list[Route]:
    """Routes from routes.yaml; a bad file raises ValueError naming the entry and field."""
    data = yaml.safe_load(text) or []
    if not isinstance(data, list):
        raise ValueError("routes.yaml must be a list of routes")
    routes = []
    for i, entry in enumerate(data):
        try:
            routes.append(Route.model_validate(entry))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"routes.yaml[{i}].{where}: {first['msg']}") from None
    return routes


def body(route: Route, message: dict[str, Any]) -> dict[str, Any]:
    if route.format == "slack":
        text = str(message["text"])
        if message.get("link"):
            text += f" <{message['link']}|open in agentrun>"
        return {"text": text}
    return message


class Notifier:
    def __init__(
        self,
        *,
        k8s: kube.Kube,
        configmap: str,
        ui_url: str,
        refresh_seconds: float = 30,
        retries: int = 3,
        timeout: float = 5,
    ) -> None:
        self._kube = k8s
        self._namespace, _, self._name = configmap.rpartition("/")
        self._ui = ui_url.rstrip("/")
        self._refresh = refresh_seconds
        self._retries = retries
        self._timeout = timeout
        self._queue: asyncio.Queue[tuple[str, str, dict[str, Any]]] = asyncio.Queue(1000)
        self._routes: list[Route] = []
        self._loaded = 0.0
        self._deliveries: set[asyncio.Task[None]] = set()
        self._limit = asyncio.Semaphore(20)
        self._http: httpx.AsyncClient | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._name)

    def publish(self, *, namespace: str, event: str, text: str, **fields: Any) -> None:
        """Queue a message; never waits and never raises."""
        if not self.enabled:
            return
        run = fields.get("run", "")
        message = {"event": event, "namespace": namespace, "text": text, **fields}
        if self._ui and run:
            message["link"] = f"{self._ui}/#/runs/{namespace}/{run}"
        try:
            self._queue.put_nowait((namespace, event, message))
        except asyncio.QueueFull:
            log.warning("notification queue full; dropped %s for %s/%s", event, namespace, run)

    async def run(self) -> None:
        self._http = httpx.AsyncClient(timeout=self._timeout)
        try:
            while True:
                namespace, event, message = await self._queue.get()
                for route in await self._current_routes():
                    if route.wants(namespace=namespace, event=event):
                        task = asyncio.create_task(self._deliver(route, body(route, message)))
                        self._deliveries.add(task)
                        task.add_done_callback(self._deliveries.discard)
        finally:
            for task in list(self._deliveries):
                task.cancel()
            await self._http.aclose()

    async def _current_routes(self) -> list[Route]:
        if time.monotonic() - self._loaded < self._refresh:
            return self._routes
        self._loaded = time.monotonic()
        try:
            cm = await self._kube.request(
                "GET", f"/api/v1/namespaces/{self._namespace}/configmaps/{self._name}"
            )
            self._routes = parse_routes(((cm or {}).get("data") or {}).get("routes.yaml", ""))
        except kube.KubeError as e:
            if e.status == 404:
                self._routes = []
            else:
                log.warning(
                    "cannot read notification routes %s/%s: %s", self._namespace, self._name, e
                )
        except ValueError as e:
            log.error(
                "notification routes in ConfigMap %s/%s are invalid: %s",
                self._namespace,
                self._name,
                e,
            )
        return self._routes

    async def _deliver(self, route: Route, payload: dict[str, Any]) -> None:
        assert self._http is not None
        async with self._limit:
            delay = 0.5
            for attempt in range(1, self._retries + 1):
                try:
                    resp = await self._http.post(route.url, json=payload)
                    if resp.status_code < 500 and resp.status_code != 429:
                        if resp.status_code >= 400:
                            log.warning(
                                "notification receiver %s refused: HTTP %s",
                                _host(route.url),
                                resp.status_code,
                            )
                        return
                    problem = f"HTTP {resp.status_code}"
                except httpx.HTTPError as e:
                    problem = type(e).__name__
                if attempt < self._retries:
                    await asyncio.sleep(delay)
                    delay *= 2
            log.warning(
                "gave up notifying %s after %d attempts (%s)",
                _host(route.url),
                self._retries,
                problem,
            )

    async def drain(self, timeout: float = 5) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self._queue.empty() or self._deliveries:
                    await asyncio.sleep(0.05)


def _host(url: str) -> str:
    # Incoming-webhook URLs carry their secret in the path: log the host only.
    return httpx.URL(url).host or "?"
