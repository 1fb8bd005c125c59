"""End-to-end ingest throughput on CPU (docs/s), and where the time goes, stage by stage.

    .venv/bin/python bench/e2e.py --data /work/shared/data/squad_v1.1/documents.jsonl \
        --n 2000 --out bench/results/e2e-squad-2000.json

What it runs, all on the real parts (no mocks, see AGENTS.md):

1. a tansu broker of its own on a free loopback port (in-memory storage), under ``--home``;
2. N upsert events produced to a fresh topic with the real producer (``produce_file``), one per
   distinct ``doc_id`` of ``--data`` (a dev.jsonl-style file, where several question lines share
   one passage, is deduplicated by ``doc_id``; the first line of each doc wins);
3. the models loaded once and Prefect's local API started once, each timed on its own;
4. the real ingest flow, ``knowstream.flows.ingest.ingest_flow(settings, once=True)``: Kafka ->
   Beam (FnApiRunner) -> Qdrant local mode + MLflow on SQLite, with timers wrapped around its
   steps (consume, dedup lookup, Beam pipeline, publish and the parts of publish, commit);
5. each Beam stage's DoFn again, in isolation, over the very records the flow consumed
   (``setup()`` then ``process()``, batched as the pipeline batches them), to see which stage
   costs what;
6. a table on the terminal and the same figures as JSON (``--out``).

docs/s is N divided by the wall time of the ingest flow (step 4). Broker start, producing,
model loading and Prefect's API start are reported apart: they are one-off costs that a
long-running ``knowstream ingest`` pays once per process, not per document.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first, not the root; append,
    sys.path.append(str(ROOT))  # so that an installed knowstream stays first (bench/_common.py)

from bench._common import (  # noqa: E402
    StepTimer,
    console,
    cpu_seconds,
    free_port,
    instrumented,
    isolate_prefect,
    load_documents,
    run_header,
    timed_call,
    write_result,
)

if TYPE_CHECKING:
    from knowstream.connectors.kafka import KafkaRecord
    from knowstream.settings import Settings

# The triples stage batches with BatchElements(min_batch_size=16, max_batch_size=32); on a
# bounded input the FnApiRunner grows batches to the maximum quickly, so isolation uses 32.
TRIPLES_BATCH = 32


class ModelAsDoFn:
    """A stage's RunInference model handler, timed like a DoFn: loaded once, run per batch."""

    def __init__(self, handler) -> None:
        self.handler = handler

    def setup(self) -> None:
        self.model = self.handler.load_model()

    def process(self, batch: list) -> list:
        return self.handler.run_inference(batch, self.model)


VERSIONED_PACKAGES = (
    "torch",
    "apache-beam",
    "qdrant-client",
    "mlflow",
    "prefect",
    "spacy",
    "transformers",
    "kafka-python",
)


def bench_settings(home: Path) -> Settings:
    """Settings for a broker of our own on a free loopback port and a fresh memory under ``home``.

    As in ``tests/fixtures_broker.local_settings``, Kafka values are set explicitly so that
    ``KNOWSTREAM_*`` variables of the shell cannot point the benchmark at a real setup. The
    pipeline's knobs (chunk size, batch sizes, torch threads, amortizer) keep their defaults:
    those are what is being measured.
    """
    from knowstream.settings import Settings

    suffix = uuid.uuid4().hex[:8]
    return Settings(
        home=home,
        bootstrap_servers=f"127.0.0.1:{free_port()}",
        broker_storage="memory://tansu/",
        session_timeout_ms=6000,  # tansu joins take ~half of it
        poll_timeout_ms=1000,
        partitions=1,
        topic=f"bench-{suffix}",
        group_id=f"bench-{suffix}",
        qdrant_url=None,
        qdrant_path=None,
        mlflow_uri=None,
    )


# --- the pieces --------------------------------------------------------------------------------
@dataclass
class StageTiming:
    name: str
    seconds: float
    items_in: int
    items_out: int
    unit: str  # what items_in counts: records, docs, chunks
    cpu_s: float = 0.0  # process CPU seconds: less sensitive than wall time to other load
    setup_s: float = 0.0


@dataclass
class FlowRun:
    wall_s: float
    cpu_s: float
    steps: dict[str, float]
    steps_cpu: dict[str, float]
    calls: dict[str, int]
    batches: int
    versions: list[int | None]
    counters: dict[str, int]
    dead_letters: int
    records: list[KafkaRecord] = field(repr=False)


