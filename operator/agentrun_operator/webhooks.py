"""The admission webhook server: ``python -m agentrun_operator.webhooks``.

Its own process (and, in the chart, its own Deployment with 2 replicas), so decisions are
judged while the operator is down or restarting. Owns the HTTPS endpoint, the translation of
AdmissionReviews to the pure rules in ``approvals`` and back, and the webhook configuration
objects that point the API server here. Never writes to the Kubernetes API; reads only the
AgentRun a decision belongs to, and asks (SubjectAccessReview) whether a run's creator may
use the service account it names.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agentrun_operator import approvals, config, kube, mcpservers, models, policy

log = logging.getLogger("agentrun.webhooks")

Handler = Callable[[dict[str, Any]], Awaitable[tuple[str | None, list[dict[str, Any]]]]]


def _review(request: dict[str, Any], *, refusal: str | None, patch: list[dict[str, Any]]) -> Any:
    response: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": refusal is None}
    if refusal is not None:
        response["status"] = {"code": 403, "reason": "Forbidden", "message": refusal}
    elif patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


class Webhooks:
    def __init__(self, *, settings: config.Settings, k8s: kube.Kube | None) -> None:
        self.settings = settings
        self.k8s = k8s
        self.operators = frozenset(settings.operator_usernames)

    async def _run_of(self, ta: dict[str, Any]) -> dict[str, Any] | None:
        if self.k8s is None:
            return None
        namespace = (ta.get("metadata") or {}).get("namespace") or ""
        name = (ta.get("spec") or {}).get("runName") or ""
        return await self.k8s.get_agentrun(namespace=namespace, name=name)

    async def mutate_toolapproval(
        self, req: dict[str, Any]
    ) -> tuple[str | None, list[dict[str, Any]]]:
        ops = approvals.mutate_toolapproval(
            operation=req["operation"],
            user=approvals.User.of(req.get("userInfo") or {}),
            obj=req.get("object") or {},
            old=req.get("oldObject"),
            operators=self.operators,
            now=dt.datetime.now(dt.UTC),
        )
        return None, ops

    async def validate_toolapproval(
        self, req: dict[str, Any]
    ) -> tuple[str | None, list[dict[str, Any]]]:
        obj = req.get("object") or {}
        run = await self._run_of(obj) if req["operation"] == "UPDATE" else None
        refusal = approvals.validate_toolapproval(
            operation=req["operation"],
            user=approvals.User.of(req.get("userInfo") or {}),
            obj=obj,
            old=req.get("oldObject"),
            run=run,
            operators=self.operators,
            now=dt.datetime.now(dt.UTC),
        )
        if refusal is not None:
            log.info(
                "refused a ToolApproval %s by %s: %s",
                req["operation"],
                (req.get("userInfo") or {}).get("username"),
                refusal,
            )
        return refusal, []

    async def mutate_agentrun(self, req: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]]]:
        ops = approvals.mutate_agentrun(
            operation=req["operation"],
            user=approvals.User.of(req.get("userInfo") or {}),
            obj=req.get("object") or {},
            old=req.get("oldObject"),
        )
        return None, ops

    async def validate_agentrun(
        self, req: dict[str, Any]
    ) -> tuple[str | None, list[dict[str, Any]]]:
        obj = req.get("object") or {}
        refusal = approvals.validate_agentrun(
            operation=req["operation"],
            obj=obj,
            old=req.get("oldObject"),
            allowed_base_urls=self.settings.allowed_base_urls,
        )
        account = approvals.service_account_to_check(req["operation"], obj)
        if refusal is None and account is not None:
            refusal = await self._may_use(req, account)
        if refusal is None and req["operation"] == "CREATE":
            refusal = await self._fits_policies(req, obj)
        return refusal, []

    async def _fits_policies(self, req: dict[str, Any], obj: dict[str, Any]) -> str | None:
        """A new run may ask only for what its namespace's policies allow (a tool, a model
        endpoint, a service account, approvers); what it asks too little of is clamped
        later, when the operator fixes its settings."""
        if self.k8s is None:
            return "agentrun webhook error: no Kubernetes client to read the AgentPolicies"
        namespace = str(req.get("namespace") or "")
        k8s = self.k8s
        bodies, labels = await _retrying(lambda: k8s.policies_for(namespace))
        try:
            # The operator's default endpoint is judged when it fixes the run's settings
            # (this server does not know it).
            policy.tighten(obj.get("spec") or {}, policy.applicable(bodies, labels))
        except policy.Refused as e:
            return str(e)
        except ValueError:
            return None  # a spec the schema refuses: the API server says why, naming the field
        return None

    async def validate_mcpserver(
        self, req: dict[str, Any]
    ) -> tuple[str | None, list[dict[str, Any]]]:
        """An MCPServer must point where the operator allows: its writer decides where run
        tokens go."""
        if req["operation"] not in ("CREATE", "UPDATE"):
            return None, []
        spec = (req.get("object") or {}).get("spec") or {}
        refusal = mcpservers.url_refusal(str(spec.get("url") or ""), self.settings.mcp_url_allow)
        account = spec.get("discoveryServiceAccountName")
        old = ((req.get("oldObject") or {}).get("spec") or {}).get("discoveryServiceAccountName")
        if refusal is None and account and account != "default" and account != old:
            # Its tokens and Secrets are used for discovery: naming it is using it.
            refusal = await self._may_use(
                req, str(account), field="spec.discoveryServiceAccountName", kind="MCPServer"
            )
        return refusal, []

    async def validate_policy(self, req: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]]]:
        """An AgentPolicy or ClusterAgentPolicy is admitted only when every rule compiles."""
        if req["operation"] not in ("CREATE", "UPDATE"):
            return None, []
        obj = req.get("object") or {}
        problems = policy.check(obj.get("spec") or {})
        if not problems:
            return None, []
        kind = obj.get("kind") or "AgentPolicy"
        name = (obj.get("metadata") or {}).get("name") or ""
        return f"{kind} {name}: " + "; ".join(problems), []

    async def _may_use(
        self,
        req: dict[str, Any],
        account: str,
        *,
        field: str = "spec.serviceAccountName",
        kind: str = "run",
    ) -> str | None:
        """A SubjectAccessReview for the requester: may they use this service account?"""
        info = req.get("userInfo") or {}
        user = approvals.User.of(info)
        namespace = str(req.get("namespace") or "")
        if self.k8s is None:
            return "agentrun webhook error: no Kubernetes client to check service-account use"
        allowed, reason = await self.k8s.may(
            user=user.username,
            groups=list(user.groups),
            uid=str(info.get("uid") or ""),
            extra={k: list(v) for k, v in (info.get("extra") or {}).items()},
            namespace=namespace,
            name=account,
            **approvals.SA_USE,
        )
        if allowed:
            return None
        return approvals.service_account_refusal(
            user=user, namespace=namespace, name=account, reason=reason, field=field, kind=kind
        )


async def _retrying(call: Callable[[], Awaitable[Any]], *, seconds: float = 2.5) -> Any:
    """``call()``, tried again for a moment while the API server answers with a transient
    error (429 while a new resource's watch cache initialises, 5xx): the API server gives a
    webhook 5 s, and a refusal here refuses the person's request."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            return await call()
        except kube.KubeError as e:
            if not e.transient or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


_REQUEST_UID = re.compile(rb'"uid"\s*:\s*"([^"\\]{1,128})"')


def _too_deep(req: dict[str, Any]) -> str | None:
    obj = req.get("object") or {}
    spec = obj.get("spec") if isinstance(obj, dict) else None
    # spec first: managedFields mirror a deep spec, and the spec is what its author wrote.
    for root, value in (("spec", spec), ("", obj)):
        path = approvals.deeper_than(value, approvals.MAX_NESTING - (1 if root else 0))
        if path is not None:
            field = ".".join([p for p in (root, *path[:1]) if p])
            return f"{field or 'the object'} is nested deeper than {approvals.MAX_NESTING} levels"
    return None


def _endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        raw = await request.body()
        try:
            review = json.loads(raw)
            req = review["request"]
        except RecursionError:
            # Too deep for the decoder: refuse (never admit unchecked), under the request's
            # uid, which the API server writes first.
            uid = _REQUEST_UID.search(raw)
            # Of the two kinds only a ToolApproval has a free-form field to nest in.
            field = "spec.arguments" if b'"kind":"ToolApproval"' in raw else "the object"
            too_deep = f"{field} is nested deeper than {approvals.MAX_NESTING} levels"
            uid_only = {"uid": uid[1].decode() if uid else ""}
            return JSONResponse(_review(uid_only, refusal=too_deep, patch=[]))
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "expected an AdmissionReview"}, status_code=400)
        deep = _too_deep(req) if isinstance(req, dict) else None
        if deep is not None:
            return JSONResponse(_review(req, refusal=deep, patch=[]))
        try:
            refusal, patch = await handler(req)
        except Exception as e:  # a bug must not admit: refuse, and say why
            log.exception("webhook failure")
            refusal, patch = f"agentrun webhook error: {type(e).__name__}: {e}", []
        return JSONResponse(_review(req, refusal=refusal, patch=patch))

    return endpoint


