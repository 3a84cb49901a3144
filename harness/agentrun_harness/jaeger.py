"""A real Jaeger (v2, built from the Go module proxy by ``scripts/build-jaeger.sh``) on free
loopback ports: an OTLP HTTP receiver and the query API, traces kept in memory.

Owns one ``jaeger`` process, its config and log; reads traces back through Jaeger's query
API (``/api/traces/<id>``), as a user's UI does.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agentrun_harness import procs
from agentrun_harness.controlplane import free_port

_CONFIG = """\
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: {host}:{health}
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: {host}:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      http:
        endpoint: {host}:{otlp}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""


class JaegerError(RuntimeError):
    pass


# The release scripts/build-jaeger.sh builds (build/jaeger-1.75/go.mod; a unit test keeps
# them equal).
JAEGER_VERSION = "1.75.0"


def binary() -> Path:
    """The cached Jaeger binary (``make jaeger``, which ``make test`` runs, builds it once)."""
    cache = os.environ.get("AGENTRUN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "agentrun"
    )
    path = Path(cache) / f"jaeger-{JAEGER_VERSION}" / "bin" / "jaeger"
    if not path.is_file():
        raise JaegerError(
            f"{path} is missing: run `make jaeger` (scripts/build-jaeger.sh; builds once from "
            "the Go module proxy, cached by version)"
        )
    return path


class Jaeger(procs.Managed):
    """``host``: where its OTLP receiver and query API listen (another address than loopback
    only for pods of the test node to reach it)."""

    def __init__(self, *, workdir: Path, host: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.host = host
        self.otlp_port = free_port(host)
        self.query_port = free_port(host)
        self.health_port = free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def otlp_url(self) -> str:
        """The base URL to give an OTLP HTTP exporter (spans go to <it>/v1/traces)."""
        return f"http://{self.host}:{self.otlp_port}"

    @property
    def query_url(self) -> str:
        return f"http://{self.host}:{self.query_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "jaeger.log"

    def start(self, *, timeout: float = 60) -> None:
        jaeger = binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yaml"
        config.write_text(
            _CONFIG.format(
                host=self.host,
                health=self.health_port,
                query=self.query_port,
                query_grpc=free_port(),
                otlp=self.otlp_port,
            )
        )
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(jaeger), f"--config=file:{config}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise JaegerError(f"jaeger exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._healthy():
                return
            time.sleep(0.1)
        raise JaegerError(f"jaeger not healthy after {timeout}s:\n{self.log_tail()}")

    def _healthy(self) -> bool:
        try:
            url = f"http://{self.host}:{self.health_port}/status"
            with urllib.request.urlopen(url, timeout=1) as r:
                return bool(json.load(r).get("healthy"))
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        procs.stop(self.proc)

    def kill(self) -> None:
        procs.kill(self.proc)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        """The spans Jaeger holds of a trace ([] if none yet), each with ``parent`` (the
        span id it is a child of, or None) and ``tags`` as a dict."""
        try:
            with urllib.request.urlopen(f"{self.query_url}/api/traces/{trace_id}", timeout=5) as r:
                found = json.load(r)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return []
            raise
        spans: list[dict[str, Any]] = []
        for data in found.get("data") or []:
            for span in data.get("spans") or []:
                parents = [
                    ref["spanID"]
                    for ref in span.get("references") or []
                    if ref["refType"] == "CHILD_OF"
                ]
                spans.append(
                    {
                        "name": span["operationName"],
                        "traceId": span["traceID"],
                        "spanId": span["spanID"],
                        "parent": parents[0] if parents else None,
                        "start": span["startTime"],  # microseconds
                        "duration": span["duration"],
                        "tags": {t["key"]: t["value"] for t in span.get("tags") or []},
                        "process": data.get("processes", {}).get(span.get("processID"), {}),
                    }
                )
        return spans