def load_models(settings: Settings) -> dict[str, float]:
    """Load every model the stages use, once per process, and time each load.

    Why first: the stages' ``setup()`` loads them through process-wide caches, so the flow
    that follows measures steady-state processing, as in a long-running ``knowstream ingest``
    after its first batch. The one-off load times are reported next to it.
    """
    from knowstream.flows.batch import model_versions
    from knowstream.models.encoder import load_encoder
    from knowstream.models.inference import load_amortizer
    from knowstream.pipelines.stages.triples import load_nlp

    loads = {}
    _, loads["encoder (MiniLM)"] = timed_call(load_encoder)
    _, loads["spaCy pipeline"] = timed_call(load_nlp)
    _, loads["amortizer (MAC)"] = timed_call(lambda: load_amortizer(settings.amortizer))
    _, loads["model versions (weights hash)"] = timed_call(lambda: model_versions(settings))
    return loads


def start_prefect() -> float:
    """Seconds for Prefect's first flow run, which starts its local API (~20 s, once)."""
    from prefect import flow

    @flow(name="bench-warm-up")
    def warm_up() -> None:
        return None

    _, seconds = timed_call(warm_up)
    return seconds


def run_flow(settings: Settings) -> FlowRun:
    """The real ingest flow over what is on the topic, with its steps timed."""
    import knowstream.flows.batch as batch_mod
    import knowstream.flows.ingest as ingest_mod
    import knowstream.memory as memory_mod
    from knowstream.connectors.kafka import BatchConsumer
    from knowstream.connectors.mlflow import Registry
    from knowstream.memory import Memory

    timer = StepTimer()
    records: list[KafkaRecord] = []
    poll_batch = BatchConsumer.poll_batch

    def keep_records(self: BatchConsumer, *args: Any, **kwargs: Any) -> list[KafkaRecord]:
        # The records the flow consumed, for the isolated stage runs: same bytes, same order.
        got = poll_batch(self, *args, **kwargs)
        records.extend(got)
        return got

    targets: list[tuple[object, str, str]] = [
        (BatchConsumer, "poll_batch", "consume"),
        (BatchConsumer, "commit", "commit offsets"),
        (batch_mod, "pipeline_task", "pipeline task"),
        (batch_mod, "model_versions", "pipeline: model versions"),
        (Memory, "known", "pipeline: dedup lookup"),
        (batch_mod, "run_batch", "pipeline: Beam run"),
        (batch_mod, "publish_task", "publish task"),
        (Memory, "publish", "Memory.publish"),
        (Registry, "reserve", "publish: reserve version"),
        (memory_mod, "write_version", "publish: write points"),
        (Memory, "_verify", "publish: verify"),
        (memory_mod, "delta_checksum", "publish: checksums"),
        (memory_mod, "_file_sha256", "publish: checksums"),
        (Registry, "log_artifacts", "publish: log artifacts"),
        (Registry, "publish", "publish: mark published"),
        (Registry, "set_live", "publish: set live"),
        (ingest_mod, "send_dead_letters", "send dead letters"),
    ]
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("ingest flow: starting", total=None)
        timer.on_enter = lambda step: progress.update(task, description=f"ingest flow: {step}")
        BatchConsumer.poll_batch = keep_records  # wrapped once more by the timer below
        try:
            with instrumented(timer, targets):
                cpu0 = cpu_seconds()
                reports, wall = timed_call(lambda: ingest_mod.ingest_flow(settings, once=True))
                cpu = cpu_seconds() - cpu0
        finally:
            BatchConsumer.poll_batch = poll_batch
    counters: dict[str, int] = defaultdict(int)
    for r in reports:
        for k, v in r.counters.items():
            counters[k] += v
    return FlowRun(
        wall_s=wall,
        cpu_s=cpu,
        steps=dict(timer.seconds),
        steps_cpu=dict(timer.cpu),
        calls=dict(timer.calls),
        batches=len(reports),
        versions=[r.version for r in reports],
        counters=dict(counters),
        dead_letters=sum(len(r.dead_letters) for r in reports),
        records=records,
    )


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_stages_isolated(settings: Settings, records: list[KafkaRecord]) -> list[StageTiming]:
    """Each Beam stage's DoFn or model handler, alone, over the records the flow consumed.

    Same classes, same arguments and the same batch sizes as ``pipelines/pipeline.py``; only
    Beam is left out (no runner, no bundles, no serialization between stages, no Parquet),
    so the sum of these against the flow's Beam run measures what Beam itself adds. Dedup runs
    with an empty ``known``, as on the flow's first batch into an empty memory.
    """
    import apache_beam as beam

    from knowstream.flows.batch import fingerprint, model_versions
    from knowstream.pipelines.stages.amortize import Amortize
    from knowstream.pipelines.stages.chunk import Chunk
    from knowstream.pipelines.stages.dedup import Dedup
    from knowstream.pipelines.stages.embed import Embed
    from knowstream.pipelines.stages.parse import Parse
    from knowstream.pipelines.stages.triples import Triples

    model = fingerprint(model_versions(settings))
    raw = [r.__dict__ for r in records]  # what pipeline_task hands to run_batch
    timings: list[StageTiming] = []

    columns = (
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:

        def stage(
            name: str,
            dofn: beam.DoFn | ModelAsDoFn,
            inputs: list[Any],
            unit: str,
            size: int | None = None,
        ) -> list[Any]:
            """Run ``dofn`` over ``inputs`` (one by one, or in lists of ``size``); outputs."""
            task = progress.add_task(name, total=len(inputs), unit=unit)
            _, setup_s = timed_call(dofn.setup)
            out: list[Any] = []
            start, cpu_start = time.perf_counter(), time.process_time()
            if size is None:
                for item in inputs:
                    out.extend(dofn.process(item))
                    progress.advance(task)
            else:
                for group in batches(inputs, size):
                    out.extend(dofn.process(group))
                    progress.advance(task, len(group))
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            timings.append(StageTiming(name, seconds, len(inputs), len(out), unit, cpu, setup_s))
            return out

        parsed = stage("parse", Parse(settings.max_text_chars), raw, "records")
        events = [e for e in parsed if not isinstance(e, beam.pvalue.TaggedOutput)]
        by_doc: dict[str, list[dict]] = defaultdict(list)
        for e in events:
            by_doc[e["event"].doc_id].append(e)
        decided = stage("dedup", Dedup({}, model), list(by_doc.items()), "docs")
        changes = [c for c in decided if not isinstance(c, beam.pvalue.TaggedOutput)]
        upserts = [c for c in changes if c["event"].op == "upsert"]
        chunked = stage(
            "chunk", Chunk(settings.chunk_tokens, settings.chunk_overlap, model), upserts, "docs"
        )
        chunks = [c for d in chunked for c in d["chunks"]]
        embed = ModelAsDoFn(Embed(settings.torch_threads))
        stage("embed", embed, chunks, "chunks", settings.embed_batch)
        stage("triples", ModelAsDoFn(Triples()), chunked, "docs", TRIPLES_BATCH)
        amortize = ModelAsDoFn(Amortize.from_settings(settings))
        stage("amortize", amortize, upserts, "docs", settings.amortize_batch)
    return timings


def produce(settings: Settings, docs: list[dict[str, Any]]) -> float:
    """Send ``docs`` to the topic with the real producer; seconds."""
    from knowstream.connectors.kafka import produce_file

    path = settings.home / "events.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with Progress(
        TextColumn("produce   "), BarColumn(), MofNCompleteColumn(), console=console
    ) as progress:
        task = progress.add_task("produce", total=len(docs))
        sent, seconds = timed_call(
            lambda: produce_file(settings, path, lambda n: progress.update(task, completed=n))
        )
    if sent != len(docs):
        raise RuntimeError(f"produced {sent} messages, expected {len(docs)}")
    return seconds


