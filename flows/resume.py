"""A batch is published at most once: resuming one that was published but not committed.

Ingest publishes a batch, sends its dead letters, then commits its offsets. When a
step after the publish fails (or the worker dies there), the group redelivers the
batch. Its manifest already records it: the version's ``offsets`` and
``source_digest`` (``flows.batch.source_digest``). So before building a batch,
ingest looks for a published ingest version whose offset ranges start where the
polled records start and whose digest matches the records in those ranges. If one
is found, the batch resumes after its publish (make it live if the publish failed
just before that, send the dead letters stored with the version, commit) instead
of being built and published again.

The digest, not the offsets alone, decides: a broker that lost its data (memory://
restarted, topic recreated) hands out the same offsets for new records.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import get_run_logger

from knowstream.connectors.kafka import KafkaRecord
from knowstream.connectors.mlflow import VersionInfo
from knowstream.flows.batch import BatchReport, offset_ranges, source_digest, split_oversized
from knowstream.memory import Memory
from knowstream.schemas.staged import read_staged
from knowstream.settings import Settings


def published_batch(
    memory: Memory, records: list[KafkaRecord]
) -> tuple[VersionInfo, list[KafkaRecord]] | None:
    """The published ingest version built from a prefix of ``records``, and that prefix."""
    first: dict[tuple[str, int], int] = {}
    for r in records:
        tp = (r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
    for v in reversed(memory.registry.versions()):
        digest = v.tags.get("source_digest")
        if v.state != "published" or v.kind != "ingest" or not digest:
            continue
        ranges = json.loads(v.tags.get("offsets", "[]"))
        if not ranges or any(first.get((o["topic"], o["partition"])) != o["start"] for o in ranges):
            continue
        done = [
            r
            for r in records
            if any(
                (o["topic"], o["partition"]) == (r.topic, r.partition)
                and o["start"] <= r.offset < o["end"]
                for o in ranges
            )
        ]
        if source_digest(done) == digest:
            return v, done
    return None


def resume(
    settings: Settings, memory: Memory, records: list[KafkaRecord]
) -> tuple[BatchReport, list[KafkaRecord]] | None:
    """The report of the already published batch at the head of ``records`` and its
    records, ready for dead letters and commit; None when there is none."""
    found = published_batch(memory, records)
    if found is None:
        return None
    info, done = found
    log = get_run_logger()
    if not memory.finish_live(info.version, info.parent):
        # Another line became live meanwhile: this version's changes are not in
        # live, so the batch is built again on top of it.
        log.warning("version %d holds this batch but is off the live line", info.version)
        return None
    letters = split_oversized(settings, done)[1] + stored_dead_letters(memory, info.version)
    log.info("resuming the batch of version %d after its publish", info.version)
    counters = {"ingest.resumed": 1}
    return BatchReport(len(done), info.version, offset_ranges(done), counters, letters), done


def stored_dead_letters(memory: Memory, version: int) -> list[dict]:
    """The dead letters staged with ``version`` (its artifacts)."""
    with tempfile.TemporaryDirectory() as tmp:
        files = memory.registry.download_snapshot_files(version, "dead_letters-", Path(tmp))
        return read_staged(files[0].parent).dead_letters if files else []
