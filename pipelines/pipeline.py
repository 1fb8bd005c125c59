"""The Beam pipeline of one micro-batch, stage by stage.

    records ──parse──► events ──dedup──► changes ─┬─ upserts ──chunk──► chunked docs
       │                                          │                ├──embed────► chunks
       └─► dead letters                           │                └──triples──► triples
                                                  │   upserts ──amortize──────► modulations
                                                  └─ deletes ─────────────────► doc rows
                                                          all of it ──stage──► Parquet

It is a bounded pipeline: the ingest flow reads a micro-batch from Kafka
(until an empty poll), runs this, publishes, and only then commits offsets.
Runs in-process on Beam's FnApiRunner by default; any runner named with
``--runner`` in ``Settings.beam_args`` (Flink, Spark, Dataflow) runs the same
graph, since every stage is a plain DoFn whose models load in ``setup()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from knowstream.pipelines.stages.amortize import Amortize
from knowstream.pipelines.stages.chunk import Chunk
from knowstream.pipelines.stages.dedup import SKIPPED, Dedup
from knowstream.pipelines.stages.embed import Embed
from knowstream.pipelines.stages.parse import DEAD_LETTERS, Parse
from knowstream.pipelines.stages.stage import WriteStaged, doc_row
from knowstream.pipelines.stages.triples import Triples
from knowstream.schemas.staged import StagedBatch, read_staged
from knowstream.settings import Settings


@dataclass(frozen=True)
class BatchResult:
    staged: StagedBatch
    counters: dict[str, int]  # "<stage>.<counter>" -> count


def _doc_id_of(sourced: dict) -> tuple[str, dict]:
    return sourced["event"].doc_id, sourced


def build(
    p: beam.Pipeline,
    records: list[dict],
    *,
    settings: Settings,
    known: dict[str, dict],
    model: str,
    staging: Path,
) -> None:
    raw = p | "read" >> beam.Create(records)  # {"topic","partition","offset","key","value"}

    parsed = raw | "parse" >> beam.ParDo(Parse(settings.max_text_chars)).with_outputs(
        DEAD_LETTERS, main="events"
    )  # {"event": DocumentEvent, "topic","partition","offset"} | dead letters

    deduped = (
        parsed.events
        | "key by doc" >> beam.Map(_doc_id_of)  # (doc_id, sourced event)
        | "group by doc" >> beam.GroupByKey()  # (doc_id, [sourced events])
        | "dedup" >> beam.ParDo(Dedup(known, model)).with_outputs(SKIPPED, main="changes")
    )  # one winning sourced event per changed doc

    upserts = deduped.changes | "upserts" >> beam.Filter(lambda s: s["event"].op == "upsert")
    deletes = deduped.changes | "deletes" >> beam.Filter(lambda s: s["event"].op == "delete")

    chunked = upserts | "chunk" >> beam.ParDo(
        Chunk(settings.chunk_tokens, settings.chunk_overlap, model)
    )  # {"doc": DOC row, "text", "published_at", "chunks": [chunk dicts without embedding]}

    chunks = (
        chunked
        | "flatten chunks" >> beam.FlatMap(lambda d: d["chunks"])
        | "batch chunks"
        >> beam.BatchElements(
            min_batch_size=settings.embed_batch, max_batch_size=settings.embed_batch
        )
        | "embed" >> beam.ParDo(Embed(settings.torch_threads))
    )  # CHUNK rows with "embedding"

    triples = (
        chunked
        | "batch for triples" >> beam.BatchElements(min_batch_size=16, max_batch_size=32)
        | "triples" >> beam.ParDo(Triples())
    )  # TRIPLE rows

    modulations = (
        upserts
        | "batch for amortize"
        >> beam.BatchElements(
            min_batch_size=settings.amortize_batch, max_batch_size=settings.amortize_batch
        )
        | "amortize" >> beam.ParDo(Amortize.from_settings(settings))
    )  # MODULATION rows, (T, d_lm) float16 each

    docs = (
        chunked | "upsert rows" >> beam.Map(lambda d: d["doc"]),
        deletes | "delete rows" >> beam.Map(doc_row, model, 0),
    ) | "all doc rows" >> beam.Flatten()  # DOC rows

    for name, pcoll in (
        ("docs", docs),
        ("chunks", chunks),
        ("triples", triples),
        ("modulations", modulations),
        ("dead_letters", parsed[DEAD_LETTERS]),
    ):
        _ = pcoll | f"stage {name}" >> WriteStaged(staging, name)


def run_batch(
    settings: Settings,
    records: list[dict],
    *,
    known: dict[str, dict],
    model: str,
    staging: Path,
) -> BatchResult:
    """Run the pipeline over one micro-batch; the delta lands in ``staging``."""
    staging.mkdir(parents=True, exist_ok=True)
    p = beam.Pipeline(options=PipelineOptions(settings.beam_args))
    build(p, records, settings=settings, known=known, model=model, staging=staging)
    result = p.run()
    result.wait_until_finish()
    counters = {
        f"{c.key.metric.namespace}.{c.key.metric.name}": int(c.committed or 0)
        for c in result.metrics().query()["counters"]
    }
    return BatchResult(read_staged(staging), counters)
