"""The operator's Prometheus metrics: what platform teams graph.

Owns the metric objects and the tiny functions that record into them; serves them on
AGENTRUN_METRICS_PORT. Never holds run state; labels are bounded (namespace, model, tool,
phase, outcome), never a run name or call id.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
_WAIT = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 24 * 3600)

RUNS_FINISHED = Counter(
    "agentrun_runs_finished_total", "Runs that reached an end phase.", ["namespace", "phase"]
)
RUNS_ACTIVE = Gauge("agentrun_runs_active", "Runs this operator executes or queues.", ["state"])
LLM_CALLS = Counter("agentrun_llm_calls_total", "LLM calls.", ["namespace", "model"])
TOKENS = Counter(
    "agentrun_tokens_total", "Tokens as the endpoint reported them.", ["namespace", "model", "kind"]
)
COST = Counter("agentrun_cost_usd_total", "Spend from the price table.", ["namespace", "model"])
TTFT = Histogram("agentrun_llm_ttft_seconds", "Time to first token.", ["model"], buckets=_LATENCY)
TTR = Histogram("agentrun_llm_ttr_seconds", "Time to the last token.", ["model"], buckets=_LATENCY)
TOOL_CALLS = Counter("agentrun_tool_calls_total", "Tool calls by outcome.", ["tool", "outcome"])
APPROVAL_WAIT = Histogram(
    "agentrun_approval_wait_seconds",
    "Time from a ToolApproval's creation to its decision or expiry.",
    ["namespace", "tool", "outcome"],
    buckets=_WAIT,
)

WORK_CLAIMS = Counter(
    "agentrun_work_claims_total",
    "Work entries a worker took: new, or reclaimed from a worker that stopped refreshing them.",
    ["how"],
)
WORK_QUEUE = Gauge("agentrun_work_queue_entries", "Work entries not yet acknowledged.")
WORK_AGE = Gauge(
    "agentrun_work_oldest_seconds",
    "How long the oldest work not yet done (waiting for a worker or claimed) has been queued.",
)
SPANS_DROPPED = Counter(
    "agentrun_trace_spans_dropped_total",
    "Spans not delivered to the trace collector (queue_full, export_failed).",
    ["reason"],
)
SPANS_EXPORTED = Counter("agentrun_trace_spans_exported_total", "Spans the collector accepted.")


LEADER = Gauge(
    "agentrun_controller_leader",
    "1 while this replica holds the controller Lease (it acts), 0 while it stands by",
)


_serving: set[int] = set()


def serve(*, host: str, port: int) -> None:
    """The /metrics endpoint on ``port`` (0: none); once per process."""
    if port and port not in _serving:
        start_http_server(port, addr=host)
        _serving.add(port)


def llm_call(
    *,
    namespace: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int,
    cost_usd: float,
    ttft_ms: int | None,
    ttr_ms: int,
) -> None:
    LLM_CALLS.labels(namespace, model).inc()
    TOKENS.labels(namespace, model, "input").inc(input_tokens)
    TOKENS.labels(namespace, model, "output").inc(output_tokens)
    TOKENS.labels(namespace, model, "cached").inc(cached_tokens)
    COST.labels(namespace, model).inc(cost_usd)
    if ttft_ms is not None:
        TTFT.labels(model).observe(ttft_ms / 1000)
    TTR.labels(model).observe(ttr_ms / 1000)
