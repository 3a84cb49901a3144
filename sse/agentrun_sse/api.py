"""The HTTP handlers of ``/api/v1``, the login form's endpoints and the root probes.

Owns what each endpoint does, in order: who calls (auth), is the request well formed
(bodies), the Kubernetes call made with the caller's token (kubeapi), then the answer or
the stream (stream). Thin: decisions about access are the API server's, streaming is
``stream``'s.
Never: calls Kubernetes with any identity but the caller's (``--no-auth`` aside), writes
run events, or logs a token.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from redis import asyncio as aioredis
from redis import exceptions as redis_errors
from sse_starlette import sse as sse_mod
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

from agentrun_operator import contract, events
from agentrun_sse import auth, bodies, fanout, frames, kubeapi, stream
from agentrun_sse import metrics as metrics_mod
from agentrun_sse import settings as settings_mod

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Context:
    """What every handler needs; one per app, on ``app.state.ctx``."""

    settings: settings_mod.Settings
    kube: kubeapi.KubeAPI
    redis: aioredis.Redis
    hub: fanout.Hub
    metrics: metrics_mod.Metrics
    runs: auth.RunCache


def ctx(request: Request) -> Context:
    context: Context = request.app.state.ctx
    return context


def _caller(request: Request, *, writes: bool = False) -> auth.Caller:
    c = ctx(request)
    who = auth.caller(request, mode=c.settings.auth)
    if writes:
        auth.check_csrf(request, who)
    return who


def _run_path(request: Request) -> tuple[str, str]:
    ns, name = request.path_params["ns"], request.path_params["name"]
    bodies.check_path(
        ns=(ns, bodies.DNS_LABEL, 63),
        name=(name, bodies.DNS_SUBDOMAIN, 253),
    )
    return ns, name


def summary(run: dict[str, Any], *, trace_url: str = "") -> dict[str, Any]:
    """The few fields of an AgentRun a list shows; ``trace_url``: the template of a link to
    the run's trace (AGENTRUN_TRACE_URL)."""
    meta = run.get("metadata") or {}
    status = run.get("status") or {}
    spec = run.get("spec") or {}
    ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    return {
        "namespace": ns,
        "name": name,
        "uid": meta.get("uid", ""),
        "createdAt": meta.get("creationTimestamp"),
        "goal": str(spec.get("goal", ""))[:500],
        "stop": bool(spec.get("stop", False)),
        "phase": status.get("phase") or "Pending",
        "step": status.get("step"),
        "pendingApprovalCount": status.get("pendingApprovalCount") or 0,
        "usage": status.get("usage") or {},
        "createdBy": status.get("createdBy")
        or (meta.get("annotations") or {}).get(contract.CREATED_BY),
        "streamPath": events.stream_path(ns, name),
        "traceId": status.get("traceId"),
        "traceURL": (
            trace_url.replace("{traceId}", str(status["traceId"]))
            if trace_url and status.get("traceId")
            else None
        ),
    }


# -- reads ----------------------------------------------------------------------------
async def list_runs(request: Request) -> Response:
    who = _caller(request)
    ns = request.query_params.get("namespace") or None
    if ns is not None:
        bodies.check_path(where="query", namespace=(ns, bodies.DNS_LABEL, 63))
    answer = await ctx(request).kube.list_runs(token=who.token, namespace=ns)
    trace_url = ctx(request).settings.trace_url
    items = [summary(r, trace_url=trace_url) for r in answer.get("items") or []]
    items.sort(key=lambda r: str(r.get("createdAt") or ""), reverse=True)
    return JSONResponse({"items": items})


async def get_run(request: Request) -> Response:
    who = _caller(request)
    ns, name = _run_path(request)
    run = await ctx(request).kube.get_run(token=who.token, namespace=ns, name=name)
    return JSONResponse(
        {"summary": summary(run, trace_url=ctx(request).settings.trace_url), "object": run}
    )


async def run_events(request: Request) -> Response:
    who = _caller(request)
    ns, name = _run_path(request)
    replay = request.query_params.get("replay", "all")
    if replay not in ("all", "none"):
        raise bodies.BodyError(
            422,
            [{"loc": ["query", "replay"], "msg": "must be 'all' or 'none'", "type": "enum"}],
        )
    after = _last_event_id(request)
    c = ctx(request)
    run = await auth.resolve_run(c.kube, cache=c.runs, who=who, namespace=ns, name=name)
    uid = str(run["metadata"]["uid"])
    phase = str((run.get("status") or {}).get("phase") or "Pending")
    live_only = after is None and replay == "none"
    if await _finished(c.hub, uid=uid, after=after, live_only=live_only, phase=phase):
        # Nothing more will ever come: 204 tells an EventSource to stop reconnecting.
        return Response(status_code=204, headers=SSE_HEADERS)
    return _sse(
        c,
        stream.StreamRequest(
            uid=uid,
            after=after,
            live_only=live_only,
            phase=phase,
            heartbeat_seconds=c.settings.heartbeat_seconds,
        ),
    )


