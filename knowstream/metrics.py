"""Prometheus series for ingest, versions and serving, in one registry per process.

The ingest worker (``ingest --metrics-port``) and the HTTP API (``/metrics``) expose
the same :func:`default` registry, so a worker that also serves shows both.
``infra/grafana-dashboard.json`` plots these series.
"""

from __future__ import annotations

import math
import time
from datetime import datetime

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

# Answers in the LM modes take 7-30 s on CPU; batches take minutes.
ANSWER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120)
BATCH_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)  # process_*, python_*: the process itself
        # --- ingest ---------------------------------------------------------------
        self.batches = Counter(
            "knowstream_ingest_batches",
            "Micro-batches processed; outcome: published or unchanged",
            ["topic", "kind", "outcome"],
            registry=r,
        )
        self.messages = Counter(
            "knowstream_ingest_messages", "Kafka records consumed", ["topic"], registry=r
        )
        self.stage_items = Counter(
            "knowstream_ingest_stage_items",
            "Items counted by each Beam stage (parse accepted/rejected, dedup reasons, "
            "chunk chunks, embed chunks, triples triples, amortize docs)",
            ["topic", "stage", "counter"],
            registry=r,
        )
        self.dead_letters = Counter(
            "knowstream_ingest_dead_letters",
            "Records sent to the dead-letter topic",
            ["topic", "reason"],
            registry=r,
        )
        self.lag = Gauge(
            "knowstream_ingest_consumer_lag",
            "Records after the group's position, as of the last fetch",
            ["topic", "partition"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "knowstream_ingest_seconds",
            "Duration of a batch's steps: pipeline, publish, batch (both); queued: its oldest "
            "record's wait for the batch (ingest)",
            ["step"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.last_batch = Gauge(
            "knowstream_ingest_last_batch_timestamp_seconds",
            "When the last batch finished",
            ["topic"],
            registry=r,
        )
        # --- versions -------------------------------------------------------------
        self.live_version = Gauge(
            "knowstream_live_version", "Version that live points at", registry=r
        )
        self.published_versions = Gauge(
            "knowstream_published_versions", "Versions in state published", registry=r
        )
        self.live_created = Gauge(
            "knowstream_live_created_timestamp_seconds",
            "When the live version was created",
            registry=r,
        )
        live_age = Gauge(
            "knowstream_live_age_seconds", "Seconds since the live version was created", registry=r
        )
        self._live_created_at = 0.0
        live_age.set_function(self._live_age)
        # --- serving --------------------------------------------------------------
        self.live_refresh_failures = Counter(
            "knowstream_live_refresh_failures",
            "Failed reads of the live alias by the API server (it serves the last one read)",
            registry=r,
        )
        self.requests = Counter(
            "knowstream_http_requests",
            "HTTP requests by route and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "knowstream_http_request_seconds",
            "HTTP latency by route",
            ["route"],
            buckets=ANSWER_BUCKETS,
            registry=r,
        )
        self.answer_seconds = Histogram(
            "knowstream_answer_seconds",
            "Latency of answered /ask requests by answer mode",
            ["mode"],
            buckets=ANSWER_BUCKETS,
            registry=r,
        )

    def _live_age(self) -> float:
        return time.time() - self._live_created_at if self._live_created_at else math.nan

    def observe_batch(self, topic: str, report) -> None:
        """Count one ``flows.batch.BatchReport``; its ``lag`` is the partitions' backlog."""
        outcome = "published" if report.version else "unchanged"
        self.batches.labels(topic, report.kind, outcome).inc()
        self.messages.labels(topic).inc(report.messages)
        for name, n in report.counters.items():
            stage, _, counter = name.partition(".")
            self.stage_items.labels(topic, stage, counter).inc(n)
        for letter in report.dead_letters:
            self.dead_letters.labels(topic, letter["reason"]).inc()
        for partition, n in report.lag.items():
            self.lag.labels(topic, str(partition)).set(n)
        for step, seconds in report.durations.items():
            self.step_seconds.labels(step).observe(seconds)
        self.last_batch.labels(topic).set_to_current_time()

    def observe_versions(self, registry) -> None:
        """Live version, published count and live's creation time from the MLflow registry."""
        versions = registry.versions()
        live = registry.live()
        self.published_versions.set(sum(v.state == "published" for v in versions))
        self.live_version.set(live or 0)
        created = next((v.created_at for v in versions if v.version == live), "")
        self._live_created_at = datetime.fromisoformat(created).timestamp() if created else 0.0
        self.live_created.set(self._live_created_at)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """``/metrics`` on ``host:port`` from a daemon thread (the ingest worker's)."""
        start_http_server(port, addr=host, registry=self.registry)


_default: Metrics | None = None


def default() -> Metrics:
    """The process's registry, shared by the ingest worker and the HTTP API."""
    global _default
    if _default is None:
        _default = Metrics()
    return _default