# --- report ------------------------------------------------------------------------------------
# The flow's steps as a two-level tree: (parent step, its child steps), in the order the flow
# runs them. Children add up to a little less than their parent; the remainder is shown as an
# "other" row under it, so that every row of the table is a measured or derived time.
FLOW_TREE: list[tuple[str, list[str]]] = [
    ("consume", []),
    ("pipeline task", ["pipeline: model versions", "pipeline: dedup lookup", "pipeline: Beam run"]),
    ("publish task", ["Memory.publish"]),  # Memory.publish's parts are PUBLISH_PARTS
    ("commit offsets", []),
    ("send dead letters", []),
]
PUBLISH_PARTS = [
    "publish: reserve version",
    "publish: write points",
    "publish: verify",
    "publish: checksums",
    "publish: log artifacts",
    "publish: mark published",
    "publish: set live",
]


def flow_rows(steps: dict[str, float], total: float) -> list[tuple[str, float]]:
    """(label, seconds) rows of the flow breakdown, indented, with "other" remainders.

    ``steps`` and ``total`` are wall seconds, or CPU seconds: the labels come out the same.
    """
    rows: list[tuple[str, float]] = []
    for parent, children in FLOW_TREE:
        if parent not in steps:
            continue
        rows.append((parent, steps[parent]))
        for child in children:
            if child in steps:
                rows.append((f"  {child.split(': ', 1)[-1]}", steps[child]))
            if child == "Memory.publish":
                for part in PUBLISH_PARTS:
                    if part in steps:
                        rows.append((f"    {part.split(': ', 1)[1]}", steps[part]))
                rest = steps.get(child, 0.0) - sum(steps.get(p, 0.0) for p in PUBLISH_PARTS)
                rows.append(("    other (lock, lineage, counts, manifest)", rest))
        if children:
            rest = steps[parent] - sum(steps.get(c, 0.0) for c in children)
            rows.append(("  other (Prefect task run)", rest))
    top = sum(steps.get(p, 0.0) for p, _ in FLOW_TREE)
    rows.append(("other (Prefect flow run, recover, topics, consumer close)", total - top))
    return rows


