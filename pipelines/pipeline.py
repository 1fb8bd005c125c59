"""The Beam pipeline of one micro-batch, stage by stage.

    records ──parse──► events ──dedup──► changes ─┬─ upserts ──chunk──► chunked docs
       │                                          │                ├──embed────► chunks
       └─► dead letters                           │                └──triples──► triples
                                                  │   upserts ──amortize──────► modulations
                                                  └─ deletes ─────────────────► doc rows
           a document that makes chunk, embed, triples or amortize raise ──► dead letters,
           and its other rows are dropped (``pipelines/faults.py``)
                                                          all of it ──stage──► Parquet

It is a bounded pipeline: the ingest flow reads a micro-batch from Kafka
(until an empty poll), runs this, publishes, and only then commits offsets.
Runs in-process on Beam's FnApiRunner by default; any runner named with
``--runner`` in ``Settings.beam_args`` runs the same graph, since every stage is a
DoFn or a RunInference model handler whose models load once per worker, and the
delta goes to a staging URL (``Settings.staging``: a folder, or ``s3://`` for
workers on other machines). Run here: FnApiRunner in-process and
``--direct_running_mode=multi_processing``, and PortableRunner on Beam's Python job
service with EXTERNAL workers (``knowstream up --beam``); see the README for Flink
and Dataflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.portability.api import beam_job_api_pb2, beam_provision_api_pb2
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.runners.portability.fn_api_runner.fn_runner import ExtendedProvisionInfo
from apache_beam.runners.portability.portable_runner import PipelineResult as PortableResult

from knowstream.connectors import staging as staging_store
from knowstream.pipelines.checkpoints import share_checkpoint
from knowstream.pipelines.faults import Isolated, drop_failed, failure
from knowstream.pipelines.stages.amortize import Amortize
from knowstream.pipelines.stages.chunk import Chunk
from knowstream.pipelines.stages.dedup import SKIPPED, Dedup
from knowstream.pipelines.stages.embed import Embed
from knowstream.pipelines.stages.parse import DEAD_LETTERS, Parse
from knowstream.pipelines.stages.stage import WriteStaged, doc_row
from knowstream.pipelines.stages.triples import Triples
from knowstream.schemas.staged import StagedBatch, read_staged
from knowstream.settings import Settings


class PipelineFailed(RuntimeError):
    """The Beam job failed on its workers; the message carries their traceback."""


@dataclass(frozen=True)
class BatchResult:
    staged: StagedBatch
    counters: dict[str, int]  # "<stage>.<counter>" -> count
    # Milliseconds each top-level transform ("parse", "embed", "stage", ...) spent
    # executing, summed over its parts and workers, from the runner's execution-time metrics
    # (FnApiRunner reports them; empty for a runner that does not).
    stage_ms: dict[str, int] = field(default_factory=dict)
    # Milliseconds inside each RunInference model's ``run_inference`` ("embed", "triples",
    # "amortize"), from Beam's inference metrics (batched and one-at-a-time calls).
    inference_ms: dict[str, float] = field(default_factory=dict)


EXECUTION_TIME = "metric:ptransform_execution_time:total_msecs:v1"  # Beam's system metric
INFERENCE_LATENCY = "inference_batch_latency_micro_secs"  # RunInference's, per batch


def _timings(result) -> tuple[dict[str, int], dict[str, float]]:
    """(``stage_ms``, ``inference_ms``) of a finished pipeline result (see BatchResult)."""
    stage_ms: dict[str, int] = {}
    monitoring = getattr(result, "monitoring_metrics", None)  # FnApiRunner's RunnerResult
    if monitoring is not None:
        for c in monitoring().query()["counters"]:
            if c.key.metric.name == EXECUTION_TIME and c.key.step:
                top = c.key.step.split("/", 1)[0]
                stage_ms[top] = stage_ms.get(top, 0) + int(c.committed or 0)
    inference_ms: dict[str, float] = {}
    for d in result.metrics().query()["distributions"]:
        if d.key.metric.name == INFERENCE_LATENCY and d.committed is not None:
            ns = d.key.metric.namespace
            inference_ms[ns] = inference_ms.get(ns, 0.0) + d.committed.sum / 1000
    return stage_ms, inference_ms


def _doc_id_of(sourced: dict) -> tuple[str, dict]:
    return sourced["event"].doc_id, sourced


def build(
    p: beam.Pipeline,
    records: list[dict],
    *,
    settings: Settings,
    known: dict[str, dict],
    model: str,
    staging: str,
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

    fail = settings.failpoints
    chunked, chunk_failed = (
        upserts
        | "chunk"
        >> beam.ParDo(
            Chunk(settings.chunk_tokens, settings.chunk_overlap, model, fail.get("chunk", ()))
        ).with_exception_handling()
    )  # {"doc": DOC row, "text", "published_at", "chunks": [...]}
    chunk_failures = chunk_failed | "chunk failures" >> beam.Map(
        lambda bad: failure("chunk", bad[0]["event"].doc_id, bad[1])
    )

    chunks, embed_failures = (
        chunked
        | "flatten chunks" >> beam.FlatMap(lambda d: d["chunks"])
        | "embed"
        >> Isolated(
            Embed(
                settings.torch_threads,
                settings.embed_batch,
                fail.get("embed", ()),
                settings.embed_device,
            )
        )
    )  # CHUNK rows with "embedding"

    triples, triples_failures = chunked | "triples" >> Isolated(
        Triples(fail=fail.get("triples", ()))
    )  # TRIPLE rows

    modulations, amortize_failures = upserts | "amortize" >> Isolated(
        Amortize.from_settings(settings)
    )  # MODULATION rows, one float16 entry each

    docs = (
        chunked | "upsert rows" >> beam.Map(lambda d: d["doc"]),
        deletes | "delete rows" >> beam.Map(doc_row, model, 0),
    ) | "all doc rows" >> beam.Flatten()  # DOC rows

    # A document that failed in any stage: one dead letter, and none of its rows staged.
    sources = upserts | "sources" >> beam.Map(
        lambda s: (s["event"].doc_id, {k: s[k] for k in ("topic", "partition", "offset")})
    )
    failures = (
        chunk_failures,
        embed_failures,
        triples_failures,
        amortize_failures,
    ) | "all failures" >> beam.Flatten()  # (doc_id, failure)
    staged = drop_failed(
        failures,
        sources,
        raw,
        {"docs": docs, "chunks": chunks, "triples": triples, "modulations": modulations},
    )
    dead_letters = (
        parsed[DEAD_LETTERS],
        staged.pop("dead_letters"),
    ) | "all dead letters" >> beam.Flatten()
    _ = {**staged, "dead_letters": dead_letters} | "stage" >> WriteStaged(staging)


def _fn_api_runner(options: PipelineOptions) -> FnApiRunner | None:
    """An FnApiRunner whose workers get the pipeline options; None for other runners.

    FnApiRunner provisions its worker processes (``multi_processing``) with no pipeline
    options, so Beam's S3 filesystem there would miss the staging endpoint and region;
    a job service hands them over, and so does this.
    """
    if options.view_as(StandardOptions).runner != "FnApiRunner":
        return None
    info = beam_provision_api_pb2.ProvisionInfo(retrieval_token="unused-retrieval-token")
    # Text options only: a protobuf Struct turns ints into floats ("2.0"), which the
    # worker's option parser rejects; the S3 ones are all text.
    given = options.get_all_options(drop_default=True)
    info.pipeline_options.update({k: v for k, v in given.items() if isinstance(v, str)})
    return FnApiRunner(provision_info=ExtendedProvisionInfo(info))


def _job_errors(result: PortableResult, error: Exception) -> str:
    """The client's error plus the job's error messages.

    A job service reports a failure to its client as "Error running pipeline."; the
    workers' traceback is an earlier error message of the job's message stream (and in
    the job service's log). Ingest's health record and ``status`` show this text.
    """
    errors = [
        m.message_response.message_text
        for m in result._messages  # the stream wait_until_finish read; Beam keeps it here
        if m.HasField("message_response")
        and m.message_response.importance == beam_job_api_pb2.JobMessage.JOB_MESSAGE_ERROR
    ]
    return "\n".join([str(error), *errors])


def run_batch(
    settings: Settings,
    records: list[dict],
    *,
    known: dict[str, dict],
    model: str,
    staging: str,
) -> BatchResult:
    """Run the pipeline over one micro-batch; the delta lands at the ``staging`` URL
    (a folder or ``s3://...``) and is read back from there. With staging on a URL, an
    amortizer checkpoint folder is shared under it first and the stage loads that copy
    (``pipelines/checkpoints.py``): workers on other machines cannot see the folder."""
    options = PipelineOptions([*settings.beam_args, *staging_store.beam_options(settings)])
    shared = share_checkpoint(settings.amortizer, settings.staging_url, options)
    if shared != settings.amortizer:
        settings = settings.model_copy(update={"amortizer": shared})
    p = beam.Pipeline(runner=_fn_api_runner(options), options=options)
    build(p, records, settings=settings, known=known, model=model, staging=staging)
    result = p.run()
    try:
        result.wait_until_finish()
    except Exception as e:
        if isinstance(result, PortableResult):
            raise PipelineFailed(_job_errors(result, e)) from e
        raise
    counters: dict[str, int] = {}
    for c in result.metrics().query()["counters"]:  # summed over the steps that share a name
        name = f"{c.key.metric.namespace}.{c.key.metric.name}"
        counters[name] = counters.get(name, 0) + int(c.committed or 0)
    stage_ms, inference_ms = _timings(result)
    return BatchResult(
        read_staged(staging_store.local_copy(settings, staging)), counters, stage_ms, inference_ms
    )
