"""Publish cost against memory size: a 100-doc batch into memories of 1k and 10k documents.

    .venv/bin/python bench/publish.py --sizes 1000,10000 --batch 100 --repeats 3 \
        --out bench/results/publish-1k-10k.json

The claim under test (``knowstream/connectors/qdrant/_client.py``): publishing writes the batch's
points and closes the points they replace, so it costs O(batch), not O(memory); rollback moves
the ``live`` alias, O(1). If that holds, the figures for 1k and 10k should be about equal.

How, on the real parts (Qdrant local mode by default, MLflow on SQLite, no broker, no Beam):

1. Memories are grown cheaply with synthetic but realistically shaped batches: rows exactly as
   the pipeline stages them (``StagedBatch`` read back from Parquet with the stage schemas),
   random L2-normalized 384-d embeddings, (16, 576) float16 modulations, SQuAD-like counts of
   chunks and triples per document and chunk texts of SQuAD-like length. They are published
   with ``Memory.publish`` in versions of ``--build-batch`` documents (1000 by default), each
   on top of the previous one, as the ingest flow would. Each of those publishes is timed too:
   a second view of the same question, at a larger batch.
2. At each size, ``--repeats`` times: a ``--batch``-document batch, half replacing documents the
   memory holds and half new, published on top of the size's version (so each repeat sees the
   same memory), with the parts of ``publish`` timed; then ``set_live`` back to the size's
   version (a rollback); then the dedup lookup of the ingest flow (``Memory.known``) for a
   batch's ids, and a point-in-time search at the size's version and at version 1.
3. Medians over repeats, a table on the terminal and JSON in ``--out``.

Qdrant local mode has no payload indexes: every filtered read (the lookups inside publish, the
dedup lookup, filtered search) scans all points of the collection in Python. Those reads are
O(memory) there, whatever the data model promises; the parts table shows which ones they are.
Pass ``--qdrant-url`` to measure a Qdrant server (with the payload indexes) instead.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first, not the root; append,
    sys.path.append(str(ROOT))  # so that an installed knowstream stays first (bench/_common.py)

from bench._common import (  # noqa: E402
    StepTimer,
    console,
    instrumented,
    percentile,
    run_header,
    timed_call,
    write_result,
    written_bytes,
)

if TYPE_CHECKING:
    from knowstream.memory import Memory
    from knowstream.schemas.staged import StagedBatch
    from knowstream.settings import Settings

# Shapes of what the pipeline stages, from the defaults (MACConfig, all-MiniLM-L6-v2).
DIM = 384  # embedding width
MOD_SHAPE = (16, 576)  # (T, d_lm) of a memory entry, stored as float16
# Per-document counts and sizes measured on the first 2,000 SQuAD v1.1 passages with the
# default chunker (128-token chunks, overlap 32) and the triples stage (bench/e2e.py run in
# BENCHMARKS.md): 1 chunk for 36% of passages, 2 for 48%, 3 for 12%, 4 or more for 4% (1.86 per
# passage); 10.1 triples per passage; 484 characters per chunk. Payload size is what makes
# local-mode writes and scans cost what they cost, so the synthetic rows follow these.
CHUNKS_PER_DOC = ([1, 2, 3, 4], [0.36, 0.48, 0.12, 0.04])  # choices, probabilities: mean 1.84
TRIPLES_PER_DOC = (5, 16)  # uniform integers in [5, 16): mean 10
CHUNK_CHARS = 484
WORDS = (
    "the of and in to was is for on as by with from at that his an were which are this be "
    "first city its also has had their century new university state war government river "
    "first during other time between after most american such system known population "
    "french british national early called world some into would large than team season "
    "school church power years period empire film age energy number series region east "
    "million group law court part including about west north south general history"
).split()
VERSIONED_PACKAGES = (
    "torch",
    "apache-beam",
    "qdrant-client",
    "qdrant-edge-py",
    "mlflow",
    "pyarrow",
)
PUBLISH_PARTS = [
    "reserve version",
    "write points",
    "verify",
    "checksums",
    "log artifacts",
    "mark published",
    "set live",
]
# Inside those parts, the store calls (either backend): filtered scroll pages are scans in
# qdrant-client's local mode and index lookups in qdrant-edge; in local mode upserts and
# set_payload persist each point (one SQLite transaction per point).
QDRANT_CALLS = ["qdrant scroll", "qdrant upsert", "qdrant set_payload"]
ASK_QUESTIONS = 40  # /ask (evidence mode) calls timed at each size (default of --ask)
# The parts of publish that touch only MLflow (its SQLite store), never Qdrant.
MLFLOW_PARTS = ["reserve version", "mark published", "set live"]


def publish_parts() -> list[tuple[object, str, str]]:
    import knowstream.memory as memory_mod
    from knowstream.connectors.mlflow import Registry
    from knowstream.connectors.qdrant._edge import EdgeStore
    from knowstream.connectors.qdrant._server import ClientStore
    from knowstream.memory import Memory

    return [
        *((store, "_page", "qdrant scroll") for store in (EdgeStore, ClientStore)),
        *((store, "upsert", "qdrant upsert") for store in (EdgeStore, ClientStore)),
        *((store, "set_payload", "qdrant set_payload") for store in (EdgeStore, ClientStore)),
        (Registry, "reserve", "reserve version"),
        (memory_mod, "write_version", "write points"),
        (Memory, "_verify", "verify"),
        (memory_mod, "delta_checksum", "checksums"),
        (memory_mod, "_file_sha256", "checksums"),
        (Registry, "log_artifacts", "log artifacts"),
        (Registry, "publish", "mark published"),
        (Registry, "set_live", "set live"),
    ]


def ask_parts() -> list[tuple[object, str, str]]:
    from knowstream.connectors.qdrant import VersionView
    from knowstream.memory import Memory
    from knowstream.models.encoder import TextEncoder

    return [
        (Memory, "resolve", "registry (resolve, lineage)"),
        (TextEncoder, "embed", "encode question"),
        (VersionView, "search", "search"),
        (VersionView, "docs", "doc payloads"),
    ]


def index_step(memory: Memory) -> tuple[dict, float]:
    """What ingest runs after each publish (``Memory.maintain``: here only the store's
    index step, since the bench configures no compaction or retention), and its seconds."""
    return timed_call(memory.maintain)


# --- synthetic batches -------------------------------------------------------------------------
class Synth:
    """Batches of staged rows shaped like the pipeline's, from a seeded generator."""

    def __init__(self, seed: int, staging: Path) -> None:
        self.rng = np.random.default_rng(seed)
        self.staging = staging
        self.clock = datetime(2024, 1, 1, tzinfo=UTC)  # published_at, one second per doc
        self.offset = 0  # Kafka offsets the rows claim to come from

    def _text(self, chars: int) -> str:
        words = self.rng.choice(WORDS, size=chars // 5)
        return " ".join(words)[:chars].strip() + "."

    def _unit(self) -> list[float]:
        v = self.rng.standard_normal(DIM).astype(np.float32)
        return (v / np.linalg.norm(v)).tolist()

    def _doc(self, doc_id: str) -> dict[str, list[dict]]:
        from knowstream.schemas.chunk import chunk_id
        from knowstream.schemas.modulation import Modulation

        self.clock += timedelta(seconds=1)
        self.offset += 1
        # A fresh content hash each time: a replacement differs from what it replaces.
        chash = hashlib.sha256(f"{doc_id}\x00{self.offset}".encode()).hexdigest()
        title = doc_id.rsplit("-", 1)[0]
        n_chunks = int(self.rng.choice(CHUNKS_PER_DOC[0], p=CHUNKS_PER_DOC[1]))
        chunks, pos = [], 0
        for i in range(n_chunks):
            text = self._text(CHUNK_CHARS)
            chunks.append(
                {
                    "chunk_id": chunk_id(doc_id, i, chash),
                    "doc_id": doc_id,
                    "index": i,
                    "text": text,
                    "char_start": pos,
                    "char_end": pos + len(text),
                    "n_tokens": 128,
                    "content_hash": chash,
                    "embedding": self._unit(),
                }
            )
            pos += len(text) - 100  # overlapping windows, as the chunker makes them
        triples = [
            {
                "subject": self._text(20),
                "relation": str(self.rng.choice(["is", "play at", "win", "be in", "found"])),
                "object": self._text(24),
                "doc_id": doc_id,
                "chunk_id": chunks[int(self.rng.integers(n_chunks))]["chunk_id"],
                "confidence": float(self.rng.uniform(0.3, 1.0)),
                "observed_at": self.clock,
            }
            for _ in range(int(self.rng.integers(*TRIPLES_PER_DOC)))
        ]
        entry = self.rng.standard_normal(MOD_SHAPE).astype(np.float16)
        modulation = Modulation.from_array(doc_id, chash, "mac-bench-synthetic", entry).to_row()
        doc = {
            "doc_id": doc_id,
            "op": "upsert",
            "title": title,
            "source": "bench-synthetic",
            "url": f"https://example.org/{doc_id}",
            "published_at": self.clock,
            "metadata": "{}",
            "content_hash": chash,
            "model": "bench-synthetic",
            "n_chunks": n_chunks,
            "topic": "bench",
            "partition": 0,
            "offset": self.offset,
        }
        return {"docs": [doc], "chunks": chunks, "triples": triples, "modulations": [modulation]}

    def batch(self, doc_ids: Sequence[str]) -> StagedBatch:
        """A StagedBatch of upserts of ``doc_ids``, written and read back as the pipeline does.

        Why through Parquet: ``read_staged`` is how publish gets its rows in the flow, so the
        types (timestamps, lists, bytes) are the pipeline's, and ``batch.files`` are real files
        for the manifest checksums and the MLflow artifacts.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        from knowstream.schemas.staged import OUTPUTS, read_staged

        rows: dict[str, list[dict]] = {name: [] for name in OUTPUTS}
        for doc_id in doc_ids:
            for name, part in self._doc(doc_id).items():
                rows[name].extend(part)
        folder = self.staging / f"batch-{self.offset:09d}"
        folder.mkdir(parents=True)
        for name, schema in OUTPUTS.items():
            table = pa.Table.from_pylist(rows[name], schema=schema)
            pq.write_table(table, folder / f"{name}-00000-of-00001.parquet")
        return read_staged(folder)


# --- the measurements --------------------------------------------------------------------------
def bench_settings(home: Path, qdrant_url: str | None, embedded: str = "edge") -> Settings:
    """A fresh memory under ``home``; storage set explicitly, so ``KNOWSTREAM_*`` can't redirect."""
    from knowstream.settings import Settings

    return Settings(
        home=home,
        qdrant_url=qdrant_url,
        qdrant_path=None,
        mlflow_uri=None,
        qdrant_embedded=embedded,
    )


def publish(
    memory: Memory,
    batch: StagedBatch,
    parent: int | None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """``Memory.publish`` as the ingest flow calls it; returns the new version."""
    from knowstream.schemas.manifest import OffsetRange

    offsets = [d["offset"] for d in batch.docs]
    info = memory.publish(
        batch,
        parent=parent,
        kind="ingest",
        offsets=[OffsetRange("bench", 0, min(offsets), max(offsets) + 1)],
        model_versions={"bench": "synthetic"},
        make_live=True,
        require_live_parent=True,  # the ingest flow's compare-and-set; parent is live here
        progress=progress,
    )
    shutil.rmtree(batch.files[0].parent, ignore_errors=True)  # staging is disposable
    return info.version


def grow(
    memory: Memory, synth: Synth, held: list[str], target: int, build_batch: int
) -> list[dict[str, Any]]:
    """Publish new documents in versions of ``build_batch`` until ``held`` has ``target``."""
    timings = []
    timer = StepTimer()
    with Progress(
        TextColumn(f"grow to {target:>6} docs"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("points"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("grow", total=None)
        while len(held) < target:
            ids = [f"doc-{i:07d}" for i in range(len(held), min(target, len(held) + build_batch))]
            batch = synth.batch(ids)
            points = len(batch.docs) + len(batch.chunks)
            progress.update(task, total=points, completed=0)
            parent = memory.registry.live()
            with instrumented(timer, publish_parts()):
                version, seconds = timed_call(
                    lambda b=batch, p=parent: publish(
                        memory, b, p, lambda n: progress.advance(task, n)
                    )
                )
            parts = timer.take()
            done, index_s = index_step(memory)
            timings.append(
                {
                    "version": version,
                    "docs_before": len(held),
                    "docs": len(ids),
                    "seconds": seconds,
                    "parts_s": parts,
                    "parts_cpu_s": timer.last_cpu,
                    "index_s": index_s,
                    "indexed": bool(done.get("indexed")),
                }
            )
            held.extend(ids)
    return timings


def measure(
    memory: Memory,
    synth: Synth,
    held: list[str],
    *,
    batch_docs: int,
    repeats: int,
    replace_fraction: float,
    questions: int = ASK_QUESTIONS,
) -> dict[str, Any]:
    """Publish, rollback, dedup lookup and search at the memory's current size."""
    base = memory.registry.live()
    assert base is not None
    first = min(v.version for v in memory.registry.versions() if v.state == "published")
    timer = StepTimer()
    size = len(held)
    n_replace = round(batch_docs * replace_fraction)
    runs: list[dict[str, Any]] = []
    with Progress(
        TextColumn(f"measure at {size:>6} docs"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("measure", total=repeats)
        # One untimed round first: the first size would otherwise pay for cold caches
        # (SQLAlchemy statements, lazy imports), inflating it and flattering the ratios.
        picked = [str(x) for x in synth.rng.choice(held, size=n_replace, replace=False)]
        warm = [*picked, *(f"warm-{size}-{i:04d}" for i in range(batch_docs - n_replace))]
        publish(memory, synth.batch(warm), base)
        index_step(memory)
        memory.set_live(base)
        memory.known(base, warm)
        for rep in range(repeats):
            replaced = [str(x) for x in synth.rng.choice(held, size=n_replace, replace=False)]
            new = [f"new-{size}-{rep}-{i:04d}" for i in range(batch_docs - n_replace)]
            batch = synth.batch([*replaced, *new])
            written, cpu = written_bytes(), time.process_time()
            with instrumented(timer, publish_parts()):
                version, publish_s = timed_call(lambda b=batch: publish(memory, b, base))
            parts = timer.take()
            parts_cpu = timer.last_cpu
            publish_cpu_s = time.process_time() - cpu
            written = written_bytes() - written
            _, index_s = index_step(memory)
            # Rollback: live goes from the version just published back to the size's version.
            _, rollback_s = timed_call(lambda: memory.set_live(base))
            # The ingest flow's dedup lookup for a batch of this shape, before its pipeline runs.
            known, known_s = timed_call(lambda r=replaced, n=new: memory.known(base, [*r, *n]))
            if len(known) != n_replace:
                raise RuntimeError(f"known() found {len(known)} of {n_replace} held docs")
            query = synth._unit()
            view_s = {}
            search_s = {}
            for label, v in (("live", base), ("v1", first)):
                view, view_s[label] = timed_call(lambda v=v: memory.view(v))
                hits, search_s[label] = timed_call(lambda q=query, w=view: w.search(q, k=5))
                if not hits:
                    raise RuntimeError(f"search at version {v} found nothing")
            runs.append(
                {
                    "version": version,
                    "publish_s": publish_s,
                    "publish_parts_s": parts,
                    "publish_cpu_s": publish_cpu_s,  # process CPU, all threads
                    "publish_parts_cpu_s": parts_cpu,
                    "publish_written_bytes": written,  # this process's writes to storage
                    "index_s": index_s,
                    "rollback_s": rollback_s,
                    "known_s": known_s,
                    "view_s": view_s,
                    "search_s": search_s,
                }
            )
            progress.advance(task)
    points = memory.store.count()
    # The /ask code path in evidence mode (encode the question, search, read the docs),
    # as `knowstream ask` and the server run it: ASK_QUESTIONS questions, p50 and p95.
    from knowstream.query import query as ask

    ask(memory, "warm-up", version=base)  # loads the encoder once
    asks: list[dict[str, float]] = []
    with instrumented(timer, ask_parts()):
        for text in [synth._text(80) for _ in range(questions)]:
            cpu = time.process_time()
            _, seconds = timed_call(lambda q=text: ask(memory, q, version=base, k=5))
            asks.append({"wall": seconds, "cpu": time.process_time() - cpu, **timer.take()})
    ask_s = sorted(a["wall"] for a in asks)

    def p(key: str, q: float) -> float:
        return percentile([a.get(key, 0.0) for a in asks], q)

    def med(get: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(get(r) for r in runs)

    return {
        "docs": size,
        "base_version": base,
        "points_in_collection": points,
        "batch_docs": batch_docs,
        "replaced": n_replace,
        "new": batch_docs - n_replace,
        "runs": runs,
        "median_s": {
            "publish": med(lambda r: r["publish_s"]),
            **{
                f"publish: {p}": med(lambda r, p=p: r["publish_parts_s"].get(p, 0.0))
                for p in PUBLISH_PARTS
            },
            "publish: MLflow only (reserve, mark published, set live)": med(
                lambda r: sum(r["publish_parts_s"].get(p, 0.0) for p in MLFLOW_PARTS)
            ),
            "publish: other (lock, lineage, counts, manifest)": med(
                lambda r: (
                    r["publish_s"] - sum(r["publish_parts_s"].get(p, 0.0) for p in PUBLISH_PARTS)
                )
            ),
            **{
                f"publish: of which {q}": med(lambda r, q=q: r["publish_parts_s"].get(q, 0.0))
                for q in QDRANT_CALLS
            },
            "rollback (set_live)": med(lambda r: r["rollback_s"]),
            "dedup lookup (known)": med(lambda r: r["known_s"]),
            "view @live (resolve, lineage)": med(lambda r: r["view_s"]["live"]),
            "search @live": med(lambda r: r["search_s"]["live"]),
            "view @v1": med(lambda r: r["view_s"]["v1"]),
            "search @v1": med(lambda r: r["search_s"]["v1"]),
            f"ask, evidence mode: p50 of {questions}": statistics.median(ask_s),
            f"ask, evidence mode: p95 of {questions}": percentile(ask_s, 95),
            **{f"ask: p95 of {part}": p(part, 95) for _, _, part in ask_parts()},
        },
        "median_cpu_s": {
            "publish": med(lambda r: r["publish_cpu_s"]),
            **{
                f"publish: {p}": med(lambda r, p=p: r["publish_parts_cpu_s"].get(p, 0.0))
                for p in PUBLISH_PARTS
            },
            "publish: MLflow only (reserve, mark published, set live)": med(
                lambda r: sum(r["publish_parts_cpu_s"].get(p, 0.0) for p in MLFLOW_PARTS)
            ),
            "ask, evidence mode: p50": p("cpu", 50),
            "ask, evidence mode: p95": p("cpu", 95),
        },
        "median_written_mb_per_publish": med(lambda r: r["publish_written_bytes"] / 1e6),
        "median_index_step_s": med(lambda r: r["index_s"]),
        "asks": asks,
    }


# --- report ------------------------------------------------------------------------------------
def render(result: dict[str, Any]) -> None:
    sizes = result["sizes"]
    table = Table(
        title=f"median of {result['repeats']} over a {result['batch']}-doc batch "
        f"({sizes[0]['replaced']} replace, {sizes[0]['new']} new); seconds",
        title_justify="left",
    )
    table.add_column("operation")
    for s in sizes:
        table.add_column(f"{s['docs']} docs\n({s['points_in_collection']} points)", justify="right")
    if len(sizes) > 1:
        table.add_column("last / first", justify="right")
    for key in sizes[0]["median_s"]:
        label = key if not key.startswith("publish: ") else "  " + key.split(": ", 1)[1]
        values = [s["median_s"][key] for s in sizes]
        cells = [f"{v:.3f}" for v in values]
        if len(sizes) > 1:
            cells.append(f"{values[-1] / values[0]:.1f}x" if values[0] > 0.0005 else "-")
        table.add_row(label, *cells)
    console.print(table)

    cpu_table = Table(
        title="the same, process CPU seconds (all threads; less sensitive to load)",
        title_justify="left",
    )
    cpu_table.add_column("operation")
    for s in sizes:
        cpu_table.add_column(f"{s['docs']} docs", justify="right")
    if len(sizes) > 1:
        cpu_table.add_column("last / first", justify="right")
    rows = {
        **{k: [s["median_cpu_s"][k] for s in sizes] for k in sizes[0]["median_cpu_s"]},
        "MB written per publish": [s["median_written_mb_per_publish"] for s in sizes],
        "index step after a publish (wall)": [s["median_index_step_s"] for s in sizes],
    }
    for key, values in rows.items():
        label = key if not key.startswith("publish: ") else "  " + key.split(": ", 1)[1]
        cells = [f"{v:.3f}" for v in values]
        if len(sizes) > 1:
            cells.append(f"{values[-1] / values[0]:.1f}x" if values[0] > 0.0005 else "-")
        cpu_table.add_row(label, *cells)
    console.print(cpu_table)

    grow_table = Table(
        title=f"growing the memories: one {result['build_batch']}-doc version each",
        title_justify="left",
    )
    grow_table.add_column("version", justify="right")
    grow_table.add_column("docs before", justify="right")
    grow_table.add_column("publish s", justify="right")
    grow_table.add_column("ms/doc", justify="right")
    for q in QDRANT_CALLS:
        grow_table.add_column(f"of which\n{q}", justify="right")
    grow_table.add_column("then\nindex step s", justify="right")
    for g in result["build"]:
        grow_table.add_row(
            str(g["version"]),
            str(g["docs_before"]),
            f"{g['seconds']:.2f}",
            f"{1000 * g['seconds'] / g['docs']:.1f}",
            *(f"{g['parts_s'].get(q, 0.0):.2f}" for q in QDRANT_CALLS),
            f"{g.get('index_s', 0.0):.2f}" + (" *" if g.get("indexed") else ""),
        )
    console.print(grow_table)


# --- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000", help="memory sizes in docs, comma-separated")
    ap.add_argument("--batch", type=int, default=100, help="docs in the measured batch")
    ap.add_argument("--repeats", type=int, default=3, help="measured publishes per size")
    ap.add_argument("--replace", type=float, default=0.5, help="fraction of the batch replacing")
    ap.add_argument("--build-batch", type=int, default=1000, help="docs per version when growing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ask", type=int, default=ASK_QUESTIONS, help="/ask calls timed per size")
    ap.add_argument("--qdrant-url", help="a Qdrant server instead of the embedded store")
    ap.add_argument(
        "--embedded", choices=["edge", "local"], default="edge", help="embedded backend"
    )
    ap.add_argument("--home", type=Path, help="state folder, new or empty (default: fresh temp)")
    ap.add_argument("--keep", action="store_true", help="keep a temporary --home afterwards")
    ap.add_argument("--out", type=Path, help="JSON results (default: bench/results/publish.json)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    out = args.out or Path(__file__).parent / "results" / "publish.json"
    temporary = args.home is None
    home = Path(tempfile.mkdtemp(prefix="knowstream-bench-")) if temporary else args.home
    if home.exists() and any(home.iterdir()):
        console.print(f"[red]--home {home} is not empty; give a new or empty folder[/red]")
        return 2
    home.mkdir(parents=True, exist_ok=True)
    home = home.resolve()

    from knowstream.connectors.qdrant import close_clients
    from knowstream.memory import Memory

    settings = bench_settings(home, args.qdrant_url, args.embedded)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    memory = Memory(settings)
    synth = Synth(args.seed, home / "staging")
    held: list[str] = []  # doc ids in the live memory, in order of publishing
    build: list[dict[str, Any]] = []
    measured = []
    try:
        for size in sizes:
            build += grow(memory, synth, held, size, args.build_batch)
            measured.append(
                measure(
                    memory,
                    synth,
                    held,
                    batch_docs=args.batch,
                    repeats=args.repeats,
                    replace_fraction=args.replace,
                    questions=args.ask,
                )
            )
    finally:
        close_clients()
    result = {
        **run_header("publish", started, load_before, VERSIONED_PACKAGES),
        "qdrant": args.qdrant_url or {"edge": "qdrant-edge", "local": "local mode"}[args.embedded],
        "batch": args.batch,
        "repeats": args.repeats,
        "build_batch": args.build_batch,
        "shapes": {
            "embedding_dim": DIM,
            "modulation": list(MOD_SHAPE),
            "chunks_per_doc": CHUNKS_PER_DOC,
            "triples_per_doc": TRIPLES_PER_DOC,
            "chunk_chars": CHUNK_CHARS,
        },
        "build": build,
        "sizes": measured,
    }
    render(result)
    write_result(out, result)
    if temporary and not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