def flow_table_rows(flow: FlowRun) -> list[tuple[str, float, float]]:
    """(label, wall seconds, CPU seconds) of the flow breakdown."""
    wall = flow_rows(flow.steps, flow.wall_s)
    cpu = flow_rows(flow.steps_cpu, flow.cpu_s)
    return [(label, w, c) for (label, w), (_, c) in zip(wall, cpu, strict=True)]


def render(result: dict[str, Any], flow: FlowRun, stages: list[StageTiming]) -> None:
    n = result["docs"]
    one_off = Table(title="one-off costs (not in docs/s)", title_justify="left")
    one_off.add_column("step")
    one_off.add_column("seconds", justify="right")
    for name, s in result["one_off_s"].items():
        one_off.add_row(name, f"{s:.2f}")
    console.print(one_off)

    table = Table(
        title=f"ingest flow: {n} docs in {flow.wall_s:.1f} s = {n / flow.wall_s:.2f} docs/s "
        f"(process CPU {flow.cpu_s:.0f} s = {flow.cpu_s / flow.wall_s:.2f} cores busy)",
        title_justify="left",
    )
    table.add_column("step")
    table.add_column("wall s", justify="right")
    table.add_column("share", justify="right")
    table.add_column("ms/doc", justify="right")
    table.add_column("CPU s", justify="right")
    for label, wall, cpu in flow_table_rows(flow):
        share = f"{wall / flow.wall_s:.1%}"
        table.add_row(label, f"{wall:.2f}", share, f"{1000 * wall / n:.2f}", f"{cpu:.2f}")
    table.add_row(
        "ingest flow",
        f"{flow.wall_s:.2f}",
        "100%",
        f"{1000 * flow.wall_s / n:.2f}",
        f"{flow.cpu_s:.2f}",
    )
    console.print(table)

    beam_s = flow.steps.get("pipeline: Beam run", 0.0)
    beam_cpu = flow.steps_cpu.get("pipeline: Beam run", 0.0)
    total = sum(s.seconds for s in stages)
    total_cpu = sum(s.cpu_s for s in stages)
    iso = Table(
        title="Beam stages in isolation (same DoFns, same records, no runner)",
        title_justify="left",
    )
    iso.add_column("stage")
    iso.add_column("in → out", justify="right")
    iso.add_column("wall s", justify="right")
    iso.add_column("share of Σ", justify="right")
    iso.add_column("ms/doc", justify="right")
    iso.add_column("docs/s", justify="right")
    iso.add_column("CPU s", justify="right")
    for s in stages:
        iso.add_row(
            s.name,
            f"{s.items_in} {s.unit} → {s.items_out}",
            f"{s.seconds:.2f}",
            f"{s.seconds / total:.1%}",
            f"{1000 * s.seconds / n:.2f}",
            f"{n / s.seconds:.0f}" if s.seconds else "-",
            f"{s.cpu_s:.2f}",
        )
    for label, wall, cpu in (
        ("Σ stages", total, total_cpu),
        ("Beam run in the flow", beam_s, beam_cpu),
        ("Beam overhead + Parquet staging", beam_s - total, beam_cpu - total_cpu),
    ):
        iso.add_row(
            label,
            "",
            f"{wall:.2f}",
            "100%" if label == "Σ stages" else "",
            f"{1000 * wall / n:.2f}",
            f"{n / wall:.2f}" if label != "Beam overhead + Parquet staging" and wall else "",
            f"{cpu:.2f}",
        )
    console.print(iso)


