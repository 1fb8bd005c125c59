"""One micro-batch, shared by ingest and backfill: pipeline -> publish.

Each step is a Prefect task, so the Prefect UI and logs show "pipeline" and
"publish" with their durations and failures. Inputs are records in memory, not
cacheable values: caching is off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import opaque

from knowstream.connectors import staging as staging_store
from knowstream.connectors.kafka import KafkaRecord
from knowstream.connectors.mlflow._registry import ResolvedAmortizer, resolve_amortizer
from knowstream.memory import Memory, StaleParent
from knowstream.models.chunking import CHUNKER_VERSION
from knowstream.models.inference import amortizer_version
from knowstream.pipelines.pipeline import run_batch
from knowstream.pipelines.stages.triples import TRIPLES_VERSION
from knowstream.schemas.event import dead_letter
from knowstream.schemas.manifest import OffsetRange
from knowstream.settings import Settings

log = logging.getLogger(__name__)  # also on the flow run's page (PREFECT_LOGGING_EXTRA_LOGGERS)


@dataclass
class BatchReport:
    messages: int
    version: int | None  # None: nothing changed, no version published
    offsets: list[OffsetRange]
    counters: dict[str, int] = field(default_factory=dict)
    dead_letters: list[dict] = field(default_factory=list)
    kind: str = "ingest"
    # pipeline, publish, batch; ingest adds queued: the oldest record's wait for the batch (s)
    durations: dict[str, float] = field(default_factory=dict)
    lag: dict[int, int] = field(default_factory=dict)  # partition -> records behind, after it


# Where the amortizer came from (registry name and version): recorded in the manifest,
# but not part of the fingerprint, which the weights hash ("amortizer") already covers.
PROVENANCE = ("amortizer_model", "amortizer_model_version")


def model_versions(
    settings: Settings, amortizer: ResolvedAmortizer | None = None
) -> dict[str, str]:
    """Versions of everything that derives data from a document; recorded per snapshot.

    ``amortizer`` is the batch's resolved amortizer spec (resolved here if not given).
    """
    from knowstream.models.encoder import encoder_version

    amortizer = amortizer or resolve_amortizer(settings)
    versions = {
        "embedder": encoder_version(),
        "amortizer": amortizer_version(amortizer.path),
        "chunker": f"{CHUNKER_VERSION}:{settings.chunk_tokens}/{settings.chunk_overlap}",
        "triples": TRIPLES_VERSION,
    }
    if settings.amortize_dtype != "float32":  # entries differ slightly: rebuild on a change
        versions["amortize_dtype"] = settings.amortize_dtype
    if amortizer.name is not None:
        versions["amortizer_model"] = amortizer.name
        versions["amortizer_model_version"] = str(amortizer.version)
    return versions


def fingerprint(versions: dict[str, str]) -> str:
    """Dedup key part: a doc built by other models or settings is rebuilt."""
    versions = {k: v for k, v in versions.items() if k not in PROVENANCE}
    return hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:16]


def offset_ranges(records: list[KafkaRecord]) -> list[OffsetRange]:
    spans: dict[tuple[str, int], list[int]] = {}
    for r in records:
        spans.setdefault((r.topic, r.partition), []).append(r.offset)
    return [
        OffsetRange(topic, partition, min(offs), max(offs) + 1)
        for (topic, partition), offs in sorted(spans.items())
    ]


def source_digest(records: list[KafkaRecord]) -> str:
    """sha256 over the records' coordinates, timestamps, keys and values: what a
    manifest records so that a redelivery of the same batch is recognised (and new
    records at reused offsets, after a topic was recreated, are not)."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        key, value = (b if b is None else hashlib.sha256(b).hexdigest() for b in (r.key, r.value))
        h.update(json.dumps([r.topic, r.partition, r.offset, r.timestamp_ms, key, value]).encode())
    return h.hexdigest()


