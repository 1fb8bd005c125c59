"""Flows "backfill", "promote" and "rollback": side lines of versions, and the pointer.

A backfill replays a range of the topic (offsets or timestamps), or a Parquet
archive of events, into new versions on top of a base version (``live`` by
default, or nothing for a fresh line) without touching ``live``, optionally
with another amortizer: a checkpoint folder or a registry version
(``models:/knowstream-amortizer/3``, ``models:/knowstream-amortizer@candidate``),
which the batch pins once and records in the manifest (``amortizer_model``,
``amortizer_model_version``). Documents built by other models than the base's are
rebuilt (the dedup key includes the model fingerprint). ``promote`` then makes
the result live; ``rollback`` points ``live`` back at any published version.
Both are O(1): they move the MLflow alias, no data is copied.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from prefect import flow, get_run_logger

from knowstream.connectors.kafka import KafkaRecord, read_range
from knowstream.flows.batch import BatchReport, process_batch
from knowstream.flows.observe import after_batch
from knowstream.memory import Memory
from knowstream.settings import Settings


def archive_records(path: Path) -> list[KafkaRecord]:
    """Events from a Parquet archive (EVENT_SCHEMA columns) as replayable records."""
    records = []
    for i, row in enumerate(pq.read_table(path).to_pylist()):
        if isinstance(row.get("metadata"), str):
            row["metadata"] = json.loads(row["metadata"] or "{}")
        if row.get("published_at") is not None:
            row["published_at"] = row["published_at"].isoformat()
        row = {k: v for k, v in row.items() if v is not None}
        value = json.dumps(row, ensure_ascii=False).encode("utf-8")
        key = str(row.get("doc_id", "")).encode("utf-8") or None
        records.append(KafkaRecord(f"archive:{path.name}", 0, i, key, value, 0))
    return records


@flow(name="backfill", log_prints=True)
def backfill_flow(
    settings: Settings | None = None,
    start: dict[int, int] | None = None,
    end: dict[int, int] | None = None,
    start_ts_ms: int | None = None,
    end_ts_ms: int | None = None,
    archive: str | None = None,
    base: str = "live",
    amortizer: str | None = None,
    promote: bool = False,
) -> BatchReport:
    """Replay into a new version built on ``base`` ("live", "none" or a version number).

    ``amortizer``: any ``Settings.amortizer`` spec, registry versions included."""
    settings = settings or Settings()
    if amortizer:
        settings = settings.model_copy(update={"amortizer": amortizer})
    memory = Memory(settings)
    memory.recover()
    if archive:
        records = archive_records(Path(archive))
    else:
        records = read_range(settings, settings.topic, start, end, start_ts_ms, end_ts_ms)
    if base == "live":
        parent = memory.registry.live()
    elif base == "none":
        parent = None
    elif base.isdigit():
        parent = memory.resolve(int(base))
    else:
        raise ValueError(f"base must be 'live', 'none' or a version number, not {base!r}")
    report = process_batch(
        settings, memory, records, parent=parent, kind="backfill", make_live=promote
    )
    after_batch(settings, memory, report)
    get_run_logger().info(
        "backfill: %d records on base %s -> version %s%s",
        len(records),
        parent,
        report.version,
        " (live)" if promote and report.version else "",
    )
    return report


@flow(name="promote")
def promote_flow(version: int, settings: Settings | None = None) -> int:
    """Make a published version live."""
    Memory(settings or Settings()).set_live(version)
    return version


@flow(name="rollback")
def rollback_flow(version: int, settings: Settings | None = None) -> int:
    """Point live back at an earlier published version. The versions after it stay readable."""
    Memory(settings or Settings()).rollback(version)
    return version