def app(hooks: Webhooks, *, lifespan: Any = None) -> Starlette:
    async def healthz(_: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/healthz", healthz),
            Route("/mutate/toolapprovals", _endpoint(hooks.mutate_toolapproval), methods=["POST"]),
            Route(
                "/validate/toolapprovals", _endpoint(hooks.validate_toolapproval), methods=["POST"]
            ),
            Route("/mutate/agentruns", _endpoint(hooks.mutate_agentrun), methods=["POST"]),
            Route("/validate/agentruns", _endpoint(hooks.validate_agentrun), methods=["POST"]),
            Route("/validate/agentpolicies", _endpoint(hooks.validate_policy), methods=["POST"]),
            Route("/validate/mcpservers", _endpoint(hooks.validate_mcpserver), methods=["POST"]),
            Route(
                "/validate/clusteragentpolicies",
                _endpoint(hooks.validate_policy),
                methods=["POST"],
            ),
        ],
    )


def configurations(
    *,
    client_config: dict[str, Any],
    ca_bundle: str,
    name: str = "agentrun",
    namespace_selector: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The Mutating- and ValidatingWebhookConfiguration pointing at this server.

    ``client_config`` is ``{"url": "https://host:port"}`` (tests) or
    ``{"service": {"namespace", "name", "port"}}`` (the chart); paths are added here.
    """

    def client(path: str) -> dict[str, Any]:
        cc: dict[str, Any] = json.loads(json.dumps(client_config))
        if "url" in cc:
            cc["url"] = cc["url"].rstrip("/") + path
        else:
            cc["service"]["path"] = path
        cc["caBundle"] = ca_bundle
        return cc

    def hook(
        kind: str,
        plural: str,
        ops: list[str],
        failure: str,
        suffix: str,
        mode: str,
        scope: str = "Namespaced",
    ) -> dict[str, Any]:
        return {
            "name": f"{mode}-{plural}{suffix}.agentrun.dev",
            "clientConfig": client(f"/{mode}/{plural}"),
            "rules": [
                {
                    "apiGroups": [models.GROUP],
                    "apiVersions": [models.VERSION],
                    "operations": ops,
                    "resources": [plural],
                    "scope": scope,
                }
            ],
            # Identity facts are never waved through; nothing may ever block spec.stop.
            "failurePolicy": failure,
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
            **(
                {"namespaceSelector": namespace_selector}
                if namespace_selector and scope == "Namespaced"
                else {}
            ),
        }

    def hooks(mode: str) -> list[dict[str, Any]]:
        return [
            hook("ToolApproval", "toolapprovals", ["CREATE", "UPDATE"], "Fail", "", mode),
            hook("AgentRun", "agentruns", ["CREATE"], "Fail", "-create", mode),
            hook("AgentRun", "agentruns", ["UPDATE"], "Ignore", "-update", mode),
        ]

    # A policy is admitted only when its rules compile, an MCPServer only when its URL is
    # allowed: never waved through either.
    policies = [
        hook("AgentPolicy", "agentpolicies", ["CREATE", "UPDATE"], "Fail", "", "validate"),
        hook("MCPServer", "mcpservers", ["CREATE", "UPDATE"], "Fail", "", "validate"),
        hook(
            "ClusterAgentPolicy",
            "clusteragentpolicies",
            ["CREATE", "UPDATE"],
            "Fail",
            "",
            "validate",
            scope="Cluster",
        ),
    ]
    mutating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{**h, "reinvocationPolicy": "Never"} for h in hooks("mutate")],
    }
    validating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [*hooks("validate"), *policies],
    }
    return [mutating, validating]


# Idle connections stay open longer than the API server keeps one to a webhook (Go's 90 s),
# so the API server closes first. With uvicorn's 5 s, the server could close one just as the
# API server sent an admission request on it: an EOF, and a refused request.
KEEP_ALIVE_SECONDS = 120


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agentrun_operator.webhooks")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--cert-file")
    parser.add_argument("--key-file")
    args = parser.parse_args(argv)
    try:
        settings = config.load(
            webhook_host=args.host,
            webhook_port=args.port,
            webhook_cert_file=args.cert_file,
            webhook_key_file=args.key_file,
        )
    except config.ConfigError as e:
        print(f"agentrun-webhooks: configuration error: {e}", file=sys.stderr)
        return 2
    if not settings.webhook_cert_file or not settings.webhook_key_file:
        print(
            "agentrun-webhooks: AGENTRUN_WEBHOOK_CERT_FILE and AGENTRUN_WEBHOOK_KEY_FILE are "
            "required: the API server only calls webhooks over HTTPS",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    hooks = Webhooks(settings=settings, k8s=None)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        hooks.k8s = await kube.Kube.from_env()
        try:
            yield
        finally:
            await hooks.k8s.close()

    application = app(hooks, lifespan=lifespan)
    uvicorn.run(
        application,
        host=settings.webhook_host,
        port=settings.webhook_port,
        ssl_certfile=settings.webhook_cert_file,
        ssl_keyfile=settings.webhook_key_file,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        log_level="info",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
