"""Prometheus series, scraped over HTTP while a real ingest runs (tansu, Beam, Qdrant, MLflow)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from knowstream import logs, metrics
from knowstream.connectors.kafka import (
    committed_offsets,
    dead_letter_summary,
    produce_file,
    send_dead_letters,
)
from knowstream.connectors.mlflow import Registry
from knowstream.connectors.qdrant import close_clients
from knowstream.flows.ingest import ingest_flow
from knowstream.serving.app import create_app
from tests.fixtures_broker import free_port
from tests.test_memory_e2e import sample_events, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return samples(r.read().decode())


def test_ingest_metrics_scraped_during_ingest(memory_settings, tmp_path):
    # 4 records a batch: the first holds two bad messages and two documents, the
    # second the three documents left, so after the first the lag is 3.
    settings = memory_settings.model_copy(update={"max_batch_messages": 4})
    docs = sample_events(5)
    lines = ["{not json", json.dumps({"op": "upsert", "text": "no id"}), *map(json.dumps, docs)]
    produce_file(settings, write_jsonl(tmp_path / "in.jsonl", lines))
    port = free_port()
    metrics.default().serve(port)
    topic = settings.topic
    seen = []

    def during(report) -> None:
        seen.append((report, scrape(port)))

    # serve --ingest's hook: each version as soon as it is live, before its batch's commit
    # (and its on_batch); a hook that fails stops nothing.
    published: list[tuple[int, int | None, int, int]] = []

    def on_published(version: int) -> None:
        committed = committed_offsets(settings, settings.group_id).get(0, 0)
        published.append((version, Registry(settings).live(), committed, len(seen)))
        if len(published) == 1:
            raise RuntimeError("a failing hook")

    ingest_flow(settings, once=True, on_batch=during, on_published=on_published)
    assert [r.messages for r, _ in seen] == [4, 3]
    assert published == [
        (seen[0][0].version, seen[0][0].version, 0, 0),
        (seen[1][0].version, seen[1][0].version, 4, 1),
    ]
    assert all(r.durations["queued"] >= 0 for r, _ in seen)

    first, got = seen[0]
    assert (
        got[("knowstream_ingest_consumer_lag", frozenset({("topic", topic), ("partition", "0")}))]
        == 3
    )
    for reason in ("invalid_json", "missing_doc_id"):
        key = frozenset({("topic", topic), ("reason", reason)})
        assert got[("knowstream_ingest_dead_letters_total", key)] == 1
    stage = {
        (dict(labels)["stage"], dict(labels)["counter"]): value
        for (name, labels), value in got.items()
        if name == "knowstream_ingest_stage_items_total" and dict(labels)["topic"] == topic
    }
    assert stage[("parse", "accepted")] == 2 and stage[("parse", "rejected")] == 2
    assert stage == {tuple(k.split(".", 1)): v for k, v in first.counters.items()}
    assert stage[("chunk", "chunks")] > 0 and stage[("amortize", "docs")] == 2
    assert got[("knowstream_live_version", frozenset())] == first.version

    last, got = seen[1]
    assert (
        got[("knowstream_ingest_consumer_lag", frozenset({("topic", topic), ("partition", "0")}))]
        == 0
    )
    batches = frozenset({("topic", topic), ("kind", "ingest"), ("outcome", "published")})
    assert got[("knowstream_ingest_batches_total", batches)] == 2
    assert got[("knowstream_ingest_messages_total", frozenset({("topic", topic)}))] == 7
    assert got[("knowstream_published_versions", frozenset())] == 2
    assert got[("knowstream_live_version", frozenset())] == last.version
    assert any(name == "process_cpu_seconds_total" for name, _ in got)
    rows = [json.loads(x) for x in logs.history_file(settings).read_text().splitlines()]
    assert [r["lag"] for r in rows] == [3, 0]
    assert rows[0]["dead_letters"] == {"invalid_json": 1, "missing_doc_id": 1}

    # Each batch left a Prefect table artifact, each version's MLflow run its durations,
    # lag and a plot, and the registry version a description of what changed.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    key = f"ingest-batch-{topic}".lower()
    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert len(found) == 2 and all(a.type == "table" for a in found)
    cells = {row["field"]: row["value"] for row in json.loads(found[0].data)} | {
        row["field"]: row["value"] for row in json.loads(found[1].data)
    }
    assert "dead letters: invalid_json" in cells and "stage parse.accepted" in cells
    registry = Registry(settings)
    run = registry.client.get_run(registry.get(first.version).run_id)
    assert run.data.metrics["lag_after"] == 3 and run.data.metrics["messages"] == 4
    assert "pipeline_seconds" in run.data.metrics and "publish_seconds" in run.data.metrics
    plots = [a.path for a in registry.client.list_artifacts(run.info.run_id, "plots")]
    assert plots == ["plots/counts.png"]
    described = registry.client.get_model_version(registry.name, str(first.version)).description
    assert described.startswith("ingest from empty memory: 2 documents added or updated")
    assert "2 dead letters" in described

    # A redelivered batch sends its dead letters again: none is duplicated (issue 8).
    assert send_dead_letters(settings, first.dead_letters) == 0
    dlq = dead_letter_summary(settings)
    assert dlq == {
        "messages": 2,
        "distinct": 2,
        "by_reason": {"invalid_json": 1, "missing_doc_id": 1},
    }

    # The API exposes the same registry, with every route and status code counted.
    app_metrics = metrics.Metrics()
    close_clients()
    app = create_app(settings.model_copy(update={"api_token": SecretStr("t")}), metrics=app_metrics)

    def boom() -> None:
        raise RuntimeError("a bug in a handler")

    app.add_api_route("/boom", boom)  # an endpoint that fails: counted as a 500
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/boom").status_code == 500
        ok = {"Authorization": "Bearer t"}
        assert client.post("/ask", json={"question": "Super Bowl?"}).status_code == 401
        assert client.post("/ask", json={"question": ""}, headers=ok).status_code == 422
        assert client.post("/ask", json={"question": "Super Bowl?"}, headers=ok).status_code == 200
        assert client.post("/admin/live", json={"version": 1}, headers=ok).status_code == 200
        got = samples(client.get("/metrics").text)
    close_clients()

    def requests(route: str, status: int) -> float:
        labels = {("route", route), ("method", "POST"), ("status", str(status))}
        return got[("knowstream_http_requests_total", frozenset(labels))]

    assert requests("/ask", 401) == requests("/ask", 422) == requests("/ask", 200) == 1
    assert requests("/admin/live", 200) == 1
    boom_labels = frozenset({("route", "/boom"), ("method", "GET"), ("status", "500")})
    assert got[("knowstream_http_requests_total", boom_labels)] == 1
    assert got[("knowstream_answer_seconds_count", frozenset({("mode", "evidence")}))] == 1
    assert (
        "knowstream_answer_seconds_bucket",
        frozenset({("mode", "evidence"), ("le", "120.0")}),
    ) in got
    assert got[("knowstream_live_version", frozenset())] == 1


def test_grafana_dashboard_uses_exported_series():
    # Every series the dashboard queries is one this code exports (after one sample of each).
    m = metrics.Metrics()
    m.lag.labels("t", "0").set(1)
    m.dead_letters.labels("t", "invalid_json").inc()
    m.stage_items.labels("t", "parse", "accepted").inc()
    m.batches.labels("t", "ingest", "published").inc()
    m.messages.labels("t").inc()
    m.step_seconds.labels("batch").observe(1)
    m.last_batch.labels("t").set_to_current_time()
    m.requests.labels("/ask", "POST", "200").inc()
    m.request_seconds.labels("/ask").observe(1)
    m.answer_seconds.labels("rag").observe(1)
    exported = {name for name, _ in samples(generate_latest(m.registry).decode())}
    dashboard = json.loads((ROOT / "infra" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {n for e in exprs for n in re.findall(r"\b((?:knowstream|process)_[a-z_]+)", e)}
    assert used and used <= exported, used - exported
    for family in ("consumer_lag", "dead_letters", "stage_items", "answer_seconds"):
        assert any(family in n for n in used)
