"""The Starlette app: routes, middleware, lifespan, and a uvicorn server that ends open streams
on shutdown.

Owns: which path goes to which handler, the request-size guard (413), security headers,
the clients' lifetimes (Redis, the Kubernetes API), and the order of a clean shutdown
(streams end first, each with a note to reconnect; then uvicorn drains and the clients
close).
Never: handles a request itself (``api`` does) or reads the environment (``settings``
does).
"""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn
from redis import exceptions as redis_errors
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentrun_operator import events
from agentrun_sse import api, auth, bodies, fanout, kubeapi, openapi
from agentrun_sse import metrics as metrics_mod
from agentrun_sse import settings as settings_mod

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
API = "/api/v1"
# The page's own script and style only; no inline code, no other origin, no framing.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class LoopbackHostOnly:
    """400 for a request whose Host header names anything but a loopback address.

    For the --no-auth mode: binding to loopback is not enough, since a web page the
    developer opens may point its own host name at 127.0.0.1 (DNS rebinding) and act with
    their kubeconfig; its requests carry that name. (Starlette's TrustedHostMiddleware cuts
    the Host at its first colon, which breaks "[::1]:8080".)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = next((v for k, v in scope.get("headers", []) if k == b"host"), b"")
            try:
                name = urllib.parse.urlsplit("//" + host.decode("latin-1")).hostname
            except ValueError:
                name = None
            if name not in settings_mod.LOOPBACK_HOSTS:
                response = PlainTextResponse("Invalid host header", status_code=400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a request body over the limit, whether it says its length or not."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    response = JSONResponse(
                        {
                            "status": 413,
                            "reason": "PayloadTooLarge",
                            "detail": f"request body over {self.limit} bytes",
                        },
                        status_code=413,
                    )
                    await response(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise bodies.BodyError(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    # An access_token in a URL must not travel on in a Referer.
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                    (b"content-security-policy", CSP.encode()),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


async def _index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def _openapi(request: Request) -> Response:
    return JSONResponse(openapi.document())


def routes() -> list[Route | Mount]:
    return [
        Route(f"{API}/runs", api.list_runs, methods=["GET"]),
        Route(f"{API}/runs/{{ns}}/{{name}}", api.get_run, methods=["GET"]),
        Route(f"{API}/runs/{{ns}}/{{name}}/events", api.run_events, methods=["GET"]),
        Route(f"{API}/runs/{{ns}}/{{name}}/stop", api.stop_run, methods=["POST"]),
        Route(
            f"{API}/runs/{{ns}}/{{name}}/approvals/{{call_id}}",
            api.decide_for_run,
            methods=["POST"],
        ),
        Route(f"{API}/agent/chat", api.chat, methods=["POST"]),
        Route(f"{API}/agent/approvals/{{call_id}}", api.decide, methods=["POST"]),
        Route("/login", api.login, methods=["POST"]),
        Route("/logout", api.logout, methods=["POST"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/readyz", api.readyz, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/openapi.json", _openapi, methods=["GET"]),
        Route("/", _index, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]


def create_app(settings: settings_mod.Settings) -> Starlette:
    """The app for ``settings``; its clients open lazily and close with its lifespan."""
    if settings.kube is None:
        raise settings_mod.ConfigError(
            "no Kubernetes API found: run in-cluster, or set KUBECONFIG / --kubeconfig"
        )
    auth.install_log_redaction("uvicorn.access", "uvicorn.error", "agentrun_sse")
    if settings.auth == "none":
        log.warning(
            "\n%s\n!!! AGENTRUN_AUTH=none: NO AUTHENTICATION. Every request acts with this\n"
            "!!! server's own kubeconfig. Development only; listening on %s only.\n%s",
            "!" * 78,
            settings.host,
            "!" * 78,
        )
    metrics = metrics_mod.Metrics()
    redis = events.connect(settings.redis_url, cluster=settings.redis_cluster)
    # Each watched run's reader holds one connection in XREAD BLOCK.
    reader_redis = events.connect(
        settings.redis_url, max_connections=4096, cluster=settings.redis_cluster
    )
    context = api.Context(
        settings=settings,
        kube=kubeapi.KubeAPI(settings.kube),
        redis=redis,
        hub=fanout.Hub(
            redis=redis,
            reader_redis=reader_redis,
            metrics=metrics,
            viewer_queue=settings.viewer_queue,
            read_count=settings.read_count,
        ),
        metrics=metrics,
        runs=auth.RunCache(ttl=settings.auth_cache_seconds),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            wrong = await events.check_mode(redis, cluster=settings.redis_cluster)
        except redis_errors.RedisError as e:  # away: /readyz says so until it is back
            log.warning("cannot ask Redis whether it is a cluster: %s", e)
            wrong = None
        if wrong is not None:
            raise settings_mod.ConfigError(f"AGENTRUN_REDIS_CLUSTER: {wrong}")
        try:
            yield
        finally:
            await context.hub.close()
            await context.kube.aclose()
            await reader_redis.aclose()
            await redis.aclose()

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        auth.AuthError: api.on_auth_error,
        bodies.BodyError: api.on_body_error,
        kubeapi.KubeError: api.on_kube_error,
        fanout.Unavailable: api.on_unavailable,
        redis_errors.RedisError: api.on_unavailable,
    }
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(BodyLimit, limit=settings.max_body_bytes),
    ]
    if settings.auth == "none":
        # Loopback only is not enough: see LoopbackHostOnly.
        middleware.insert(0, Middleware(LoopbackHostOnly))
    app = Starlette(
        routes=routes(),
        middleware=middleware,
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    app.state.ctx = context
    return app


def context_of(app: Starlette) -> api.Context:
    ctx: api.Context = app.state.ctx
    return ctx


# Idle keep-alive connections stay open longer than the proxies in front keep theirs
# (NGINX's and ingress-nginx's upstream keepalive_timeout: 60 s), so the proxy always
# closes first. Shorter (uvicorn's default is 5 s), the server may close a connection just as
# the proxy sends a request on it: NGINX retries a GET, but a POST (a stop) fails with 502.
KEEP_ALIVE_SECONDS = 75


def uvicorn_config(
    app: Starlette, settings: settings_mod.Settings, **overrides: Any
) -> uvicorn.Config:
    """How the SSE server serves ``app`` (tests override only where they listen and log)."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        # Streams end on their own at shutdown (Server); this bounds a stuck one.
        "timeout_graceful_shutdown": 10,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "proxy_headers": True,
        "server_header": False,
        "lifespan": "on",
    }
    return uvicorn.Config(app, **{**options, **overrides})


class Server(uvicorn.Server):
    """uvicorn, ending every open stream before it waits for connections to finish.

    Without this, uvicorn's graceful shutdown would wait for endless streams until its
    timeout and then cancel them mid-event.
    """

    def __init__(self, config: uvicorn.Config, *, app: Starlette) -> None:
        super().__init__(config)
        self._hub = context_of(app).hub

    async def shutdown(self, sockets: Any = None) -> None:
        await self._hub.close()
        await super().shutdown(sockets=sockets)
