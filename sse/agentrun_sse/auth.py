"""Who is calling, and whether they may read a run: the caller's own Kubernetes token.

Owns: finding the bearer token (``Authorization`` header, the login cookie, or an
``access_token`` query parameter on GETs, for EventSource), the cookie and its CSRF token,
resolving ``ns/name`` to a run with the caller's token (the API server authenticates (401),
authorizes (403) and answers the uid in one call), a short cache of those answers, and the
log filter that keeps tokens out of every log line.
Never: logs, stores or echoes a token; trusts a client-supplied identity; judges access by
itself (the API server does, with RBAC and the webhooks); holds a credential of its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.responses import Response

from agentrun_sse import bodies, kubeapi
from agentrun_sse import settings as settings_mod

SESSION_COOKIE = "agentrun_session"
CSRF_COOKIE = "agentrun_csrf"
CSRF_HEADER = "X-CSRF-Token"
SESSION_SECONDS = 12 * 3600
TokenSource = Literal["header", "cookie", "query", "none"]

# `access_token=...` in a URL, also with its underscore percent-encoded (Starlette decodes
# it to the same name, so it is the same token).
_TOKEN_IN_URL = re.compile(r"(?i)(access(?:_|%5f)token=)[^&\s\"']*")


class AuthError(Exception):
    """401 (no or bad credentials) or 403 (credentials fine, request refused)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Caller:
    """The credentials of one request. ``token`` None: --no-auth (the server's kubeconfig)."""

    token: str | None
    source: TokenSource

    def __repr__(self) -> str:  # never show the token, even in a traceback's locals
        return f"Caller(source={self.source!r})"

    @property
    def key(self) -> str:
        """A stable, non-reversible name of the token, for cache keys."""
        return token_hash(self.token or "")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def redact(text: str) -> str:
    return _TOKEN_IN_URL.sub(r"\1[REDACTED]", text)


class RedactingFilter(logging.Filter):
    """Redacts ``access_token`` values in a record's message and arguments (access logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {
                k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()
            }
        return True


def install_log_redaction(*loggers: str) -> None:
    """Add the redacting filter to these loggers, once each (idempotent)."""
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())


def caller(conn: HTTPConnection, *, mode: settings_mod.AuthMode) -> Caller:
    """The request's credentials, or AuthError(401) without any."""
    if mode == "none":
        return Caller(None, "none")
    header = conn.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError(401, "Authorization header must be 'Bearer <token>'")
        return _well_formed(Caller(token, "header"))
    # Query tokens only for reads (EventSource cannot set headers); a token in the URL of a
    # write would be one more copy of it in history and proxies for no gain.
    query = conn.query_params.get("access_token")
    if query and conn.scope.get("method", "GET") in ("GET", "HEAD"):
        return _well_formed(Caller(query, "query"))
    cookie = conn.cookies.get(SESSION_COOKIE)
    if cookie:
        return _well_formed(Caller(cookie, "cookie"))
    raise AuthError(401, "no credentials: send 'Authorization: Bearer <token>' or log in")


def _well_formed(who: Caller) -> Caller:
    # Anything else cannot be sent on to the API server in a header (the client library
    # refuses it): the caller's 401, not our 500.
    if who.token is None or not re.fullmatch(bodies.TOKEN_PATTERN, who.token):
        raise AuthError(401, f"malformed token ({who.source}): a bearer token is visible ASCII")
    return who


def csrf_token(token: str) -> str:
    """The CSRF token bound to a session: only someone who knows the token can make it."""
    digest = hmac.new(b"agentrun-csrf-v1", token.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def check_csrf(conn: HTTPConnection, who: Caller) -> None:
    """State-changing requests authenticated by the cookie must echo its CSRF token."""
    if who.source != "cookie" or who.token is None:
        return  # a header or no-auth request cannot be forged by another site
    sent = conn.headers.get(CSRF_HEADER.lower(), "")
    if not sent or not hmac.compare_digest(sent, csrf_token(who.token)):
        raise AuthError(403, f"missing or wrong {CSRF_HEADER} header (cookie session)")


def same_origin(conn: HTTPConnection) -> bool:
    """False when the browser says the request came from another site (login CSRF)."""
    site = conn.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = conn.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == conn.headers.get("host", "")


def set_session(response: Response, *, token: str, secure: bool) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="strict",
        secure=secure,
    )
    # Readable by the page's script, which echoes it in the CSRF header.
    response.set_cookie(
        CSRF_COOKIE,
        csrf_token(token),
        max_age=SESSION_SECONDS,
        path="/",
        httponly=False,
        samesite="strict",
        secure=secure,
    )


def clear_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    response.delete_cookie(CSRF_COOKIE, path="/", samesite="strict")


class RunCache:
    """Recent answers to "may this token get this run", per (token hash, ns, name).

    Short-lived on purpose: a revoked right keeps working for at most ``ttl`` seconds.
    Only successes are kept; bounded in size, oldest first out.
    """

    def __init__(self, *, ttl: float, size: int = 10_000) -> None:
        self._ttl = ttl
        self._size = size
        self._items: OrderedDict[tuple[str, str, str], tuple[float, dict[str, Any]]] = OrderedDict()

    def get(self, key: tuple[str, str, str]) -> dict[str, Any] | None:
        hit = self._items.get(key)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            del self._items[key]
            return None
        return hit[1]

    def put(self, key: tuple[str, str, str], run: dict[str, Any]) -> None:
        if self._ttl <= 0:
            return
        now = time.monotonic()
        self._items[key] = (now + self._ttl, run)
        self._items.move_to_end(key)
        # One ttl for all, so the oldest entries expire first: drop those from the front.
        # (Waiting for the size bound instead would keep thousands of stale AgentRun
        # bodies, one per run ever watched.)
        while len(self._items) > self._size or next(iter(self._items.values()))[0] < now:
            self._items.popitem(last=False)


async def resolve_run(
    kube: kubeapi.KubeAPI,
    *,
    cache: RunCache,
    who: Caller,
    namespace: str,
    name: str,
) -> dict[str, Any]:
    """The AgentRun as the caller may see it (KubeError 401/403/404 otherwise)."""
    key = (who.key, namespace, name)
    run = cache.get(key)
    if run is None:
        run = await kube.get_run(token=who.token, namespace=namespace, name=name)
        cache.put(key, run)
    return run
