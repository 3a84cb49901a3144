"""The one module that talks to the Kubernetes API (besides kopf's own watches).

Owns: the connection (in-cluster config or a kubeconfig), the few calls the operator makes
with its own identity (read an AgentRun, patch its ``/status``, post Events, delete it),
discovery (kind names resolved the way kubectl does, cached), and clients that act as a
run's service account through impersonation, for the tools and the model's API key.

Never: writes an AgentRun's ``spec``; acts for a run with the operator's own rights (tools
and Secret reads go through :class:`ServiceAccountKube`); puts a Secret's value in a log line
or an error message; decides anything about runs (that is the callers' business).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
from kubernetes_asyncio import client, config

from agentrun_operator import models
from agentrun_operator.contract import KubeError as KubeError

logger = logging.getLogger(__name__)

FIELD_MANAGER = "agentrun"
COMPONENT = "agentrun-operator"
PatchType = Literal["merge", "strategic", "json"]
EventType = Literal["Normal", "Warning"]

_CONTENT_TYPES: dict[str, str] = {
    "merge": "application/merge-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/json-patch+json",
    "apply": "application/apply-patch+yaml",
}
_REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=10)
# Discovery is read again after this long, or sooner when a kind is not found (a CRD may
# have been installed since), but never more often than the minimum.
_DISCOVERY_TTL = 600.0
_DISCOVERY_MIN_REFRESH = 10.0


class UnknownKindError(KubeError):
    """No resource type the server serves matches the kind (and apiVersion) asked for."""

    def __init__(self, message: str) -> None:
        super().__init__(404, "UnknownKind", message)


@dataclass(frozen=True)
class ResourceType:
    """One resource type from discovery, e.g. apps/v1 deployments."""

    group: str
    version: str
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    namespaced: bool
    preferred: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, *, namespace: str | None, name: str | None = None, subresource: str | None = None
    ) -> str:
        parts = ["/api/v1"] if not self.group else [f"/apis/{self.group}/{self.version}"]
        if self.namespaced and namespace:
            parts += ["namespaces", _segment(namespace, "namespace")]
        parts.append(self.plural)
        if name is not None:
            parts.append(_segment(name, "name"))
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


def _segment(value: str, what: str) -> str:
    # A name becomes one URL path segment; "..", "/" or "%" would let it address another.
    if not value or value in (".", "..") or "/" in value or "%" in value:
        raise KubeError(400, "BadRequest", f"invalid {what} {value!r}")
    return quote(value, safe="")


AGENTRUNS = ResourceType(
    group=models.GROUP,
    version=models.VERSION,
    kind="AgentRun",
    plural="agentruns",
    singular="agentrun",
    short_names=("ar",),
    namespaced=True,
    preferred=True,
)
TOOLAPPROVALS = ResourceType(
    group=models.GROUP,
    version=models.VERSION,
    kind="ToolApproval",
    plural="toolapprovals",
    singular="toolapproval",
    short_names=("ta",),
    namespaced=True,
    preferred=True,
)
MCPSERVERS = ResourceType(
    group=models.GROUP,
    version=models.VERSION,
    kind="MCPServer",
    plural="mcpservers",
    singular="mcpserver",
    short_names=("mcp",),
    namespaced=True,
    preferred=True,
)
AGENTPOLICIES = ResourceType(
    group=models.GROUP,
    version=models.VERSION,
    kind="AgentPolicy",
    plural="agentpolicies",
    singular="agentpolicy",
    short_names=("ap",),
    namespaced=True,
    preferred=True,
)
CLUSTERAGENTPOLICIES = ResourceType(
    group=models.GROUP,
    version=models.VERSION,
    kind="ClusterAgentPolicy",
    plural="clusteragentpolicies",
    singular="clusteragentpolicy",
    short_names=("cap",),
    namespaced=False,
    preferred=True,
)
EVENTS = ResourceType(
    group="",
    version="v1",
    kind="Event",
    plural="events",
    singular="event",
    short_names=("ev",),
    namespaced=True,
    preferred=True,
)
PODS = ResourceType(
    group="",
    version="v1",
    kind="Pod",
    plural="pods",
    singular="pod",
    short_names=("po",),
    namespaced=True,
    preferred=True,
)
SECRETS = ResourceType(
    group="",
    version="v1",
    kind="Secret",
    plural="secrets",
    singular="secret",
    short_names=(),
    namespaced=True,
    preferred=True,
)


class Kube:
    """The API server, as the operator. Built once at start; ``close()`` at the end."""

    def __init__(self, api: client.ApiClient) -> None:
        self._api = api
        self._api.user_agent = COMPONENT
        self._discovery = _Discovery(self)
        self._accounts: dict[tuple[str, str], ServiceAccountKube] = {}

    @classmethod
    async def from_env(cls) -> Kube:
        """In-cluster config when running in a pod, else ``$KUBECONFIG`` or ~/.kube/config."""
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            # Read here, not at import: the library reads $KUBECONFIG once when imported.
            path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            return await cls.from_kubeconfig(path)
        return cls(client.ApiClient(configuration))

    @classmethod
    async def from_kubeconfig(
        cls, path: str | os.PathLike[str], *, context: str | None = None
    ) -> Kube:
        configuration = client.Configuration()
        await config.load_kube_config(
            config_file=os.fspath(path),
            context=context,
            client_configuration=configuration,
            persist_config=False,
        )
        return cls(client.ApiClient(configuration))

    async def close(self) -> None:
        await self._api.close()

    def bearer_token(self) -> str | None:
        """The bearer token this client authenticates with (a kubeconfig's token or exec
        plugin, or the pod's service-account token), or None for client certificates."""
        keys = self._api.configuration.api_key
        auth = str(keys.get("BearerToken") or keys.get("authorization") or "")
        scheme, _, token = auth.partition(" ")
        return token if scheme.lower() == "bearer" and token else None

    # -- the operator's own calls ----------------------------------------------------------
    async def get_agentrun(self, *, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get_or_none(AGENTRUNS.path(namespace=namespace, name=name))

    async def _get_or_none(self, path: str) -> dict[str, Any] | None:
        """The object at ``path``, or None when it does not exist."""
        try:
            found: dict[str, Any] = await self.request("GET", path)
        except KubeError as e:
            if e.status == 404:
                return None
            raise
        return found

    async def cluster_id(self) -> str:
        """The cluster's identity: the uid of its kube-system namespace (stable for the
        cluster's life, different in every cluster)."""
        found = await self.request("GET", "/api/v1/namespaces/kube-system")
        return str(found["metadata"]["uid"])

    async def may(
        self,
        *,
        user: str,
        groups: list[str],
        uid: str = "",
        extra: dict[str, list[str]] | None = None,
        namespace: str,
        verb: str,
        group: str,
        resource: str,
        name: str,
    ) -> tuple[bool, str]:
        """Whether ``user`` may ``verb`` the named resource (a SubjectAccessReview, which
        also answers for virtual resources no API serves); (allowed, the authorizer's
        reason)."""
        review = await self.request(
            "POST",
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            body={
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": user,
                    "groups": groups,
                    **({"uid": uid} if uid else {}),
                    **({"extra": extra} if extra else {}),
                    "resourceAttributes": {
                        "namespace": namespace,
                        "verb": verb,
                        "group": group,
                        "resource": resource,
                        "name": name,
                    },
                },
            },
        )
        st = review.get("status") or {}
        return bool(st.get("allowed")), str(st.get("reason") or "")

    async def get_mcpserver(self, *, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get_or_none(MCPSERVERS.path(namespace=namespace, name=name))

    async def patch_mcpserver_status(
        self, *, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        """JSON merge patch of an MCPServer's ``status``."""
        result: dict[str, Any] = await self.request(
            "PATCH",
            MCPSERVERS.path(namespace=namespace, name=name, subresource="status"),
            body={"status": status},
            content_type=_CONTENT_TYPES["merge"],
        )
        return result

    async def service_account_token(
        self, *, namespace: str, name: str, audiences: list[str], seconds: int = 600
    ) -> str:
        """A TokenRequest token of a service account (the operator needs ``create`` on
        ``serviceaccounts/token``). Empty ``audiences``: the API server's own. Never log it."""
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if audiences:
            spec["audiences"] = list(audiences)
        answer = await self.request(
            "POST",
            f"/api/v1/namespaces/{_segment(namespace, 'namespace')}/serviceaccounts/"
            f"{_segment(name, 'name')}/token",
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return str((answer.get("status") or {}).get("token") or "")

    async def policies_for(self, namespace: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """The AgentPolicies of ``namespace`` and every ClusterAgentPolicy (each with its
        kind), and the namespace's labels (for the cluster policies' selectors). No policy
        CRDs installed (an upgrade that skipped them): no policies."""
        bodies: list[dict[str, Any]] = []
        for rt, ns in ((AGENTPOLICIES, namespace), (CLUSTERAGENTPOLICIES, None)):
            try:
                found = await self.request("GET", rt.path(namespace=ns))
            except KubeError as e:
                if e.status == 404:
                    continue
                raise
            bodies += [{**item, "kind": rt.kind} for item in found.get("items") or []]
        return bodies, await self.namespace_labels(namespace)

    async def namespace_labels(self, namespace: str) -> dict[str, str]:
        ns = await self.request("GET", f"/api/v1/namespaces/{_segment(namespace, 'namespace')}")
        labels = (ns.get("metadata") or {}).get("labels") or {}
        return {str(k): str(v) for k, v in labels.items()}

    async def list_agentruns(self, *, namespace: str | None) -> list[dict[str, Any]]:
        """The AgentRuns of ``namespace`` (None: of every namespace)."""
        found = await self.request("GET", AGENTRUNS.path(namespace=namespace))
        return list(found.get("items") or [])

    async def patch_agentrun_status(
        self, *, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        """JSON merge patch of ``status`` through the status subresource."""
        result: dict[str, Any] = await self.request(
            "PATCH",
            AGENTRUNS.path(namespace=namespace, name=name, subresource="status"),
            body={"status": status},
            content_type=_CONTENT_TYPES["merge"],
        )
        return result

    async def delete_agentrun(self, *, namespace: str, name: str) -> None:
        try:
            await self.request("DELETE", AGENTRUNS.path(namespace=namespace, name=name))
        except KubeError as e:
            if e.status != 404:
                raise

    async def create_toolapproval(self, *, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create a ToolApproval; an existing one of the same name is returned as it is."""
        try:
            created: dict[str, Any] = await self.request(
                "POST", TOOLAPPROVALS.path(namespace=namespace), body=body
            )
            return created
        except KubeError as e:
            if e.status != 409:
                raise
        existing: dict[str, Any] = await self.request(
            "GET", TOOLAPPROVALS.path(namespace=namespace, name=body["metadata"]["name"])
        )
        return existing

    async def list_toolapprovals(
        self, *, namespace: str, label_selector: str
    ) -> list[dict[str, Any]]:
        found = await self.request(
            "GET",
            TOOLAPPROVALS.path(namespace=namespace),
            query={"labelSelector": label_selector},
        )
        return list(found.get("items") or [])

    async def get_toolapproval(self, *, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get_or_none(TOOLAPPROVALS.path(namespace=namespace, name=name))

    async def patch_toolapproval_status(
        self, *, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "PATCH",
            TOOLAPPROVALS.path(namespace=namespace, name=name, subresource="status"),
            body={"status": status},
            content_type=_CONTENT_TYPES["merge"],
        )
        return result

    async def patch_toolapproval(
        self, *, namespace: str, name: str, patch: dict[str, Any]
    ) -> dict[str, Any]:
        """Merge patch of the object (people's decisions go through the webhooks)."""
        result: dict[str, Any] = await self.request(
            "PATCH",
            TOOLAPPROVALS.path(namespace=namespace, name=name),
            body=patch,
            content_type=_CONTENT_TYPES["merge"],
        )
        return result

    async def post_event(
        self, *, involved: dict[str, Any], type: EventType, reason: str, message: str
    ) -> None:
        """A core/v1 Event about ``involved`` (an object body); logs instead of raising."""
        meta = involved.get("metadata", {})
        namespace = meta.get("namespace") or "default"
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{meta.get('name', 'agentrun')}.",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", models.API_VERSION),
                "kind": involved.get("kind", "AgentRun"),
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type,
            "reason": reason[:128],
            # kubectl and kopf cut messages at 1 KiB: Events are for people, not payloads.
            "message": message if len(message) <= 1024 else message[:1021] + "...",
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": socket.gethostname(),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.request("POST", EVENTS.path(namespace=namespace), body=body)
        except Exception as e:  # an Event is a courtesy: it must never fail a run
            logger.warning(
                "could not post event %s on %s/%s: %s", reason, namespace, meta.get("name"), e
            )

    def as_service_account(self, *, namespace: str, name: str | None) -> ServiceAccountKube:
        """A client acting as ``system:serviceaccount:<namespace>:<name or default>``."""
        key = (namespace, name or "default")
        account = self._accounts.get(key)
        if account is None:
            account = self._accounts[key] = ServiceAccountKube(self, namespace=key[0], name=key[1])
        return account

    async def resolve(self, *, kind: str, api_version: str | None = None) -> ResourceType:
        """The resource type for a kind, plural, singular or short name (kubectl's rules)."""
        return await self._discovery.resolve(kind=kind, api_version=api_version)

    # -- HTTP ------------------------------------------------------------------------------
    async def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str | int | bool | None] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        impersonate: str | None = None,
        text: bool = False,
    ) -> Any:
        """One API call; the JSON answer (or text, for logs). Raises :class:`KubeError`."""
        headers = {"Content-Type": content_type, "Accept": "application/json, */*"}
        if impersonate:
            # Only the user: for a service account name the API server adds exactly its
            # groups (system:serviceaccounts, system:serviceaccounts:<ns>,
            # system:authenticated) itself. Sending Impersonate-Group would also need the
            # `impersonate` verb on groups, which would let the operator claim any group.
            headers["Impersonate-User"] = impersonate
        query = dict(query or {})
        if method in _WRITES:
            # Unknown or duplicate fields are an error, as kubectl apply makes them since
            # 1.27: the operator's own writes must match the CRDs, and an agent's k8s_patch
            # or k8s_apply with a misspelled field fails, naming it, instead of dropping it.
            # Servers before 1.25 ignore the parameter.
            query.setdefault("fieldValidation", "Strict")
        params = [
            (k, ("true" if v else "false") if isinstance(v, bool) else str(v))
            for k, v in query.items()
            if v is not None
        ]
        try:
            resp = await self._api.call_api(
                path,
                method,
                query_params=params,
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=_REQUEST_TIMEOUT,
            )
            try:
                raw = await resp.read()
            finally:
                resp.release()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise KubeError(0, "Unreachable", f"{method} {path}: {type(e).__name__}: {e}") from e
        if not 200 <= resp.status < 300:
            raise _error(resp.status, resp.reason, raw)
        if text:
            return raw.decode("utf-8", errors="replace")
        if not raw:
            return {}
        return json.loads(raw)

    async def watch(
        self, path: str, *, resource_version: str, timeout_seconds: int = 290
    ) -> AsyncIterator[dict[str, Any]]:
        """The watch events of a collection from ``resource_version`` ({"type", "object"};
        bookmarks included) until the server ends the watch. Raises KubeError (410: the
        version is too old, list again; 0: the connection broke)."""
        params = [
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        try:
            resp = await self._api.call_api(
                path,
                "GET",
                query_params=params,
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=10, sock_read=timeout_seconds + 30
                ),
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise KubeError(0, "Unreachable", f"watch {path}: {type(e).__name__}: {e}") from e
        try:
            if not 200 <= resp.status < 300:
                raise _error(resp.status, resp.reason, await resp.read())
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise KubeError(
                        int(status.get("code") or 500),
                        str(status.get("reason") or "Error"),
                        str(status.get("message") or ""),
                    )
                yield event
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise KubeError(0, "Unreachable", f"watch {path}: {type(e).__name__}: {e}") from e
        finally:
            resp.release()


_WRITES = frozenset({"POST", "PUT", "PATCH"})


def _error(status: int, reason: str | None, raw: bytes) -> KubeError:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("kind") == "Status":
        return KubeError(
            int(doc.get("code") or status),
            str(doc.get("reason") or reason or "Error"),
            str(doc.get("message") or ""),
        )
    return KubeError(status, reason or "Error", raw.decode("utf-8", errors="replace")[:1000])


_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class ServiceAccountKube:
    """The API server as one service account (impersonated): a run has exactly its rights."""

    def __init__(self, kube: Kube, *, namespace: str, name: str) -> None:
        self._kube = kube
        self.namespace = namespace
        self.name = name
        self.username = f"system:serviceaccount:{namespace}:{name}"

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return await self._kube.request(method, path, impersonate=self.username, **kwargs)

    async def resolve(self, *, kind: str, api_version: str | None = None) -> ResourceType:
        return await self._kube.resolve(kind=kind, api_version=api_version)

    def dry_run(self) -> DryRunKube:
        """The same account, with every write a server-side dry run."""
        return DryRunKube(self._kube, namespace=self.namespace, name=self.name)

    def bound(
        self,
        *,
        path: str,
        uid: str | None,
        resource_version: str | None,
        fresh: Callable[[], Awaitable[str | None]],
    ) -> BoundKube:
        """The same account, its writes to the object at ``path`` bound to one version."""
        return BoundKube(
            self._kube,
            namespace=self.namespace,
            name=self.name,
            path=path,
            uid=uid,
            resource_version=resource_version,
            fresh=fresh,
        )

    async def read_secret_key(self, *, name: str, key: str) -> str:
        """The value of one key of a Secret in this account's namespace."""
        where = f"Secret {self.namespace}/{name}"
        try:
            secret = await self._call("GET", SECRETS.path(namespace=self.namespace, name=name))
        except KubeError as e:
            raise KubeError(
                e.status, e.reason, f"cannot read {where} as {self.username}: {e.message}"
            ) from None
        data = secret.get("data") or {}
        if key not in data:
            raise KubeError(404, "KeyNotFound", f"{where} has no key {key!r}")
        try:
            value = base64.b64decode(data[key], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise KubeError(422, "Invalid", f"key {key!r} of {where} is not UTF-8 text") from None
        # `echo "$KEY" | kubectl create secret ...` leaves a newline no endpoint wants.
        return value.strip()

    async def get_object(
        self, *, kind: str, name: str, namespace: str, api_version: str | None = None
    ) -> dict[str, Any]:
        rt = await self.resolve(kind=kind, api_version=api_version)
        result: dict[str, Any] = await self._call("GET", rt.path(namespace=namespace, name=name))
        return result

    async def list_objects(
        self,
        *,
        kind: str,
        namespace: str | None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        api_version: str | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """A List; ``namespace`` None lists a namespaced kind across all namespaces."""
        rt = await self.resolve(kind=kind, api_version=api_version)
        query: dict[str, Any] = {
            "labelSelector": label_selector,
            "fieldSelector": field_selector,
            "limit": limit,
        }
        result: dict[str, Any] = await self._call("GET", rt.path(namespace=namespace), query=query)
        return result

    async def patch_object(
        self,
        *,
        kind: str,
        name: str,
        namespace: str,
        patch: dict[str, Any] | list[Any],
        patch_type: PatchType = "merge",
        api_version: str | None = None,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        rt = await self.resolve(kind=kind, api_version=api_version)
        result: dict[str, Any] = await self._call(
            "PATCH",
            rt.path(namespace=namespace, name=name, subresource=subresource),
            body=patch,
            content_type=_CONTENT_TYPES[patch_type],
        )
        return result

    async def delete_object(
        self,
        *,
        kind: str,
        name: str,
        namespace: str,
        api_version: str | None = None,
        uid: str | None = None,
    ) -> dict[str, Any]:
        """Delete; with ``uid``, only that incarnation of the name (a precondition)."""
        rt = await self.resolve(kind=kind, api_version=api_version)
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if uid:
            body["preconditions"] = {"uid": uid}
        result: dict[str, Any] = await self._call(
            "DELETE", rt.path(namespace=namespace, name=name), body=body
        )
        return result

    async def apply_object(
        self, *, manifest: dict[str, Any], namespace: str, force: bool = False
    ) -> dict[str, Any]:
        """Server-side apply with field manager ``agentrun``; ``namespace`` fills a gap."""
        meta = manifest.get("metadata") or {}
        rt = await self.resolve(
            kind=str(manifest.get("kind", "")), api_version=manifest.get("apiVersion")
        )
        body = {**manifest, "apiVersion": rt.api_version, "kind": rt.kind}
        ns = meta.get("namespace") or namespace
        if rt.namespaced:
            body["metadata"] = {**meta, "namespace": ns}
        result: dict[str, Any] = await self._call(
            "PATCH",
            rt.path(namespace=ns, name=str(meta.get("name", ""))),
            body=body,
            content_type=_CONTENT_TYPES["apply"],
            query={"fieldManager": FIELD_MANAGER, "force": force},
        )
        return result

    async def pod_logs(
        self,
        *,
        name: str,
        namespace: str,
        container: str | None = None,
        tail_lines: int | None = None,
        previous: bool = False,
        limit_bytes: int | None = None,
    ) -> str:
        query: dict[str, Any] = {
            "container": container,
            "tailLines": tail_lines,
            "previous": previous,
            "limitBytes": limit_bytes,
        }
        path = PODS.path(namespace=namespace, name=name, subresource="log")
        result: str = await self._call("GET", path, query=query, text=True)
        return result

    async def list_events(
        self,
        *,
        namespace: str,
        kind: str | None = None,
        name: str | None = None,
        uid: str | None = None,
    ) -> list[dict[str, Any]]:
        """core/v1 Events in a namespace, filtered on the involved object, oldest first."""
        selectors = [
            f"involvedObject.{field}={value}"
            for field, value in (("kind", kind), ("name", name), ("uid", uid))
            if value
        ]
        result = await self._call(
            "GET",
            EVENTS.path(namespace=namespace),
            query={"fieldSelector": ",".join(selectors) or None},
        )
        items: list[dict[str, Any]] = result.get("items") or []
        return sorted(items, key=_event_time)


def _event_time(event: dict[str, Any]) -> str:
    return str(
        event.get("lastTimestamp")
        or event.get("eventTime")
        or event.get("firstTimestamp")
        or event.get("metadata", {}).get("creationTimestamp")
        or ""
    )


class DryRunKube(ServiceAccountKube):
    """A service account whose every write is a server-side dry run (``dryRun=All``): the API
    server authorizes, admits and validates it as the real write, and persists nothing.
    ``written`` holds each write's answer (what the object would be), in order."""

    def __init__(self, kube: Kube, *, namespace: str, name: str) -> None:
        super().__init__(kube, namespace=namespace, name=name)
        self.written: list[tuple[str, Any]] = []

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        if method not in _WRITE_METHODS:
            return await super()._call(method, path, **kwargs)
        kwargs["query"] = {**(kwargs.get("query") or {}), "dryRun": "All"}
        if method == "DELETE":
            # A DELETE with a body (DeleteOptions) takes its options from the body only:
            # the query's dryRun would be ignored, and the object really deleted.
            options = kwargs.get("body") or {"apiVersion": "v1", "kind": "DeleteOptions"}
            kwargs["body"] = {**options, "dryRun": ["All"]}
        result = await super()._call(method, path, **kwargs)
        self.written.append((method, result))
        return result


class BoundKube(ServiceAccountKube):
    """A service account whose writes to one object go only to the version people approved.

    A patch or apply of the object at ``path`` carries its uid and ``resource_version`` as
    preconditions (in a merge or apply body's metadata; as ``test`` operations ahead of a
    JSON patch), so the API server refuses it if the object changed after the check; with
    ``resource_version`` None only the uid is bound (a pod's deletion: its status churns).
    A write to an object that did not exist (``uid`` None) is a create, and AlreadyExists
    says it appeared meanwhile. When the server refuses a precondition, ``fresh()`` reads
    the object again: a newer resourceVersion to retry with when only its status moved, or
    None when it really changed (then the refusal stands)."""

    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        name: str,
        path: str,
        uid: str | None,
        resource_version: str | None,
        fresh: Callable[[], Awaitable[str | None]],
    ) -> None:
        super().__init__(kube, namespace=namespace, name=name)
        self._path = path
        self._uid = uid
        self._rv = resource_version
        self._fresh = fresh
        # Set when the API server refused a bound write because the object really changed
        # after the check (not a status write): the approval no longer holds.
        self.changed = False

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        if method != "PATCH" or path != self._path:
            return await super()._call(method, path, **kwargs)
        if self._uid is None:
            if kwargs.get("content_type") != _CONTENT_TYPES["apply"]:
                return await super()._call(method, path, **kwargs)
            # It did not exist when people approved: create it, never overwrite one that
            # appeared meanwhile (AlreadyExists).
            query = {k: v for k, v in (kwargs.get("query") or {}).items() if k != "force"}
            collection = path.rsplit("/", 1)[0]
            try:
                return await super()._call("POST", collection, body=kwargs.get("body"), query=query)
            except KubeError as e:
                if e.status == 409:
                    self.changed = True  # AlreadyExists: it appeared after the approval
                raise
        for attempt in range(3):
            try:
                return await super()._call(method, path, **{**kwargs, "body": self._bind(kwargs)})
            except KubeError as e:
                json_patch = kwargs.get("content_type") == _CONTENT_TYPES["json"]
                if (e.status != 409 and not (json_patch and e.status == 422)) or attempt == 2:
                    raise
                newer = await self._fresh()
                if newer is None:
                    self.changed = True
                    raise  # it changed since people approved it: the refusal stands
                if newer == self._rv:
                    raise  # not a precondition: the patch itself failed
                self._rv = newer  # only its status moved: the same version people approved
        raise AssertionError("unreachable")

    def _bind(self, kwargs: dict[str, Any]) -> Any:
        body = kwargs.get("body")
        guard = {"uid": self._uid, **({"resourceVersion": self._rv} if self._rv else {})}
        if isinstance(body, list):
            tests = [{"op": "test", "path": f"/metadata/{k}", "value": v} for k, v in guard.items()]
            return [*tests, *body]
        if isinstance(body, dict):
            return {**body, "metadata": {**(body.get("metadata") or {}), **guard}}
        return body


class _Discovery:
    """Which resource types the server serves, read once and cached (as the operator:
    discovery is open to every authenticated identity, so sharing it leaks nothing)."""

    def __init__(self, kube: Kube) -> None:
        self._kube = kube
        self._types: list[ResourceType] = []
        self._loaded_at = -_DISCOVERY_TTL
        self._lock = asyncio.Lock()

    async def resolve(self, *, kind: str, api_version: str | None) -> ResourceType:
        age = time.monotonic() - self._loaded_at
        if age > _DISCOVERY_TTL:
            await self._load()
        found = self._match(kind, api_version)
        if found is None and time.monotonic() - self._loaded_at > _DISCOVERY_MIN_REFRESH:
            await self._load()
            found = self._match(kind, api_version)
        if found is None:
            where = f" in {api_version}" if api_version else ""
            raise UnknownKindError(f"the server has no resource type {kind!r}{where}")
        return found

    def _match(self, kind: str, api_version: str | None) -> ResourceType | None:
        want = kind.strip().lower()
        group: str | None = None
        if not api_version and "." in want:
            # kubectl's "deployments.apps" / "agentruns.agentrun.dev" form.
            want, group = want.split(".", 1)
        candidates = [
            rt
            for rt in self._types
            if (api_version is None or rt.api_version == api_version.strip())
            and (group is None or rt.group == group)
        ]
        if not api_version:
            # Each group's preferred version first, as kubectl does.
            candidates.sort(key=lambda rt: not rt.preferred)
        # Resource names first (plural, singular, short names), then Kinds: 1.20 serves
        # an empty singularName for built-in types, so "deployment" matches by Kind.
        for rt in candidates:
            if want in (rt.plural, rt.singular) or want in rt.short_names:
                return rt
        for rt in candidates:
            if want == rt.kind.lower():
                return rt
        return None

    async def _load(self) -> None:
        async with self._lock:
            if time.monotonic() - self._loaded_at < 1.0:
                return  # another task just loaded it
            versions: list[tuple[str, str, bool]] = [("", "v1", True)]
            groups = await self._kube.request("GET", "/apis")
            for g in groups.get("groups") or []:
                preferred = (g.get("preferredVersion") or {}).get("version")
                versions += [
                    (g["name"], v["version"], v["version"] == preferred)
                    for v in g.get("versions") or []
                ]
            lists = await asyncio.gather(*(self._resources(*v) for v in versions))
            self._types = [rt for one in lists for rt in one]
            self._loaded_at = time.monotonic()

    async def _resources(self, group: str, version: str, preferred: bool) -> list[ResourceType]:
        path = f"/apis/{group}/{version}" if group else f"/api/{version}"
        try:
            doc = await self._kube.request("GET", path)
        except KubeError as e:
            # An aggregated API whose backend is down (503) must not hide every other kind.
            logger.info("discovery of %s skipped: %s", path, e)
            return []
        return [
            ResourceType(
                group=group,
                version=version,
                kind=r["kind"],
                plural=r["name"],
                singular=r.get("singularName") or r["kind"].lower(),
                short_names=tuple(r.get("shortNames") or ()),
                namespaced=bool(r.get("namespaced")),
                preferred=preferred,
            )
            for r in doc.get("resources") or []
            if "/" not in r["name"]
        ]
