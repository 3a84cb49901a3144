"""SSE server settings from the environment, command-line flags overriding them.

Owns the parsing and validation of the ``AGENTRUN_*`` variables the SSE server reads, and
where the Kubernetes API is (in-cluster or ``KUBECONFIG``); no other module of this package
reads ``os.environ``. A malformed value, or a misspelt name of one of ours, stops the
process at start with a message naming the variable.

Never: reads a service-account token or any credential for its own use. The server acts
with each caller's token; only the ``--no-auth`` development mode takes the credentials of
the kubeconfig (never in-cluster ones).
"""

from __future__ import annotations

import argparse
import base64
import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PREFIX = "AGENTRUN_"
AuthMode = Literal["kubernetes", "none"]
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
# Mounted by the chart from the namespace's kube-root-ca.crt ConfigMap (the service-account
# token stays in the operator's container: this process never has one).
IN_CLUSTER_CA = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")

# The variables this process reads. Other AGENTRUN_* names belong to the operator, which
# may share an environment with us, so they are let through unless they look like a typo of
# one of ours.
ENV_HOST = "AGENTRUN_SSE_HOST"
ENV_PORT = "AGENTRUN_SSE_PORT"
ENV_HEARTBEAT = "AGENTRUN_HEARTBEAT_SECONDS"
ENV_AUTH = "AGENTRUN_AUTH"
ENV_REDIS = "AGENTRUN_REDIS_URL"
ENV_TRACE_URL = "AGENTRUN_TRACE_URL"
ENV_REDIS_CLUSTER = "AGENTRUN_REDIS_CLUSTER"
OURS = frozenset(
    {ENV_HOST, ENV_PORT, ENV_HEARTBEAT, ENV_AUTH, ENV_REDIS, ENV_TRACE_URL, ENV_REDIS_CLUSTER}
)
SHARED_WITH_OPERATOR = frozenset({ENV_REDIS, ENV_REDIS_CLUSTER})


class ConfigError(ValueError):
    """A setting is missing, unknown or malformed; the message names it."""


@dataclass(frozen=True)
class KubeTarget:
    """Where the Kubernetes API is and how to trust it; credentials only in --no-auth mode."""

    server: str
    ca_file: str | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    # --no-auth only: the kubeconfig's own user (dev); never loaded otherwise.
    token: str | None = field(default=None, repr=False)
    client_cert_data: bytes | None = field(default=None, repr=False)
    client_key_data: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 8080
    heartbeat_seconds: float = 15.0
    auth: AuthMode = "kubernetes"
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    redis_cluster: bool = False  # a Redis Cluster: redis-py's cluster client
    kube: KubeTarget | None = None
    # Events one viewer may have waiting before it counts as fallen behind.
    viewer_queue: int = 2048
    # Entries per XREAD of a run's reader and per XRANGE page of a replay.
    read_count: int = 512
    # How long the answer to "may this token read this run" is reused.
    auth_cache_seconds: float = 5.0
    # A send to a client that takes longer than this ends its stream (dead peer).
    send_timeout_seconds: float = 30.0
    max_body_bytes: int = 64 * 1024
    log_level: str = "info"
    access_log: bool = True
    # Where a run's trace opens in the user's tracing UI: a URL with {traceId}, e.g.
    # https://jaeger.example.com/trace/{traceId}; empty: no link.
    trace_url: str = ""


def _fail_on_typos(env: Mapping[str, str]) -> None:
    for name in env:
        if not name.startswith(PREFIX) or name in OURS:
            continue
        if name.startswith(PREFIX + "SSE_"):
            raise ConfigError(f"{name}: unknown setting of the SSE server")
        close = difflib.get_close_matches(name, sorted(OURS), n=1, cutoff=0.9)
        if close:
            raise ConfigError(f"{name}: unknown setting (did you mean {close[0]}?)")


def _number(name: str, raw: str, *, kind: type[int] | type[float], low: float) -> Any:
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a {kind.__name__}") from None
    if value < low:
        raise ConfigError(f"{name}: must be at least {low}, got {raw}")
    return value


