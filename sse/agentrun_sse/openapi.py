"""The OpenAPI 3.1 document of the server's HTTP API (served at ``/openapi.json``).

Owns the description of every path, parameter, body and answer, with the request bodies'
schemas taken from their pydantic models (one source of truth). Pure: no I/O.
Never: describes behaviour the handlers do not have; a change to ``api`` changes this too.
"""

from __future__ import annotations

import functools
from typing import Any

from agentrun_sse import bodies

_REF = "#/components/schemas/{model}"


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="Problem")}}},
    }


_ERRORS: dict[str, dict[str, Any]] = {
    "400": _problem("Rejected by the API server (for example by an admission webhook)."),
    "401": _problem("No valid credentials (the API server rejected the token)."),
    "403": _problem("Not allowed (RBAC, an admission webhook, or a missing CSRF token)."),
    "422": _problem("A parameter or field is invalid; the detail names it."),
    "429": _problem("The API server asks to slow down."),
    "502": _problem("The Kubernetes API could not be reached or failed."),
}
_NOT_FOUND = {"404": _problem("No such run or approval (or not visible to the caller).")}
_BODY_ERRORS = {
    "413": _problem("Request body over 64 KiB."),
    "415": _problem("Content-Type is not application/json."),
}
_EVENT_STREAM: dict[str, Any] = {"schema": {"type": "string"}}
_STREAM: dict[str, Any] = {
    "description": "Server-sent events: `id: <stream id>`, `event: <type>`, `data: <event "
    "JSON>`; also `heartbeat`, `trimmed` and `lagged` events without an id. Closes "
    "after `end`.",
    "content": {"text/event-stream": _EVENT_STREAM},
}


def _path(name: str, description: str, pattern: str, most: int) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "pattern": pattern, "maxLength": most, "minLength": 1},
    }


_NS = _path("ns", "Namespace of the run.", bodies.DNS_LABEL, 63)
_NAME = _path("name", "Name of the run.", bodies.DNS_SUBDOMAIN, 253)
_CALL = _path("call_id", "The tool call's id (c- and 12 hex digits).", bodies.LABEL_VALUE, 63)
_STREAM_FLAG = {
    "name": "stream",
    "in": "query",
    "required": False,
    "description": "false: answer with JSON instead of streaming the run.",
    "schema": {"type": "string", "enum": ["true", "false"]},
}
_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"cookie": []}]


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=ref)}}},
    }


def _body(model: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=model)}}},
    }