def _last_event_id(request: Request) -> str | None:
    """From the Last-Event-ID header (EventSource reconnects) or ``lastEventId``."""
    for where, value in (
        ("header", request.headers.get("last-event-id")),
        ("query", request.query_params.get("lastEventId")),
    ):
        if value:
            try:
                frames.parse_id(value.strip())
            except ValueError:
                name = "Last-Event-ID" if where == "header" else "lastEventId"
                raise bodies.BodyError(
                    422,
                    [{"loc": [where, name], "msg": "not a stream id", "type": "value_error"}],
                ) from None
            return value.strip()
    return None


async def _finished(
    hub: fanout.Hub, *, uid: str, after: str | None, live_only: bool, phase: str
) -> bool:
    last = await hub.last(uid)
    if last is None:
        # No events at all: only a run that already finished (its stream expired) is done.
        return phase in ("Succeeded", "Failed", "Stopped")
    if last.type != "end":
        return False
    return live_only or (after is not None and frames.parse_id(after) >= last.key)


def _sse(c: Context, req: stream.StreamRequest, *, status: int = 200) -> Response:
    return sse_mod.EventSourceResponse(
        stream.run_stream(c.hub, req),
        status_code=status,
        headers=SSE_HEADERS,
        ping=0,  # our own heartbeats carry the run's phase
        sep="\n",
        send_timeout=c.settings.send_timeout_seconds,
        shutdown_grace_period=5.0,
    )


# -- writes ---------------------------------------------------------------------------
async def stop_run(request: Request) -> Response:
    who = _caller(request, writes=True)
    ns, name = _run_path(request)
    c = ctx(request)
    run = await c.kube.patch_run(
        token=who.token, namespace=ns, name=name, patch={"spec": {"stop": True}}
    )
    uid = str(run["metadata"]["uid"])
    by = str((run["metadata"].get("annotations") or {}).get(contract.STOPPED_BY) or "")
    if not by:
        by = await c.kube.username(token=who.token)
    # The CR carries the durable stop; this message makes it instant. If Redis is down the
    # stop still happens (the operator watches the CR), only slower: not an error.
    published = True
    try:
        await events.publish_stop(c.redis, uid, by=by)
    except (redis_errors.RedisError, OSError) as e:
        log.warning("stop of %s/%s: control message not published (%s)", ns, name, e)
        published = False
    return JSONResponse(
        {"namespace": ns, "name": name, "uid": uid, "stop": True, "by": by, "published": published},
        status_code=202,
    )


def _wants_stream(request: Request) -> bool:
    if request.query_params.get("stream", "true").lower() in ("false", "0", "no"):
        return False
    accept = request.headers.get("accept", "")
    return not ("application/json" in accept and "text/event-stream" not in accept)


async def chat(request: Request) -> Response:
    who = _caller(request, writes=True)
    body = await bodies.read(request, bodies.ChatRequest)
    c = ctx(request)
    run = await c.kube.create_run(token=who.token, namespace=body.namespace, body=body.agentrun())
    meta = run["metadata"]
    named = {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]}
    if not _wants_stream(request):
        return JSONResponse(named, status_code=201)
    first = frames.frame(event="run", data=json.dumps(named))
    return _sse(
        c,
        stream.StreamRequest(
            uid=str(meta["uid"]),
            after=None,
            live_only=False,
            phase="Pending",
            heartbeat_seconds=c.settings.heartbeat_seconds,
            prelude=(first,),
        ),
        status=201,
    )


async def decide_for_run(request: Request) -> Response:
    who = _caller(request, writes=True)
    ns, name = _run_path(request)
    call_id = _call_id(request)
    body = await bodies.read(request, bodies.ApprovalRequest)
    if body.namespace is not None and body.namespace != ns:
        raise bodies.BodyError(
            422,
            [{"loc": ["body", "namespace"], "msg": "differs from the path", "type": "value_error"}],
        )
    return await _decide(request, who=who, namespace=ns, run_name=name, call_id=call_id, body=body)


async def decide(request: Request) -> Response:
    who = _caller(request, writes=True)
    call_id = _call_id(request)
    body = await bodies.read(request, bodies.ApprovalRequest)
    if body.namespace is None:
        raise bodies.BodyError(
            422, [{"loc": ["body", "namespace"], "msg": "Field required", "type": "missing"}]
        )
    return await _decide(
        request, who=who, namespace=body.namespace, run_name=None, call_id=call_id, body=body
    )


def _call_id(request: Request) -> str:
    call_id: str = request.path_params["call_id"]
    bodies.check_path(call_id=(call_id, bodies.LABEL_VALUE, 63))
    return call_id


