"""MCPServers, discovered: the operator connects to each (as its discovery identity), lists
its tools, follows ``tools/list_changed``, and keeps ``status`` (Ready, tools with their
schema hashes, lastError) and Kubernetes Events saying what it found.

Owns one follower task per MCPServer (restarted when its spec changes, reconnecting with a
fresh token before the old one expires) and the identity an MCP request carries: the
MCPServer's header Secrets and, with ``auth: serviceAccountToken``, a TokenRequest token,
both read as a service account (a run's, or the discovery one), never the operator's own.
Never: runs a tool (``engine`` does, through ``mcpclient``), or logs a header value.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from agentrun_operator import approvals, config, kube, mcpclient, models, policy, status

log = logging.getLogger("agentrun.mcp")

TOKEN_SECONDS = 600  # the API's minimum lifetime for a TokenRequest


def url_refusal(url: str, allowed: list[str]) -> str | None:
    """Why an MCPServer's URL may not be used, or None."""
    if not allowed:
        return (
            f"spec.url {url}: the operator allows no MCP server (AGENTRUN_MCP_URL_ALLOW is "
            "empty; the chart value mcp.urlAllow)"
        )
    if not approvals.base_url_allowed(url, allowed):
        return (
            f"spec.url {url} is not in the operator's allow-list (AGENTRUN_MCP_URL_ALLOW: "
            f"{', '.join(allowed)}); use one of those or ask the operator's admin"
        )
    return None


async def endpoint(
    k8s: kube.Kube,
    settings: config.Settings,
    *,
    namespace: str,
    spec: models.MCPServerSpec,
    account: str,
) -> mcpclient.Endpoint:
    """How to reach the server as ``account``: its header Secrets read as that account, and
    (auth: serviceAccountToken) a fresh token of it. Raises mcpclient.MCPFailure."""
    refusal = url_refusal(spec.url, settings.mcp_url_allow)
    if refusal is not None:
        raise mcpclient.MCPFailure(refusal)
    sa = k8s.as_service_account(namespace=namespace, name=account)
    headers: dict[str, str] = {}
    try:
        for header in spec.headers:
            ref = header.secret_key_ref
            headers[header.name] = await sa.read_secret_key(name=ref.name, key=ref.key)
        if spec.auth == "serviceAccountToken":
            token = await k8s.service_account_token(
                namespace=namespace, name=account, audiences=spec.audiences, seconds=TOKEN_SECONDS
            )
            headers["Authorization"] = f"Bearer {token}"
    except kube.KubeError as e:
        if e.transient:
            raise mcpclient.MCPFailure(f"the API server is away: {e}") from None
        raise mcpclient.MCPFailure(
            f"cannot build the request identity as service account {namespace}/{account}: {e}"
        ) from None
    return mcpclient.Endpoint(
        url=spec.url,
        transport=spec.transport,
        headers=headers,
        timeout=models.duration_seconds(spec.timeout),
    )


def offered(spec: models.MCPServerSpec, tools: list[models.MCPTool]) -> list[models.MCPTool]:
    """The server's tools that spec.tools lets runs use."""
    return [t for t in tools if policy.tool_matches(t.name, spec.tools)][: models.MAX_MCP_TOOLS]


class Discovery:
    """The follower tasks, one per MCPServer (by uid)."""

    def __init__(self, k8s: kube.Kube, settings: config.Settings) -> None:
        self._k8s = k8s
        self._settings = settings
        self._followers: dict[str, tuple[int, asyncio.Task[None]]] = {}

    def ensure(self, body: Mapping[str, Any]) -> None:
        """Follow this server as its spec now says (a new generation restarts the follower)."""
        meta = body["metadata"]
        uid, generation = str(meta["uid"]), int(meta.get("generation") or 1)
        current = self._followers.get(uid)
        if current is not None and current[0] == generation and not current[1].done():
            return
        if current is not None:
            current[1].cancel()
        task = asyncio.create_task(self._follow(dict(body)), name=f"mcp-{meta['name']}")
        self._followers[uid] = (generation, task)

    async def forget(self, body: Mapping[str, Any]) -> None:
        found = self._followers.pop(str((body.get("metadata") or {}).get("uid")), None)
        if found is not None:
            found[1].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await found[1]

    async def close(self) -> None:
        for _, task in self._followers.values():
            task.cancel()
        for _, task in list(self._followers.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._followers.clear()

    async def _follow(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        generation = int(meta.get("generation") or 1)
        spec = models.MCPServerSpec.model_validate(body.get("spec") or {})
        account = spec.discovery_service_account_name or "default"
        backoff = 1.0
        said = ""
        conditions = list((body.get("status") or {}).get("conditions") or [])
        while True:
            try:
                ep = await endpoint(
                    self._k8s, self._settings, namespace=namespace, spec=spec, account=account
                )

                async def on_tools(server: str, tools: list[models.MCPTool]) -> None:
                    nonlocal conditions, said
                    shown = offered(spec, tools)
                    conditions = await self._write(
                        namespace,
                        name,
                        conditions,
                        generation,
                        ready=True,
                        reason="ToolsListed",
                        message=f"{len(shown)} tools from {server or spec.url}",
                        extra={
                            "tools": [
                                t.model_dump(by_alias=True, exclude_none=True) for t in shown
                            ],
                            "toolCount": len(shown),
                            "serverName": server or None,
                            "lastError": None,
                            "refreshedAt": _now(),
                        },
                    )
                    said = ""

                # Reconnect before the token expires, and at least every refresh period.
                lifetime = min(self._settings.mcp_refresh_seconds, TOKEN_SECONDS * 0.8)
                await mcpclient.follow(ep, on_tools, lifetime=lifetime)
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except mcpclient.MCPFailure as e:
                if e.message != said:
                    said = e.message
                    log.warning("MCPServer %s/%s: %s", namespace, name, e.message)
                    try:
                        conditions = await self._write(
                            namespace,
                            name,
                            conditions,
                            generation,
                            ready=False,
                            reason="Unreachable",
                            message=e.message,
                            extra={"lastError": e.message[:4096]},
                        )
                    except kube.KubeError as w:
                        if w.status == 404:
                            return  # the MCPServer is gone: so is its follower
                    await self._k8s.post_event(
                        involved={**body, "kind": "MCPServer"},
                        type="Warning",
                        reason="MCPServerUnreachable",
                        message=e.message,
                    )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
            except kube.KubeError as e:
                if e.status == 404:
                    return  # the MCPServer is gone: so is its follower
                log.warning("MCPServer %s/%s: status not written: %s", namespace, name, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)

    async def _write(
        self,
        namespace: str,
        name: str,
        conditions: list[dict[str, Any]],
        generation: int,
        *,
        ready: bool,
        reason: str,
        message: str,
        extra: dict[str, Any],
    ) -> list[dict[str, Any]]:
        merged = status.merge_conditions(
            conditions,
            {"Ready": "True" if ready else "False"},
            reason=reason,
            message=message[:1024],
            generation=generation,
            now=_now(),
        )
        await self._k8s.patch_mcpserver_status(
            namespace=namespace,
            name=name,
            status={"conditions": merged, "observedGeneration": generation, **extra},
        )
        return merged


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