@functools.cache
def document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (bodies.ChatRequest, bodies.ApprovalRequest, bodies.LoginRequest):
        schema = model.model_json_schema(ref_template=_REF, by_alias=True)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    any_object = {"type": "object", "additionalProperties": True}
    schemas.update(
        {
            "Problem": {
                "type": "object",
                "required": ["status", "reason", "detail"],
                "properties": {
                    "status": {"type": "integer"},
                    "reason": {"type": "string"},
                    "detail": {"anyOf": [{"type": "string"}, {"type": "array"}]},
                },
            },
            "RunSummary": {
                "type": "object",
                "required": ["namespace", "name", "uid", "phase", "streamPath"],
                "properties": {
                    "namespace": {"type": "string"},
                    "name": {"type": "string"},
                    "uid": {"type": "string"},
                    "createdAt": {"type": ["string", "null"]},
                    "goal": {"type": "string"},
                    "stop": {"type": "boolean"},
                    "phase": {"type": "string"},
                    "step": {"type": ["integer", "null"]},
                    "pendingApprovalCount": {"type": "integer"},
                    "usage": any_object,
                    "createdBy": {"type": ["string", "null"]},
                    "streamPath": {"type": "string"},
                    "traceId": {"type": ["string", "null"]},
                    "traceURL": {"type": ["string", "null"]},
                },
            },
            "RunList": {
                "type": "object",
                "required": ["items"],
                "properties": {
                    "items": {"type": "array", "items": {"$ref": _REF.format(model="RunSummary")}}
                },
            },
            "Run": {
                "type": "object",
                "required": ["summary", "object"],
                "properties": {
                    "summary": {"$ref": _REF.format(model="RunSummary")},
                    "object": any_object,
                },
            },
            "RunRef": {
                "type": "object",
                "required": ["namespace", "name", "uid"],
                "properties": {
                    "namespace": {"type": "string"},
                    "name": {"type": "string"},
                    "uid": {"type": "string"},
                },
            },
            "Stopped": {
                "type": "object",
                "required": ["namespace", "name", "uid", "stop", "by", "published"],
                "properties": {
                    "namespace": {"type": "string"},
                    "name": {"type": "string"},
                    "uid": {"type": "string"},
                    "stop": {"type": "boolean"},
                    "by": {"type": "string"},
                    "published": {
                        "type": "boolean",
                        "description": "Whether the instant control message went out.",
                    },
                },
            },
            "Decided": {
                "type": "object",
                "required": ["namespace", "approval", "callId", "run", "decision"],
                "properties": {
                    "namespace": {"type": "string"},
                    "approval": {"type": "string"},
                    "callId": {"type": "string"},
                    "run": {"type": "string"},
                    "decision": {"type": "string", "enum": ["Approved", "Denied"]},
                },
            },
        }
    )
    decide_answers = {
        "200": {
            "description": "Decided. Streams the run from its end before the decision, or "
            "answers JSON with stream=false or Accept: application/json.",
            "content": {
                "text/event-stream": _EVENT_STREAM,
                "application/json": {"schema": {"$ref": _REF.format(model="Decided")}},
            },
        },
        **_ERRORS,
        **_NOT_FOUND,
        **_BODY_ERRORS,
        "409": _problem("A conflicting write (the approval changed meanwhile)."),
    }
    api = "/api/v1"
    paths: dict[str, Any] = {
        f"{api}/runs": {
            "get": {
                "summary": "List the runs the caller may list",
                "operationId": "listRuns",
                "parameters": [
                    {
                        "name": "namespace",
                        "in": "query",
                        "required": False,
                        "description": "Only this namespace (default: all the caller may list).",
                        "schema": {"type": "string", "pattern": bodies.DNS_LABEL, "maxLength": 63},
                    }
                ],
                "responses": {"200": _json("RunList", "The runs, newest first."), **_ERRORS},
            }
        },
        f"{api}/runs/{{ns}}/{{name}}": {
            "get": {
                "summary": "One run",
                "operationId": "getRun",
                "parameters": [_NS, _NAME],
                "responses": {
                    "200": _json("Run", "Its summary and the AgentRun object."),
                    **_ERRORS,
                    **_NOT_FOUND,
                },
            }
        },
        f"{api}/runs/{{ns}}/{{name}}/events": {
            "get": {
                "summary": "The run's events: replay, then live, until its end",
                "operationId": "runEvents",
                "parameters": [
                    _NS,
                    _NAME,
                    {
                        "name": "replay",
                        "in": "query",
                        "required": False,
                        "description": "none: live events only (when no Last-Event-ID).",
                        "schema": {"type": "string", "enum": ["all", "none"]},
                    },
                    {
                        "name": "lastEventId",
                        "in": "query",
                        "required": False,
                        "description": "Replay after this id (for clients without headers).",
                        "schema": {"type": "string", "pattern": r"^\d+(-\d+)?$"},
                    },
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "description": "Replay after this id (EventSource sends it itself).",
                        "schema": {"type": "string", "pattern": r"^\d+(-\d+)?$"},
                    },
                    {
                        "name": "access_token",
                        "in": "query",
                        "required": False,
                        "description": "Bearer token for clients that can set no header.",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": _STREAM,
                    "204": {"description": "The run ended and nothing is left to send."},
                    **_ERRORS,
                    **_NOT_FOUND,
                    "503": _problem("Redis unavailable, or the server is shutting down."),
                },
            }
        },
        f"{api}/runs/{{ns}}/{{name}}/stop": {
            "post": {
                "summary": "Stop the run (spec.stop and the instant control message)",
                "operationId": "stopRun",
                "parameters": [_NS, _NAME],
                "responses": {
                    "202": _json("Stopped", "Stop requested."),
                    **_ERRORS,
                    **_NOT_FOUND,
                },
            }
        },
        f"{api}/runs/{{ns}}/{{name}}/approvals/{{call_id}}": {
            "post": {
                "summary": "Approve or deny a tool call of this run",
                "operationId": "decideForRun",
                "parameters": [_NS, _NAME, _CALL, _STREAM_FLAG],
                "requestBody": _body("ApprovalRequest"),
                "responses": decide_answers,
            }
        },
        f"{api}/agent/chat": {
            "post": {
                "summary": "Create a run and stream it; the first event (`run`) names it",
                "operationId": "chat",
                "parameters": [_STREAM_FLAG],
                "requestBody": _body("ChatRequest"),
                "responses": {
                    "201": {
                        "description": "Created. Streams its events, or answers JSON with "
                        "stream=false or Accept: application/json.",
                        "content": {
                            "text/event-stream": _EVENT_STREAM,
                            "application/json": {"schema": {"$ref": _REF.format(model="RunRef")}},
                        },
                    },
                    **_ERRORS,
                    **_BODY_ERRORS,
                    "409": _problem("A run of that name exists."),
                },
            }
        },
        f"{api}/agent/approvals/{{call_id}}": {
            "post": {
                "summary": "Approve or deny a tool call (namespace in the body)",
                "operationId": "decide",
                "parameters": [_CALL, _STREAM_FLAG],
                "requestBody": _body("ApprovalRequest"),
                "responses": decide_answers,
            }
        },
        "/login": {
            "post": {
                "summary": "Check a token and keep it in an HttpOnly cookie (the web UI)",
                "operationId": "login",
                "security": [],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": _REF.format(model="LoginRequest")}},
                        "application/x-www-form-urlencoded": {
                            "schema": {"$ref": _REF.format(model="LoginRequest")}
                        },
                    },
                },
                "responses": {
                    "200": {"description": "Logged in (JSON body)."},
                    "303": {"description": "Logged in (form): to the UI."},
                    **_ERRORS,
                    **_BODY_ERRORS,
                },
            }
        },
        "/logout": {
            "post": {
                "summary": "Forget the login cookie",
                "operationId": "logout",
                "security": [],
                "responses": {
                    "200": {"description": "Logged out."},
                    "303": {"description": "Logged out (form)."},
                    "403": _problem("From another site."),
                },
            }
        },
        "/healthz": _plain("Liveness", "healthz"),
        "/readyz": _plain("Readiness: Redis answers", "readyz", extra={"503": "Redis down."}),
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "agentrun SSE server",
            "version": "v1",
            "description": "Live, replayable event streams of agentrun AgentRuns, and the "
            "calls that act on them. Every call to Kubernetes is made with the caller's own "
            "token, so the API server's RBAC and admission webhooks judge the real person.",
        },
        "security": _SECURITY,
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "cookie": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "agentrun_session",
                    "description": "Set by POST /login; writes also need X-CSRF-Token.",
                },
            },
        },
    }


def _plain(summary: str, op: str, *, extra: dict[str, str] | None = None) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "ok", "content": {"text/plain": {"schema": {"type": "string"}}}}
    }
    for code, text in (extra or {}).items():
        responses[code] = {
            "description": text,
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    return {"get": {"summary": summary, "operationId": op, "security": [], "responses": responses}}