async def _decide(
    request: Request,
    *,
    who: auth.Caller,
    namespace: str,
    run_name: str | None,
    call_id: str,
    body: bodies.ApprovalRequest,
) -> Response:
    c = ctx(request)
    selector = f"{contract.CALL_ID_LABEL}={call_id}"
    if run_name is not None:
        selector += f",{contract.RUN_LABEL}={run_name}"
    found = await c.kube.list_approvals(
        token=who.token, namespace=namespace, label_selector=selector
    )
    # A call asked again after its approval went Stale has two: the newest not Stale counts.
    approval = contract.current_approval(list(found.get("items") or []))
    if approval is None:
        return _problem(404, "NotFound", f"no ToolApproval for call {call_id} in {namespace}")
    approval_name = str(approval["metadata"]["name"])
    run = str(
        (approval.get("spec") or {}).get("runName")
        or (approval["metadata"].get("labels") or {}).get(contract.RUN_LABEL)
        or run_name
        or ""
    )
    streaming = _wants_stream(request) and bool(run)
    after = frames.ZERO_ID
    uid = phase = ""
    if streaming:
        # Before the decision lands: the caller must be able to watch the run, and the
        # stream starts at the run's end as it is now, so the reaction is not missed.
        target = await auth.resolve_run(
            c.kube, cache=c.runs, who=who, namespace=namespace, name=run
        )
        uid = str(target["metadata"]["uid"])
        phase = str((target.get("status") or {}).get("phase") or "Pending")
        last = await c.hub.last(uid)
        after = last.id if last is not None else frames.ZERO_ID
    patch: dict[str, Any] = {"spec": {"decision": body.k8s_decision}}
    if body.comment is not None:
        patch["spec"]["comment"] = body.comment
    await c.kube.patch_approval(
        token=who.token, namespace=namespace, name=approval_name, patch=patch
    )
    decided = {
        "namespace": namespace,
        "approval": approval_name,
        "callId": call_id,
        "run": run,
        "decision": body.k8s_decision,
    }
    if not streaming:
        return JSONResponse(decided)
    return _sse(
        c,
        stream.StreamRequest(
            uid=uid,
            after=after,
            live_only=False,
            phase=phase,
            heartbeat_seconds=c.settings.heartbeat_seconds,
        ),
    )


# -- the login form -------------------------------------------------------------------
def _is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded")


async def login(request: Request) -> Response:
    if not auth.same_origin(request):
        return _problem(403, "Forbidden", "login from another site")
    body = await bodies.read(request, bodies.LoginRequest, form=True)
    c = ctx(request)
    await c.kube.check_token(token=body.token if c.settings.auth != "none" else None)
    secure = request.url.scheme == "https" or (
        request.headers.get("x-forwarded-proto", "").lower() == "https"
    )
    response: Response = (
        RedirectResponse("/", status_code=303) if _is_form(request) else JSONResponse({"ok": True})
    )
    auth.set_session(response, token=body.token, secure=secure)
    return response


async def logout(request: Request) -> Response:
    if not auth.same_origin(request):
        return _problem(403, "Forbidden", "logout from another site")
    response: Response = (
        RedirectResponse("/", status_code=303) if _is_form(request) else JSONResponse({"ok": True})
    )
    auth.clear_session(response)
    return response


# -- probes ---------------------------------------------------------------------------
async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    try:
        async with asyncio.timeout(2):
            await ctx(request).redis.ping()
    except (TimeoutError, redis_errors.RedisError, OSError) as e:
        return PlainTextResponse(f"redis unavailable: {type(e).__name__}", status_code=503)
    return PlainTextResponse("ok")


async def metrics(request: Request) -> Response:
    return Response(ctx(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


# -- errors ---------------------------------------------------------------------------
def _problem(status: int, reason: str, message: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="agentrun"'} if status == 401 else None
    return JSONResponse(
        {"status": status, "reason": reason, "detail": message}, status_code=status, headers=headers
    )


_REASONS = {
    401: "Unauthorized",
    403: "Forbidden",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
}


async def on_auth_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, auth.AuthError)
    return _problem(exc.status, _REASONS.get(exc.status, "Error"), exc.message)


async def on_body_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, bodies.BodyError)
    return _problem(exc.status, _REASONS.get(exc.status, "Invalid"), exc.detail)


async def on_kube_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, kubeapi.KubeError)
    # The API server's own answer for what it judges (401, 403, 404, 409, 422, an
    # admission denial); anything else is a gateway problem, not the caller's.
    status = exc.status if exc.status in (400, 401, 403, 404, 409, 422, 429) else 502
    return _problem(status, exc.reason, exc.message)


async def on_unavailable(request: Request, exc: Exception) -> Response:
    if isinstance(exc, redis_errors.RedisError):
        return _problem(503, "Unavailable", f"Redis unavailable: {type(exc).__name__}")
    return _problem(503, "Unavailable", str(exc))
