"""Operator settings from the environment (command-line flags may override them).

Owns the parsing and validation of every ``AGENTRUN_*`` variable the operator reads; no
other module reads ``os.environ``. An unknown or malformed variable stops the process at
start with a message that names it. Never prints a secret value.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PREFIX = "AGENTRUN_"

# Variables other agentrun processes read (the SSE server, the tests); one environment may
# carry them all, so they are known here without being used.
KNOWN_ELSEWHERE = frozenset(
    {
        "AGENTRUN_SSE_HOST",
        "AGENTRUN_SSE_PORT",
        "AGENTRUN_HEARTBEAT_SECONDS",
        "AGENTRUN_AUTH",
        "AGENTRUN_CACHE",
        "AGENTRUN_K8S_BIN",
        "AGENTRUN_KUBE_API",
        "AGENTRUN_TRACE_URL",
    }
)

# US dollars per million tokens. Overridable with AGENTRUN_PRICES (same JSON shape).
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "gpt-4o": {"input": 2.5, "cached": 1.25, "output": 10.0},
    "gpt-4o-mini": {"input": 0.15, "cached": 0.075, "output": 0.6},
    "gpt-4.1": {"input": 2.0, "cached": 0.5, "output": 8.0},
    "gpt-4.1-mini": {"input": 0.4, "cached": 0.1, "output": 1.6},
    "mock": {"input": 1.0, "cached": 0.5, "output": 2.0},
}


class ConfigError(ValueError):
    """A setting is missing, unknown or malformed; the message names the variable."""


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class Price(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached: float | None = Field(default=None, ge=0)


def in_namespaces(namespace: str, globs: Sequence[str]) -> bool:
    """Whether ``namespace`` matches a glob of AGENTRUN_NAMESPACES (or a notification
    route): any glob matches, or there are none (every namespace). Case-sensitive, as
    namespace names are lower case."""
    return not globs or any(fnmatch.fnmatchcase(namespace, g) for g in globs)


class Settings(BaseModel):
    """Every operator setting, with its environment variable as the alias."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    # May carry a password (redis://user:password@host): never in a repr or a log line.
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", alias="AGENTRUN_REDIS_URL", repr=False
    )
    # A Redis Cluster (the URL names any node): redis-py's cluster client.
    redis_cluster: bool = Field(default=False, alias="AGENTRUN_REDIS_CLUSTER")
    model_base_url: str = Field(default="http://127.0.0.1:8000/v1", alias="AGENTRUN_MODEL_BASE_URL")
    model_name: str = Field(default="gpt-4o-mini", alias="AGENTRUN_MODEL_NAME", min_length=1)
    model_api_key: str = Field(default="", alias="AGENTRUN_MODEL_API_KEY", repr=False)
    model_base_url_allow: list[str] = Field(
        default_factory=list, alias="AGENTRUN_MODEL_BASE_URL_ALLOW"
    )
    namespaces: list[str] = Field(default_factory=list, alias="AGENTRUN_NAMESPACES")
    # URL prefixes an MCPServer's spec.url may use; empty: no MCP server may be used.
    mcp_url_allow: list[str] = Field(default_factory=list, alias="AGENTRUN_MCP_URL_ALLOW")
    mcp_refresh_seconds: float = Field(default=300.0, gt=0, alias="AGENTRUN_MCP_REFRESH_SECONDS")
    max_concurrent_runs: int = Field(default=50, ge=1, alias="AGENTRUN_MAX_CONCURRENT_RUNS")
    # all: this process admits and executes runs (make demo, small clusters); controller:
    # it admits runs and queues them for workers (python -m agentrun_operator.worker).
    role: Literal["all", "controller"] = Field(default="all", alias="AGENTRUN_ROLE")
    # namespace/name of a coordination.k8s.io Lease: only its holder acts as the controller,
    # further replicas stand by to take over (the chart runs two); empty: no election.
    leader_lease: str = Field(
        default="",
        alias="AGENTRUN_LEADER_LEASE",
        pattern=r"^$|^[a-z0-9-]+/[a-z0-9.-]+$",
        description="namespace/name of the controller's Lease",
    )
    leader_lease_seconds: float = Field(default=15.0, ge=3, alias="AGENTRUN_LEADER_LEASE_SECONDS")
    stream_maxlen: int = Field(default=100_000, ge=100, alias="AGENTRUN_STREAM_MAXLEN")
    prices: dict[str, Price] = Field(default_factory=dict, alias="AGENTRUN_PRICES")
    tool_result_max_bytes: int = Field(
        default=16_384, ge=256, alias="AGENTRUN_TOOL_RESULT_MAX_BYTES"
    )
    status_interval_seconds: float = Field(
        default=2.0, gt=0, alias="AGENTRUN_STATUS_INTERVAL_SECONDS"
    )
    token_flush_ms: int = Field(default=50, ge=0, alias="AGENTRUN_TOKEN_FLUSH_MS")
    lease_seconds: float = Field(default=15.0, ge=1, alias="AGENTRUN_LEASE_SECONDS")
    operator_id: str = Field(default_factory=socket.gethostname, alias="AGENTRUN_OPERATOR_ID")
    llm_timeout_seconds: float = Field(default=120.0, gt=0, alias="AGENTRUN_LLM_TIMEOUT_SECONDS")
    llm_max_retries: int = Field(default=2, ge=0, le=10, alias="AGENTRUN_LLM_MAX_RETRIES")
    health_host: str = Field(default="0.0.0.0", alias="AGENTRUN_HEALTH_HOST")
    health_port: int = Field(default=8081, ge=0, le=65535, alias="AGENTRUN_HEALTH_PORT")
    metrics_port: int = Field(default=9090, ge=0, le=65535, alias="AGENTRUN_METRICS_PORT")
    redis_cleanup_seconds: float = Field(default=30.0, ge=0, alias="AGENTRUN_REDIS_CLEANUP_SECONDS")
    # 0: never look for the keys of runs deleted while Redis was away.
    orphan_sweep_seconds: float = Field(default=600.0, ge=0, alias="AGENTRUN_ORPHAN_SWEEP_SECONDS")

    operator_usernames: list[str] = Field(default_factory=list, alias="AGENTRUN_OPERATOR_USERNAMES")
    notify_configmap: str = Field(
        default="",
        alias="AGENTRUN_NOTIFY_CONFIGMAP",
        pattern=r"^$|^[a-z0-9-]+/[a-z0-9.-]+$",
        description="namespace/name of the ConfigMap with notification routes",
    )
    notify_refresh_seconds: float = Field(
        default=30.0, gt=0, alias="AGENTRUN_NOTIFY_REFRESH_SECONDS"
    )
    ui_url: str = Field(default="", alias="AGENTRUN_UI_URL")
    # An OTLP HTTP collector's base URL (spans go to <it>/v1/traces); empty: the standard
    # OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT if set, else no traces.
    otel_endpoint: str = Field(default="", alias="AGENTRUN_OTEL_ENDPOINT")
    webhook_host: str = Field(default="0.0.0.0", alias="AGENTRUN_WEBHOOK_HOST")
    webhook_port: int = Field(default=9443, ge=1, le=65535, alias="AGENTRUN_WEBHOOK_PORT")
    webhook_cert_file: str = Field(default="", alias="AGENTRUN_WEBHOOK_CERT_FILE")
    webhook_key_file: str = Field(default="", alias="AGENTRUN_WEBHOOK_KEY_FILE")

    @field_validator("model_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("otel_endpoint")
    @classmethod
    def _otlp_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(
                "must be an http:// or https:// URL of an OTLP HTTP collector, e.g. "
                "http://jaeger-collector.tracing:4318 (OTLP over gRPC is not used)"
            )
        return value.rstrip("/")

    @property
    def allowed_base_urls(self) -> list[str]:
        """URL prefixes a run's spec.model.baseURL may use (default: the default endpoint)."""
        return self.model_base_url_allow or [self.model_base_url]

    def price_table(self) -> dict[str, Price]:
        table = {name: Price(**p) for name, p in DEFAULT_PRICES.items()}
        table.update(self.prices)
        return table


_LIST_FIELDS = {
    "AGENTRUN_MODEL_BASE_URL_ALLOW",
    "AGENTRUN_MCP_URL_ALLOW",
    "AGENTRUN_NAMESPACES",
    "AGENTRUN_OPERATOR_USERNAMES",
}
_JSON_FIELDS = {"AGENTRUN_PRICES"}


def load(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from ``environ`` (default: the process environment) plus flag overrides."""
    env = os.environ if environ is None else environ
    known = {f.alias for f in Settings.model_fields.values() if f.alias} | KNOWN_ELSEWHERE
    raw: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(PREFIX):
            continue
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=2, cutoff=0.8)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{name}: unknown setting{hint}")
        if name in KNOWN_ELSEWHERE:
            continue
        if name in _LIST_FIELDS:
            raw[name] = _csv(value)
        elif name in _JSON_FIELDS:
            try:
                raw[name] = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{name}: not valid JSON ({e.msg} at column {e.colno})") from e
        else:
            raw[name] = value
    for key, value in overrides.items():
        if value is not None:
            raw[Settings.model_fields[key].alias or key] = value
    try:
        return Settings.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = err["loc"][0] if err["loc"] else "?"
            # Never echo the input of the API key; other inputs are safe to show.
            problems.append(f"{loc}: {err['msg']}")
        raise ConfigError("; ".join(problems)) from None
