"""tracing: a run's trace identity, the no-op when off, and counting what is lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from agentrun_operator import tracing


def dropped(reason: str) -> float:
    value = REGISTRY.get_sample_value("agentrun_trace_spans_dropped_total", {"reason": reason})
    return value or 0.0


def test_a_run_trace_survives_being_stored() -> None:
    run = tracing.RunTrace.new()
    again = tracing.RunTrace.loads(run.dumps())
    assert again == run
    assert len(run.trace_hex) == 32 and int(run.trace_hex, 16) == run.trace_id


def test_off_without_an_endpoint_and_every_call_is_a_no_op() -> None:
    off = tracing.Tracing(environ={})
    assert not off.enabled
    run = tracing.RunTrace.new()
    with off.span("x", run):
        off.annotate({"a": 1})
    off.record("y", run, start_ns=time.time_ns(), root=True)
    assert off.headers() == {}


def test_the_standard_otlp_variables_turn_it_on() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    on = tracing.Tracing(environ=env)
    assert on.enabled and on.endpoint == "http://collector:4318"
    ours = tracing.Tracing("http://jaeger:4318/", environ={})
    assert ours.endpoint == "http://jaeger:4318/v1/traces"


def test_spans_hang_under_the_run_and_carry_its_trace_in_traceparent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    memory = InMemorySpanExporter()
    monkeypatch.setattr(tracing, "OTLPSpanExporter", lambda **_: memory)
    t = tracing.Tracing("http://collector:4318", environ={})
    run = tracing.RunTrace.new()
    with t.span("workflow act", run):
        with t.span("chat m", run, client=True):
            header = t.headers()["traceparent"]
    t.record("run x", run, start_ns=run.start_ns, root=True)
    assert t._processor is not None
    t._processor.force_flush()
    spans = {s.name: s for s in memory.get_finished_spans()}
    _, trace_id, parent, flags = header.split("-")
    assert trace_id == run.trace_hex and flags == "01"
    assert int(parent, 16) == spans["chat m"].context.span_id
    parent_of = {n: s.parent.span_id if s.parent else None for n, s in spans.items()}
    assert parent_of["chat m"] == spans["workflow act"].context.span_id
    assert parent_of["workflow act"] == run.span_id
    root = spans["run x"]
    assert (root.context.trace_id, root.context.span_id) == (run.trace_id, run.span_id)
    assert root.parent is None and root.start_time == run.start_ns


def test_attributes_are_capped_and_made_plain() -> None:
    clean = tracing._clean(
        {"long": "x" * 10_000, "none": None, "obj": {"a": 1}, "list": ["a"], "n": 3}
    )
    assert len(clean["long"]) == tracing.MAX_ATTRIBUTE_CHARS
    assert "none" not in clean
    assert clean["obj"] == '{"a": 1}' and clean["list"] == ["a"] and clean["n"] == 3


class _Stuck(SpanExporter):
    """An exporter that holds the worker until released (a collector that hangs)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(10)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_spans_a_full_queue_drops_are_counted_and_nothing_waits() -> None:
    exporter = _Stuck()
    processor = tracing._Batching(
        exporter, max_queue_size=2, max_export_batch_size=1, schedule_delay_millis=10
    )
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    before = dropped("queue_full")
    tracer.start_span("first").end()
    assert exporter.entered.wait(5), "the worker never exported"
    started = time.monotonic()
    for i in range(5):  # the worker is stuck: two fit in the queue, three are dropped
        tracer.start_span(f"s{i}").end()
    assert time.monotonic() - started < 0.5, "ending a span waited for the collector"
    assert dropped("queue_full") - before == 3
    exporter.release.set()
    provider.shutdown()


def test_an_export_that_fails_counts_its_spans() -> None:
    class Failing(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            raise ConnectionError("refused")

    counting = tracing._CountingExporter(Failing(), "http://nowhere:4318/v1/traces")
    before = dropped("export_failed")
    assert counting.export([]) is SpanExportResult.FAILURE
    assert counting.export([object()] * 4) is SpanExportResult.FAILURE  # type: ignore[list-item]
    assert dropped("export_failed") - before == 4