# --- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="JSONL with doc_id, title, text")
    ap.add_argument("--n", type=int, default=2000, help="distinct documents to ingest")
    ap.add_argument("--home", type=Path, help="state folder, new or empty (default: fresh temp)")
    ap.add_argument("--keep", action="store_true", help="keep a temporary --home afterwards")
    ap.add_argument("--out", type=Path, help="JSON results (default: bench/results/e2e-<n>.json)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path(__file__).parent / "results" / f"e2e-{args.n}.json"
    temporary = args.home is None
    home = Path(tempfile.mkdtemp(prefix="knowstream-bench-")) if temporary else args.home
    if home.exists() and any(home.iterdir()):
        # A memory already there would dedup the documents away and measure nothing.
        console.print(f"[red]--home {home} is not empty; give a new or empty folder[/red]")
        return 2
    home.mkdir(parents=True, exist_ok=True)
    home = home.resolve()
    isolate_prefect(home)

    docs = load_documents(args.data, args.n)
    if not docs:
        console.print(f"[red]no documents in {args.data}[/red]")
        return 2
    if len(docs) < args.n:
        console.print(f"[yellow]{args.data} has {len(docs)} distinct documents, not {args.n}[/]")

    from knowstream.connectors.qdrant import close_clients
    from knowstream.infra.services import start_broker, stop_broker

    settings = bench_settings(home)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    one_off: dict[str, float] = {}
    try:
        with console.status("starting the tansu broker..."):
            _, one_off["broker start"] = timed_call(lambda: start_broker(settings))
        one_off["produce events"] = produce(settings, docs)
        with console.status("loading models..."):
            for name, s in load_models(settings).items():
                one_off[f"load {name}"] = s
        with console.status("starting Prefect's local API (first flow run)..."):
            one_off["Prefect API start"] = start_prefect()
        flow = run_flow(settings)
        stages = run_stages_isolated(settings, flow.records)
    finally:
        close_clients()
        stop_broker(settings)

    n = len(docs)
    if len(flow.records) != n:
        console.print(f"[yellow]the flow consumed {len(flow.records)} records, not {n}[/]")
    beam_s = flow.steps.get("pipeline: Beam run", 0.0)
    counters = flow.counters
    result: dict[str, Any] = {
        **run_header("e2e", started, load_before, VERSIONED_PACKAGES),
        "data": str(args.data),
        "docs": n,
        "settings": settings.model_dump(
            mode="json",
            include={
                "chunk_tokens",
                "chunk_overlap",
                "embed_batch",
                "amortize_batch",
                "amortize_device",
                "amortize_dtype",
                "amortize_window_batch",
                "torch_threads",
                "amortizer",
                "beam_args",
                "max_batch_messages",
                "poll_timeout_ms",
            },
        ),
        "counts": {
            "batches": flow.batches,
            "versions": flow.versions,
            "records": len(flow.records),
            "chunks": counters.get("chunk.chunks", 0),
            "embedded": counters.get("embed.chunks", 0),
            "triples": counters.get("triples.triples", 0),
            "modulations": counters.get("amortize.docs", 0),
            "dead_letters": flow.dead_letters,
        },
        "one_off_s": one_off,
        "flow": {
            "wall_s": flow.wall_s,
            "docs_per_s": n / flow.wall_s,
            "process_cpu_s": flow.cpu_s,
            "steps_s": flow.steps,
            "steps_cpu_s": flow.steps_cpu,
            "step_calls": flow.calls,
            "rows": [
                {
                    "step": label.strip(),
                    "depth": (len(label) - len(label.lstrip())) // 2,
                    "seconds": wall,
                    "cpu_s": cpu,
                }
                for label, wall, cpu in flow_table_rows(flow)
            ],
        },
        "stages_isolated": [asdict(s) for s in stages],
        "stages_isolated_total_s": sum(s.seconds for s in stages),
        "stages_isolated_total_cpu_s": sum(s.cpu_s for s in stages),
        "beam_overhead_s": beam_s - sum(s.seconds for s in stages),
    }
    render(result, flow, stages)
    write_result(out, result)
    if temporary and not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