def load(
    environ: Mapping[str, str] | None = None,
    *,
    argv: Sequence[str] | None = None,
) -> Settings:
    """Settings from ``environ`` (default: the process environment) and ``argv`` flags."""
    env = dict(os.environ if environ is None else environ)
    _fail_on_typos(env)
    args = _parser().parse_args(argv)
    host = args.host or env.get(ENV_HOST, "0.0.0.0")
    port = (
        args.port
        if args.port is not None
        else _number(ENV_PORT, env.get(ENV_PORT, "8080"), kind=int, low=0)
    )
    if port > 65535:
        raise ConfigError(f"{ENV_PORT}: must be at most 65535, got {port}")
    heartbeat = (
        args.heartbeat
        if args.heartbeat is not None
        else _number(ENV_HEARTBEAT, env.get(ENV_HEARTBEAT, "15"), kind=float, low=0.05)
    )
    auth_raw = "none" if args.no_auth else env.get(ENV_AUTH, "kubernetes")
    if auth_raw not in ("kubernetes", "none"):
        raise ConfigError(f"{ENV_AUTH}: must be 'kubernetes' or 'none', got {auth_raw!r}")
    auth: AuthMode = "none" if auth_raw == "none" else "kubernetes"
    if auth == "none":
        # Without auth anyone who reaches the port acts with the server's kubeconfig, so it
        # must not be reachable from anywhere but this machine.
        if args.host is None and ENV_HOST not in env:
            host = "127.0.0.1"
        if host not in LOOPBACK_HOSTS:
            raise ConfigError(
                f"{ENV_AUTH}=none (--no-auth) binds to loopback only; "
                f"refusing to listen on {host!r} ({ENV_HOST} / --host)"
            )
    redis_url = args.redis_url or env.get(ENV_REDIS, "redis://127.0.0.1:6379/0")
    if not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{ENV_REDIS}: must be a redis://, rediss:// or unix:// URL")
    kube = load_kube_target(env, kubeconfig=args.kubeconfig, with_credentials=auth == "none")
    cluster_raw = env.get(ENV_REDIS_CLUSTER, "false").lower()
    if cluster_raw not in ("true", "false", "1", "0"):
        raise ConfigError(f"{ENV_REDIS_CLUSTER}: must be true or false, got {cluster_raw!r}")
    trace_url = env.get(ENV_TRACE_URL, "")
    if trace_url and (
        not trace_url.startswith(("http://", "https://")) or "{traceId}" not in trace_url
    ):
        raise ConfigError(
            f"{ENV_TRACE_URL}: must be an http(s) URL containing {{traceId}}, e.g. "
            "https://jaeger.example.com/trace/{traceId}"
        )
    return Settings(
        host=host,
        port=port,
        heartbeat_seconds=heartbeat,
        auth=auth,
        redis_url=redis_url,
        kube=kube,
        viewer_queue=args.viewer_queue,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        trace_url=trace_url,
        redis_cluster=cluster_raw in ("true", "1"),
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m agentrun_sse",
        description="agentrun SSE server: live, replayable run event streams and the web UI.",
    )
    p.add_argument("--host", help=f"address to bind (env {ENV_HOST}, default 0.0.0.0)")
    p.add_argument("--port", type=int, help=f"port (env {ENV_PORT}, default 8080)")
    p.add_argument(
        "--heartbeat", type=float, help=f"seconds between heartbeats (env {ENV_HEARTBEAT})"
    )
    p.add_argument(
        "--no-auth",
        action="store_true",
        help=f"DEVELOPMENT ONLY: no caller auth, loopback only (env {ENV_AUTH}=none)",
    )
    p.add_argument("--redis-url", help=f"Redis URL (env {ENV_REDIS})")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, or KUBECONFIG)")
    p.add_argument(
        "--viewer-queue",
        type=int,
        default=Settings.viewer_queue,
        help="events a viewer may fall behind before it is disconnected",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-access-log", action="store_true")
    return p


def load_kube_target(
    env: Mapping[str, str],
    *,
    kubeconfig: str | None = None,
    with_credentials: bool = False,
) -> KubeTarget | None:
    """The API server from a kubeconfig (flag, then KUBECONFIG) or in-cluster config."""
    path = kubeconfig or (env.get("KUBECONFIG", "").split(os.pathsep)[0] or None)
    if path is None and env.get("KUBERNETES_SERVICE_HOST") and not with_credentials:
        host = env["KUBERNETES_SERVICE_HOST"]
        port = env.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        return KubeTarget(
            server=f"https://{host}:{port}",
            ca_file=str(IN_CLUSTER_CA) if IN_CLUSTER_CA.exists() else None,
        )
    if path is None:
        default = Path.home() / ".kube" / "config"
        if not default.exists():
            return None
        path = str(default)
    return kubeconfig_target(Path(path), with_credentials=with_credentials)


def kubeconfig_target(path: Path, *, with_credentials: bool) -> KubeTarget:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"kubeconfig {path}: cannot read it ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"kubeconfig {path}: not a kubeconfig")
    contexts = {c["name"]: c.get("context", {}) for c in config.get("contexts") or []}
    clusters = {c["name"]: c.get("cluster", {}) for c in config.get("clusters") or []}
    users = {u["name"]: u.get("user", {}) for u in config.get("users") or []}
    context = contexts.get(config.get("current-context", ""), {})
    cluster = clusters.get(context.get("cluster", ""))
    if cluster is None and len(clusters) == 1:
        cluster = next(iter(clusters.values()))
    if not cluster or not cluster.get("server"):
        raise ConfigError(f"kubeconfig {path}: no cluster with a server for the current context")
    base = path.parent

    def file_of(value: str | None) -> str | None:
        return None if value is None else str(base / value)

    def data_of(value: str | None) -> bytes | None:
        return None if value is None else base64.b64decode(value)

    user = users.get(context.get("user", ""), {}) if with_credentials else {}
    cert = data_of(user.get("client-certificate-data"))
    key = data_of(user.get("client-key-data"))
    if with_credentials and user.get("client-certificate"):
        cert = Path(file_of(user["client-certificate"]) or "").read_bytes()
        key = Path(file_of(user.get("client-key")) or "").read_bytes()
    return KubeTarget(
        server=str(cluster["server"]).rstrip("/"),
        ca_file=file_of(cluster.get("certificate-authority")),
        ca_data=data_of(cluster.get("certificate-authority-data")),
        insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
        token=user.get("token") if with_credentials else None,
        client_cert_data=cert,
        client_key_data=key,
    )
