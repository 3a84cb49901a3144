"""Prometheus instruments of the SSE server, in a registry of its own per app.

Owns the metric names and their help texts. Never: labels a metric with a run, a user or
anything else without a small bound (a label per run would grow without limit).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# From well under a millisecond (one process, loopback) to a minute (a stalled proxy).
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    60.0,
)
_REPLAY_BUCKETS = (0, 1, 10, 100, 1_000, 10_000, 100_000)


class Metrics:
    """One set of instruments; a registry per app, so several apps fit in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.open_streams = Gauge(
            "agentrun_sse_open_streams", "Event streams open now.", registry=r
        )
        self.readers = Gauge(
            "agentrun_sse_redis_readers",
            "Redis stream readers running now (one per run being watched).",
            registry=r,
        )
        self.events_sent = Counter(
            "agentrun_sse_events_sent", "Run events sent to viewers.", registry=r
        )
        self.heartbeats_sent = Counter(
            "agentrun_sse_heartbeats_sent", "Heartbeat events sent to viewers.", registry=r
        )
        self.lagged = Counter(
            "agentrun_sse_viewers_lagged",
            "Viewers disconnected because they fell too far behind.",
            registry=r,
        )
        self.xreads = Counter(
            "agentrun_sse_redis_xreads", "XREAD calls made by the run readers.", registry=r
        )
        self.replay_events = Histogram(
            "agentrun_sse_replay_events",
            "Events replayed when a stream opens (history sent before the live tail).",
            buckets=_REPLAY_BUCKETS,
            registry=r,
        )
        self.delivery_latency = Histogram(
            "agentrun_sse_delivery_latency_seconds",
            "Time from an event's ts (written by the operator) to its send to a viewer, "
            "for live events.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
