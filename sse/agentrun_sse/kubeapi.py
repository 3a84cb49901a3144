"""The SSE server's one client of the Kubernetes API: a few REST calls over httpx, each made
with the caller's own bearer token.

Owns: the connection pool and TLS trust of the API server, and the handful of calls the
server makes (get/list/create/patch AgentRuns, list/patch ToolApprovals, self-reviews),
turning error answers into :class:`KubeError` with the API server's status and message.
Never: holds credentials of its own (outside the ``--no-auth`` development mode, where the
kubeconfig's user is used), logs a token or a request's headers, or decides anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import tempfile
from typing import Any
from urllib.parse import quote

import httpx

from agentrun_operator import contract
from agentrun_operator.contract import KubeError as KubeError
from agentrun_sse import settings as settings_mod

GROUP = contract.GROUP
VERSION = contract.VERSION
API_VERSION = contract.API_VERSION
MERGE_PATCH = "application/merge-patch+json"


def _ssl_context(target: settings_mod.KubeTarget) -> ssl.SSLContext | bool:
    if target.insecure:
        return False
    ctx = ssl.create_default_context(
        cafile=target.ca_file,
        cadata=target.ca_data.decode() if target.ca_data else None,
    )
    if target.client_cert_data and target.client_key_data:
        # load_cert_chain takes files only; they live for the blink of this call.
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = os.path.join(tmp, "c"), os.path.join(tmp, "k")
            for path, data in ((cert, target.client_cert_data), (key, target.client_key_data)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            ctx.load_cert_chain(cert, key)
    return ctx


class KubeAPI:
    """Calls to the API server as a given caller (their bearer token)."""

    def __init__(self, target: settings_mod.KubeTarget, *, timeout: float = 15.0) -> None:
        self._target = target
        self._client = httpx.AsyncClient(
            base_url=target.server,
            verify=_ssl_context(target),
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            headers={"Accept": "application/json", "User-Agent": "agentrun-sse"},
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        token: str | None,
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        headers: dict[str, str] = {}
        bearer = token if token is not None else self._target.token
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        content = None
        if body is not None:
            headers["Content-Type"] = content_type
            content = json.dumps(body).encode()
        if method in ("POST", "PUT", "PATCH"):
            # An unknown field is an error naming it, not silently dropped (as kubectl since
            # 1.27); servers before 1.25 ignore the parameter.
            params = {"fieldValidation": "Strict", **(params or {})}
        try:
            r = await self._client.request(
                method, path, params=params, content=content, headers=headers
            )
        except httpx.HTTPError as e:
            # The exception text names the URL only; no header (token) is in it.
            raise KubeError(502, "Unreachable", f"Kubernetes API: {type(e).__name__}") from None
        if r.status_code >= 400:
            reason, message = "Error", r.text[:1000]
            with contextlib.suppress(ValueError):
                status = r.json()
                if isinstance(status, dict):
                    reason = str(status.get("reason") or reason)
                    message = str(status.get("message") or message)
            raise KubeError(r.status_code, reason, message)
        try:
            result: dict[str, Any] = r.json()
        except ValueError:
            raise KubeError(502, "BadResponse", "Kubernetes API answered with no JSON") from None
        return result

    # -- AgentRuns -------------------------------------------------------------------
    @staticmethod
    def _runs(namespace: str | None, name: str | None = None) -> str:
        base = f"/apis/{GROUP}/{VERSION}"
        if namespace is None:
            return f"{base}/agentruns"
        path = f"{base}/namespaces/{quote(namespace, safe='')}/agentruns"
        return path if name is None else f"{path}/{quote(name, safe='')}"

    async def get_run(self, *, token: str | None, namespace: str, name: str) -> dict[str, Any]:
        return await self._call("GET", self._runs(namespace, name), token=token)

    async def list_runs(self, *, token: str | None, namespace: str | None) -> dict[str, Any]:
        return await self._call("GET", self._runs(namespace), token=token)

    async def create_run(
        self, *, token: str | None, namespace: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        return await self._call("POST", self._runs(namespace), token=token, body=body)

    async def patch_run(
        self, *, token: str | None, namespace: str, name: str, patch: dict[str, Any]
    ) -> dict[str, Any]:
        return await self._call(
            "PATCH",
            self._runs(namespace, name),
            token=token,
            body=patch,
            content_type=MERGE_PATCH,
        )

    # -- ToolApprovals ---------------------------------------------------------------
    @staticmethod
    def _approvals(namespace: str, name: str | None = None) -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace, safe='')}/toolapprovals"
        return path if name is None else f"{path}/{quote(name, safe='')}"

    async def list_approvals(
        self, *, token: str | None, namespace: str, label_selector: str
    ) -> dict[str, Any]:
        return await self._call(
            "GET",
            self._approvals(namespace),
            token=token,
            params={"labelSelector": label_selector},
        )

    async def patch_approval(
        self, *, token: str | None, namespace: str, name: str, patch: dict[str, Any]
    ) -> dict[str, Any]:
        return await self._call(
            "PATCH",
            self._approvals(namespace, name),
            token=token,
            body=patch,
            content_type=MERGE_PATCH,
        )

    # -- identity --------------------------------------------------------------------
    async def check_token(self, *, token: str | None) -> bool:
        """Authenticate a token: a SelfSubjectAccessReview any signed-in user may make.

        True when the API server accepts the token; a rejected one raises KubeError(401).
        """
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {"group": GROUP, "resource": "agentruns", "verb": "get"}
            },
        }
        await self._call(
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            token=token,
            body=review,
        )
        return True

    async def username(self, *, token: str | None) -> str:
        """The caller's user name from a SelfSubjectReview (Kubernetes >= 1.27), or ""."""
        for version in ("v1", "v1beta1", "v1alpha1"):
            review = {"apiVersion": f"authentication.k8s.io/{version}", "kind": "SelfSubjectReview"}
            try:
                answer = await self._call(
                    "POST",
                    f"/apis/authentication.k8s.io/{version}/selfsubjectreviews",
                    token=token,
                    body=review,
                )
            except KubeError as e:
                if e.status in (404, 405):
                    continue  # an older API server: no such review
                return ""
            info = (answer.get("status") or {}).get("userInfo") or {}
            return str(info.get("username") or "")
        return ""
