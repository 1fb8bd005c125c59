"""What each finished batch leaves behind for operators.

- a log line (the whole story of a batch when there is no terminal),
- Prometheus series (:mod:`knowstream.metrics`),
- a line in ``<home>/history/batches.jsonl``, which ``knowstream report`` plots,
- a Prefect table artifact: counts, version, offsets, dead letters by reason,
- on the published version's MLflow run: durations, lag and a small plot of
  docs/chunks/triples over the versions so far.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from datetime import UTC, datetime

from knowstream import logs, metrics
from knowstream.settings import Settings

log = logging.getLogger(__name__)


def summary(topic: str, report) -> dict:
    return {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "topic": topic,
        "kind": report.kind,
        "messages": report.messages,
        "version": report.version,
        "offsets": [o.__dict__ for o in report.offsets],
        "dead_letters": dict(Counter(d["reason"] for d in report.dead_letters)),
        "lag": sum(report.lag.values()) if report.lag else None,
        "durations": {k: round(v, 3) for k, v in report.durations.items()},
        "counters": report.counters,
    }


def after_batch(settings: Settings, memory, report) -> dict:
    """Log, count, remember and annotate one processed batch; returns its summary."""
    row = summary(settings.topic, report)
    log.info(
        "batch: %d messages -> %s; %d dead letters %s; lag %s; %.1f s",
        report.messages,
        f"version {report.version}" if report.version else "no change",
        len(report.dead_letters),
        row["dead_letters"] or "",
        row["lag"],
        report.durations.get("batch", 0.0),
        extra={"batch": row},
    )
    m = metrics.default()
    m.observe_batch(settings.topic, report)
    path = logs.history_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    try:  # the batch is committed: what follows annotates, and must not fail it
        m.observe_versions(memory.registry)
        _prefect_artifact(row)
        if report.version:
            _mlflow_run(memory.registry, report, row)
    except Exception:
        log.warning("could not annotate batch (metrics, Prefect, MLflow)", exc_info=True)
    return row


def _prefect_artifact(row: dict) -> None:
    from prefect.artifacts import create_table_artifact

    offsets = ", ".join(f"{o['partition']}:{o['start']}-{o['end'] - 1}" for o in row["offsets"])
    table = [
        {"field": "version", "value": row["version"] or "no change"},
        {"field": "messages", "value": row["messages"]},
        {"field": "offsets", "value": offsets},
        *({"field": f"stage {k}", "value": v} for k, v in sorted(row["counters"].items())),
        *({"field": f"dead letters: {k}", "value": v} for k, v in row["dead_letters"].items()),
        {"field": "lag after", "value": row["lag"]},
        *({"field": f"{k} seconds", "value": v} for k, v in row["durations"].items()),
    ]
    key = re.sub(r"[^a-z0-9-]+", "-", f"{row['kind']}-batch-{row['topic']}".lower())
    create_table_artifact(table, key=key, description=f"{row['kind']} batch of {row['topic']}")


def _mlflow_run(registry, report, row: dict) -> None:
    from mlflow.entities import Metric

    run_id = registry.get(report.version).run_id
    now = int(datetime.now(UTC).timestamp() * 1000)
    values = {f"{k}_seconds": v for k, v in report.durations.items()}
    values["messages"] = report.messages
    if row["lag"] is not None:
        values["lag_after"] = row["lag"]
    registry.client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in values.items()])
    fig = _counts_figure(registry, report.version)
    registry.client.log_figure(run_id, fig, "plots/counts.png")
    fig.clear()


def _counts_figure(registry, upto: int):
    """Docs, chunks and triples of the published versions up to ``upto``."""
    from matplotlib.figure import Figure

    rows = [
        (v.version, json.loads(v.tags.get("counts", "{}")))
        for v in registry.versions()
        if v.state == "published" and v.version <= upto
    ]
    fig = Figure(figsize=(4, 2.5), dpi=100)
    ax = fig.subplots()
    for key in ("docs", "chunks", "triples"):
        ax.plot([v for v, _ in rows], [c.get(key, 0) for _, c in rows], marker="o", label=key)
    ax.set_xlabel("version")
    ax.legend(fontsize=7)
    ax.set_title(f"memory contents up to version {upto}", fontsize=9)
    fig.tight_layout()
    return fig
