"""The product's HTTP servers keep an idle connection open longer than their clients do.

The API server keeps idle connections to a webhook for 90 s, NGINX (and ingress-nginx) its
upstream connections for 60 s, and both send the next request on one they hold. A server
that closes first (uvicorn's default: after 5 s) can close a connection just as a request
goes out on it: the API server then refuses an admission request with ``EOF`` (seen on the
1.20 node), NGINX answers a stop (a POST, never retried) with 502.

Covers: a request on a connection left idle past uvicorn's default is answered, on the
webhook server (TLS, its own process, as the chart runs it) and on the SSE server (its
production uvicorn configuration), each on the same socket; the configured idle timeouts
exceed the clients' own.
"""

from __future__ import annotations

import asyncio
import http.client
import ssl
import time

from agentrun_harness import sse as sse_harness
from agentrun_harness.controlplane import ControlPlane
from agentrun_harness.operatorproc import WebhookProcess
from agentrun_operator import webhooks as webhooks_mod
from agentrun_sse import app as sse_app

from sse_support import sse_settings
from support import newest_only

pytestmark = newest_only("the servers' keep-alive does not depend on the Kubernetes version")

# Past uvicorn's default keep-alive (5 s): long enough for a server that closes first to
# have closed. The wait is what is tested (a connection left idle), not a synchronisation.
IDLE_SECONDS = 6.5


def _twice(conn: http.client.HTTPConnection, path: str) -> tuple[int, int, bool]:
    """``path`` asked twice on one connection, idle in between: both statuses, and whether
    the second went over the same socket."""
    conn.request("GET", path)
    first = conn.getresponse()
    first.read()
    sock = conn.sock
    time.sleep(IDLE_SECONDS)
    conn.request("GET", path)
    second = conn.getresponse()
    second.read()
    return first.status, second.status, conn.sock is sock


async def test_idle_connections_outlive_uvicorns_default_on_the_webhook_and_sse_servers(
    cluster: ControlPlane, webhooks: WebhookProcess, server: sse_harness.LiveServer
) -> None:
    ctx = ssl.create_default_context(cafile=str(cluster.ca_file))
    hook = http.client.HTTPSConnection("127.0.0.1", webhooks.port, context=ctx, timeout=10)
    sse = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        # Both idle at once (in threads: the SSE server runs on this event loop).
        hook_seen, sse_seen = await asyncio.gather(
            asyncio.to_thread(_twice, hook, "/healthz"), asyncio.to_thread(_twice, sse, "/healthz")
        )
    finally:
        hook.close()
        sse.close()
    assert hook_seen == (200, 200, True), hook_seen
    assert sse_seen == (200, 200, True), sse_seen
    # And longer than the clients keep theirs: the API server's 90 s for webhooks, NGINX's
    # 60 s upstream keepalive_timeout for the SSE server.
    assert webhooks_mod.KEEP_ALIVE_SECONDS > 90
    config = sse_app.uvicorn_config(server.app, sse_settings(cluster, "redis://unused"))
    assert config.timeout_keep_alive > 60