def split_oversized(
    settings: Settings, records: list[KafkaRecord]
) -> tuple[list[KafkaRecord], list[dict]]:
    """Records small enough to parse, and dead letters for the others: a message over
    ``settings.max_message_bytes`` cannot be a valid event, and never enters Beam."""
    keep, letters = [], []
    for r in records:
        size = len(r.key or b"") + len(r.value or b"")
        if size <= settings.max_message_bytes:
            keep.append(r)
            continue
        letters.append(
            dead_letter(
                {"topic": r.topic, "partition": r.partition, "offset": r.offset},
                stage="parse",
                error="InvalidEvent",
                reason="too_large",
                detail=f"message is {size} bytes, over max_message_bytes "
                f"{settings.max_message_bytes}: not parsed",
                key=r.key,
                value=r.value,
            )
        )
    return keep, letters


def _doc_id_hint(record: KafkaRecord) -> str | None:
    """The doc id a record is about, for looking up its current state; parse validates."""
    if record.key:
        try:
            return record.key.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        obj = json.loads(record.value or b"")
        return (
            obj.get("doc_id")
            if isinstance(obj, dict) and isinstance(obj.get("doc_id"), str)
            else None
        )
    except ValueError:
        return None


@task(name="pipeline", cache_policy=NO_CACHE)
def pipeline_task(
    settings: Settings, memory: Memory, records: list[KafkaRecord], parent: int | None
):
    # Pin the amortizer once for the whole batch (an alias may move meanwhile); the
    # pipeline gets the local checkpoint folder, so its workers never read the registry
    # (with staging on a URL, run_batch shares the folder there for workers elsewhere).
    amortizer = resolve_amortizer(settings)
    settings = settings.model_copy(update={"amortizer": amortizer.path})
    versions = model_versions(settings, amortizer)
    doc_ids = sorted({d for d in map(_doc_id_hint, records) if d})
    known = memory.known(parent, doc_ids)
    staging = staging_store.batch_url(settings)
    result = run_batch(
        settings,
        [r.__dict__ for r in records],
        known=known,
        model=fingerprint(versions),
        staging=staging,
    )
    log.info(
        "pipeline: %d messages -> %d upserts, %d deletes, %d dead letters; %s",
        len(records),
        result.staged.upserts,
        result.staged.deletes,
        len(result.staged.dead_letters),
        result.counters,
    )
    return result, versions, staging


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(memory: Memory, result, versions, *, parent, kind, offsets, make_live, digest):
    info = memory.publish(
        result.staged,
        parent=parent,
        kind=kind,
        offsets=offsets,
        model_versions=versions,
        make_live=make_live,
        require_live_parent=kind == "ingest",
        source_digest=digest,
    )
    log.info("published memory version %d (parent %s)", info.version, parent)
    return info.version


def process_batch(
    settings: Settings,
    memory: Memory,
    records: list[KafkaRecord],
    *,
    parent: int | None,
    kind: str,
    make_live: bool,
) -> BatchReport:
    """Pipeline, then publish if anything changed. Raises if either fails."""
    started = time.perf_counter()
    parsable, too_large = split_oversized(settings, records)
    result, versions, staging = pipeline_task(settings, memory, parsable, parent)
    result.staged.dead_letters.extend(too_large)
    durations = {"pipeline": time.perf_counter() - started}
    offsets = offset_ranges(records)
    version = None
    if result.staged.changes:
        try:
            # opaque: Prefect would otherwise walk every row of the batch looking for
            # upstream futures (13-18 s of CPU for 2,000 docs).
            publishing = time.perf_counter()
            version = publish_task(
                memory,
                opaque(result),
                versions,
                parent=parent,
                kind=kind,
                offsets=offsets,
                make_live=make_live,
                digest=source_digest(records),
            )
            durations["publish"] = time.perf_counter() - publishing
        except StaleParent:
            # Not a failure to inspect: the caller rebuilds the batch on the new live.
            staging_store.remove(settings, staging)
            raise
    staging_store.remove(settings, staging)  # kept only when a step failed
    durations["batch"] = time.perf_counter() - started
    return BatchReport(
        len(records),
        version,
        offsets,
        result.counters,
        result.staged.dead_letters,
        kind=kind,
        durations=durations,
    )
