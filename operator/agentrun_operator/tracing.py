"""Every run as one OpenTelemetry trace, exported over OTLP HTTP/protobuf; off unless an
endpoint is set (``AGENTRUN_OTEL_ENDPOINT``, or the standard ``OTEL_EXPORTER_OTLP_*``).

Owns: the tracer provider and its batching exporter (a bounded queue drained by the SDK's
own thread, so a slow or absent collector never blocks a run; spans dropped are counted in
``agentrun_trace_spans_dropped_total`` and an unreachable collector is a warning), a run's
trace identity (``RunTrace``: the trace id, the id and start of the run's root span,
checkpointed in Redis by ``store`` so a resumed run continues its trace), spans recorded
after the fact with a given id and start (those that outlive a process: the run itself, an
approval wait, a stop), and the W3C ``traceparent`` of the current span for outgoing
requests. The only module that imports OpenTelemetry.
Never: raises into a run (a tracing fault is logged, never the run's), or records arguments
that were not redacted (callers pass what people may see).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from agentrun_operator import metrics as prom
from agentrun_operator import models

log = logging.getLogger("agentrun.tracing")

# Attribute values are capped (a tool's arguments, a message): traces are for finding where
# time and money went, the event stream keeps the whole story.
MAX_ATTRIBUTE_CHARS = 4096
STANDARD_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

Attributes = Mapping[str, Any]


@dataclass(frozen=True)
class RunTrace:
    """A run's trace identity, fixed when the run first executes and kept in Redis."""

    trace_id: int
    span_id: int  # the run's root span, recorded when the run ends
    start_ns: int  # when the run first executed: the root span's start

    @classmethod
    def new(cls) -> RunTrace:
        ids = RandomIdGenerator()
        return cls(ids.generate_trace_id(), ids.generate_span_id(), time.time_ns())

    @property
    def trace_hex(self) -> str:
        return trace.format_trace_id(self.trace_id)

    def dumps(self) -> str:
        return json.dumps(
            {
                "traceId": self.trace_hex,
                "spanId": trace.format_span_id(self.span_id),
                "start": self.start_ns,
            }
        )

    @classmethod
    def loads(cls, raw: str | bytes) -> RunTrace:
        found = json.loads(raw)
        return cls(int(found["traceId"], 16), int(found["spanId"], 16), int(found["start"]))

    def context(self) -> otel_context.Context:
        """A context whose current span is the run's root, for its children."""
        parent = SpanContext(
            self.trace_id,
            self.span_id,
            is_remote=False,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
        return trace.set_span_in_context(NonRecordingSpan(parent))


# The ids the next span gets, for spans recorded with ids fixed earlier (the run's root).
_FIXED_IDS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "agentrun_fixed_ids", default=None
)


class _Ids(RandomIdGenerator):
    def generate_span_id(self) -> int:
        fixed = _FIXED_IDS.get()
        return fixed[1] if fixed else super().generate_span_id()

    def generate_trace_id(self) -> int:
        fixed = _FIXED_IDS.get()
        return fixed[0] if fixed else super().generate_trace_id()


class _CountingExporter(SpanExporter):
    """The OTLP exporter, counting what it delivers and what it loses; a collector that
    cannot be reached is a warning (at most once a minute), never an error of a run."""

    def __init__(self, inner: SpanExporter, endpoint: str) -> None:
        self._inner = inner
        self._endpoint = endpoint
        self._warned_at = 0.0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception as e:  # the SDK's worker thread must go on
            log.debug("span export raised: %s", e)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            prom.SPANS_EXPORTED.inc(len(spans))
            return result
        prom.SPANS_DROPPED.labels("export_failed").inc(len(spans))
        now = time.monotonic()
        if now - self._warned_at > 60:
            self._warned_at = now
            log.warning(
                "traces: the collector at %s did not take %d spans; they are dropped "
                "(agentrun_trace_spans_dropped_total counts them) and runs go on",
                self._endpoint,
                len(spans),
            )
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _Batching(BatchSpanProcessor):
    """The SDK's batching processor, counting the spans its full queue drops."""

    def on_end(self, span: ReadableSpan) -> None:
        queue = getattr(getattr(self, "_batch_processor", None), "_queue", None)
        if queue is not None and queue.maxlen is not None and len(queue) >= queue.maxlen:
            prom.SPANS_DROPPED.labels("queue_full").inc()
        super().on_end(span)


def _traces_url(endpoint: str) -> str:
    """AGENTRUN_OTEL_ENDPOINT is a collector's base URL, like OTEL_EXPORTER_OTLP_ENDPOINT."""
    return endpoint.rstrip("/") + "/v1/traces"


class Tracing:
    """The operator's tracer; every method is a cheap no-op when tracing is off."""

    def __init__(
        self,
        endpoint: str = "",
        *,
        environ: Mapping[str, str] | None = None,
        service: str = "agentrun-operator",
        version: str = "",
        queue_size: int = 2048,
        export_timeout_seconds: float = 5.0,
        schedule_delay_ms: int = 1000,
    ) -> None:
        env = os.environ if environ is None else environ
        standard = next((env[k] for k in STANDARD_ENDPOINTS if env.get(k)), "")
        self.enabled = bool(endpoint or standard)
        self.endpoint = _traces_url(endpoint) if endpoint else standard
        self._provider: TracerProvider | None = None
        self._processor: _Batching | None = None
        self._propagator = TraceContextTextMapPropagator()
        if not self.enabled:
            self._tracer: trace.Tracer = trace.NoOpTracer()
            return
        attributes = {"service.name": env.get("OTEL_SERVICE_NAME") or service}
        if version:
            attributes["service.version"] = version
        self._provider = TracerProvider(
            resource=Resource.create(attributes), sampler=ALWAYS_ON, id_generator=_Ids()
        )
        # The exporter logs each retry and each lost batch; _CountingExporter says it once a
        # minute, with the metric that counts them.
        logging.getLogger("opentelemetry.exporter.otlp.proto.http").setLevel(logging.CRITICAL)
        # endpoint=None: the exporter reads the standard variables (and their headers,
        # certificates, compression) itself.
        exporter = OTLPSpanExporter(
            endpoint=_traces_url(endpoint) if endpoint else None,
            timeout=export_timeout_seconds,
        )
        self._processor = _Batching(
            _CountingExporter(exporter, self.endpoint),
            max_queue_size=queue_size,
            max_export_batch_size=min(512, queue_size),
            schedule_delay_millis=schedule_delay_ms,
            export_timeout_millis=export_timeout_seconds * 1000,
        )
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer("agentrun", version or None)
        log.info("traces: exporting each run's trace to %s (OTLP HTTP/protobuf)", self.endpoint)

    # -- spans of the current process ---------------------------------------------------------
    @contextlib.contextmanager
    def span(
        self,
        name: str,
        run: RunTrace | None,
        *,
        client: bool = False,
        attributes: Attributes | None = None,
        benign: tuple[type[BaseException], ...] = (),
    ) -> Iterator[None]:
        """A span around the block, the current span inside it: a child of the current span
        when that belongs to ``run``'s trace, else of the run's root. An exception marks it
        as an error (and goes on), unless it is one of ``benign`` (control flow).
        ``client``: a request to another service (an LLM call)."""
        if not self.enabled or run is None:
            yield
            return
        current = trace.get_current_span().get_span_context()
        parent = None if current.trace_id == run.trace_id else run.context()
        with self._tracer.start_as_current_span(
            name,
            context=parent,
            kind=SpanKind.CLIENT if client else SpanKind.INTERNAL,
            attributes=_clean(attributes),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except BaseException as e:
                if not isinstance(e, benign):
                    span.set_status(Status(StatusCode.ERROR, _cap(f"{type(e).__name__}: {e}")))
                raise

    def annotate(self, attributes: Attributes, *, error: str | None = None) -> None:
        """Add to the current span (a tool call's outcome, an LLM call's usage)."""
        if not self.enabled:
            return
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(_clean(attributes))
            if error:
                span.set_status(Status(StatusCode.ERROR, _cap(error)))

    def event(self, name: str, attributes: Attributes | None = None) -> None:
        if not self.enabled:
            return
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(name, _clean(attributes))

    def headers(self) -> dict[str, str]:
        """The W3C ``traceparent`` of the current span, for a request it makes."""
        if not self.enabled:
            return {}
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier

    # -- spans that outlive a process -----------------------------------------------------------
    def record(
        self,
        name: str,
        run: RunTrace | None,
        *,
        start_ns: int,
        end_ns: int | None = None,
        attributes: Attributes | None = None,
        error: str | None = None,
        root: bool = False,
    ) -> None:
        """A span that began before this process could hold it (the run, an approval wait,
        a stop), recorded now with its real start. ``root``: the run's own span, with the
        ids its children have pointed to since it began."""
        if not self.enabled or run is None:
            return
        try:
            token = _FIXED_IDS.set((run.trace_id, run.span_id)) if root else None
            try:
                span = self._tracer.start_span(
                    name,
                    # The root has no parent: an empty context, not the caller's current span.
                    context=otel_context.Context() if root else run.context(),
                    kind=SpanKind.INTERNAL,
                    attributes=_clean(attributes),
                    start_time=start_ns,
                )
            finally:
                if token is not None:
                    _FIXED_IDS.reset(token)
            if error:
                span.set_status(Status(StatusCode.ERROR, _cap(error)))
            span.end(end_time=end_ns or time.time_ns())
        except Exception:  # a trace is never worth a run
            log.exception("traces: could not record span %s", name)

    async def flush(self, timeout_seconds: float = 5.0) -> None:
        """Hand queued spans to the collector; in a thread, so the event loop never waits
        on the collector."""
        if self._processor is not None:
            await asyncio.to_thread(self._processor.force_flush, int(timeout_seconds * 1000))

    async def close(self, timeout_seconds: float = 5.0) -> None:
        """Deliver what is queued and stop; a collector that does not answer delays the
        operator's exit by at most ``timeout_seconds``."""
        provider, self._provider = self._provider, None
        if provider is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(provider.shutdown), timeout_seconds)


def _cap(text: str) -> str:
    return text if len(text) <= MAX_ATTRIBUTE_CHARS else text[: MAX_ATTRIBUTE_CHARS - 1] + "…"


def _clean(attributes: Attributes | None) -> dict[str, Any]:
    """Attributes OpenTelemetry takes: None left out, strings capped, other values as JSON."""
    out: dict[str, Any] = {}
    for key, value in (attributes or {}).items():
        if value is None:
            continue
        if isinstance(value, bool | int | float):
            out[key] = value
        elif isinstance(value, str):
            out[key] = _cap(value)
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            out[key] = [_cap(v) for v in value]
        else:
            out[key] = _cap(json.dumps(value, default=str, sort_keys=True))
    return out


# -- the attributes of the engine's spans (GenAI semantic conventions where they exist) ------
def chat_attributes(model: str, base_url: str, *, node: str) -> dict[str, Any]:
    """A ``chat <model>`` client span: one LLM call."""
    base = urlsplit(base_url)
    return {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",  # the OpenAI-compatible API, whoever serves it
        "gen_ai.request.model": model,
        "server.address": base.hostname,
        "server.port": base.port,
        "agentrun.node": node,
    }


def chat_usage_attributes(call: models.CallUsage, *, finish_reason: str) -> dict[str, Any]:
    """What an LLM call used, once its stream ended."""
    return {
        "gen_ai.usage.input_tokens": call.input_tokens,
        "gen_ai.usage.output_tokens": call.output_tokens,
        "gen_ai.usage.cache_read.input_tokens": call.cached_tokens,
        "gen_ai.response.time_to_first_chunk": (
            None if call.ttft_ms is None else call.ttft_ms / 1000
        ),
        "gen_ai.response.finish_reasons": [finish_reason],
        "agentrun.cost_usd": call.cost_usd,
    }


def tool_attributes(
    name: str,
    call_id: str,
    arguments: Mapping[str, Any],
    *,
    namespace: str,
    server: str | None,
    decision: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """An ``execute_tool <function>`` span; the target (``Kind namespace/name``) of a
    built-in call, the MCPServer of an MCP one, the approval it ran under."""
    kind, obj = arguments.get("kind"), arguments.get("name")
    target = (
        f"{kind} {arguments.get('namespace') or namespace}/{obj}"
        if server is None and isinstance(kind, str) and isinstance(obj, str)
        else None
    )
    return {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": name,
        "gen_ai.tool.call.id": call_id,
        "agentrun.tool.server": server,
        "agentrun.target": target,
        "agentrun.target.uid": ((decision or {}).get("target") or {}).get("uid"),
        "agentrun.approval": (decision or {}).get("approval"),
    }
