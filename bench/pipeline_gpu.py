"""The real micro-batch pipeline with embed and amortize on a GPU, beside a raw forward.

    python3 bench/pipeline_gpu.py --data train_documents.jsonl.gz --n 5000 --device cuda \
        --out $OUT/pipeline-gpu-5000.json        # on the GPU machine: bench/pipeline_gpu.sh
    .venv/bin/python bench/pipeline_gpu.py --data /work/shared/data/squad_v1.1/documents.jsonl \
        --n 50 --device cpu --warmup 8 --repeats 1   # the same code path here, on CPU

In one process, on one device:

1. a warm-up ``run_batch`` over the first ``--warmup`` documents (not counted): the stage
   models load into the process-wide caches their RunInference handlers read (MiniLM,
   spaCy, the amortizer), and CUDA initializes, so the measured run is the steady state of
   a long-running ingest worker;
2. the measured ``run_batch`` over ``--n`` documents (``knowstream.pipelines.pipeline``:
   parse, dedup, chunk, embed, triples, amortize, Parquet staging, read-back; Beam's
   FnApiRunner in-process unless ``--beam-arg`` says otherwise), with ``embed_device`` and
   ``amortize_device`` set to ``--device``. Per-stage seconds come from the runner's
   execution-time metrics (``BatchResult.stage_ms``: every transform of a stage, Beam's
   batching and the one-at-a-time path included) and the models' own time from
   RunInference's metrics (``BatchResult.inference_ms``);
3. the raw batched forward of the same models on the same device over the same inputs, no
   Beam, inputs tokenized, length-sorted, padded and moved to the device beforehand (not
   timed): MiniLM over the chunks the pipeline embedded, batched as the stage batches them
   (groups of ``embed_batch`` sorted by length, forwards of ``Embed.forward_batch``; forward,
   mean pooling, normalization), and the MAC's document reader over the documents, in
   batches of ``amortize_batch`` with ``amortize_window_batch`` windows per encoder forward
   (MiniLM + the amortizer) or documents per LM pass (the "lm" reader): ``bench/amortize.py``'s
   raw forward. One warm-up batch each; median of ``--repeats``.

The goal figure (issue 12): (raw embed s + raw amortize s) / (in-pipeline embed s +
amortize s), i.e. the pipeline's embed + amortize throughput as a fraction of the raw
forward's; >= 0.7 is the target. A progress line is printed every ``--progress-s`` seconds
(in-process runners only: counts of the stage models' calls), a table at the end, and the
figures as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first, not the root; append,
    sys.path.append(str(ROOT))  # so that an installed knowstream stays first (bench/_common.py)

from rich.table import Table  # noqa: E402

from bench._common import console, load_documents, run_header, write_result  # noqa: E402

VERSIONED_PACKAGES = (
    "torch",
    "transformers",
    "apache-beam",
    "spacy",
    "pyarrow",
    "numpy",
    "pydantic",
    "tokenizers",
)
# Top-level transforms of pipelines/pipeline.py that belong to a stage of the README's table;
# anything else (key by doc, filters, flattens, drop failed *, dead letters) is "Beam glue".
STAGES = ("parse", "dedup", "chunk", "embed", "triples", "amortize")
STAGING = "stage"  # the Parquet writes of every output (WriteStaged)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def records_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Kafka records as the ingest flow hands them to ``run_batch`` (as bench/runners.py)."""
    return [
        {
            "topic": "bench",
            "partition": 0,
            "offset": i,
            "key": d["doc_id"].encode(),
            "value": json.dumps(d, ensure_ascii=False).encode(),
            "timestamp_ms": 0,
        }
        for i, d in enumerate(docs)
    ]


def nvidia_smi() -> str | None:
    try:
        return subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


# --- progress ----------------------------------------------------------------------------------
@contextmanager
def counting_stage_calls(counts: dict[str, int]) -> Iterator[None]:
    """Count the elements each stage model's ``run_inference`` receives (in this process).

    The handlers' classes are patched in place and restored after; Beam pickles handler
    instances, not their classes, so an in-process runner calls the patched methods.
    """
    from knowstream.pipelines.stages.amortize import Amortize
    from knowstream.pipelines.stages.embed import Embed
    from knowstream.pipelines.stages.triples import Triples

    saved = []
    for cls in (Embed, Triples, Amortize):
        original = cls.__dict__["run_inference"]

        def counted(self, batch, model, inference_args=None, _f=original, _s=cls.stage):
            out = _f(self, batch, model, inference_args)
            counts[_s] += len(batch)
            return out

        saved.append((cls, original))
        cls.run_inference = counted  # type: ignore[method-assign]
    try:
        yield
    finally:
        for cls, original in saved:
            cls.run_inference = original  # type: ignore[method-assign]


@contextmanager
def heartbeat(label: str, counts: dict[str, int], every_s: float) -> Iterator[None]:
    """A progress line every ``every_s`` seconds while the block runs."""
    stop = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not stop.wait(every_s):
            done = ", ".join(f"{k} {v}" for k, v in counts.items()) or "no stage calls yet"
            log(f"{label}: {time.perf_counter() - start:.0f} s; {done}")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# --- the pipeline ------------------------------------------------------------------------------
def run_pipeline(settings: Any, docs: list[dict[str, Any]], label: str, every_s: float) -> dict:
    """One ``run_batch`` over ``docs``; wall, CPU, per-stage and per-model times, counts."""
    from knowstream.connectors import staging as staging_store
    from knowstream.pipelines.pipeline import run_batch

    counts: dict[str, int] = defaultdict(int)
    url = staging_store.batch_url(settings)
    log(f"{label}: run_batch over {len(docs)} docs, beam_args {settings.beam_args}")
    with counting_stage_calls(counts), heartbeat(label, counts, every_s):
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = run_batch(settings, records_of(docs), known={}, model="bench", staging=url)
        sync(settings.embed_device)
        sync(settings.amortize_device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    staging_store.remove(settings, url)
    staged = result.staged
    log(f"{label}: {wall:.1f} s, {len(docs) / wall:.1f} docs/s end to end")
    return {
        "docs": len(docs),
        "wall_s": wall,
        "driver_cpu_s": cpu,
        "docs_per_s": len(docs) / wall,
        "stage_ms": result.stage_ms,
        "inference_ms": result.inference_ms,
        "counters": result.counters,
        "counts": {
            "upserts": staged.upserts,
            "chunks": len(staged.chunks),
            "triples": len(staged.triples),
            "modulations": len(staged.modulations),
            "dead_letters": len(staged.dead_letters),
        },
        "chunk_texts": [c["text"] for c in staged.chunks],  # the raw embed forward's input
    }


def stage_seconds(stage_ms: dict[str, int]) -> dict[str, float]:
    """Seconds per pipeline stage, the Parquet writes summed as "stage (Parquet)", the
    rest as "Beam glue"."""
    out = {s: stage_ms.get(s, 0) / 1000 for s in STAGES}
    out["stage (Parquet)"] = stage_ms.get(STAGING, 0) / 1000
    glue = [k for k in stage_ms if k not in STAGES and k != STAGING]
    out["Beam glue"] = sum(stage_ms[k] for k in glue) / 1000
    return out


# --- the raw forward ---------------------------------------------------------------------------
def sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def prepare_embed(encoder: Any, texts: list[str], group: int, batch: int) -> list[tuple[Any, Any]]:
    """Chunk texts as the stage batches them: groups of ``group`` (a RunInference batch),
    each sorted by length and cut into forwards of ``batch`` (``TextEncoder.embed``),
    tokenized as ``TextEncoder.encode`` does, padded, on the encoder's device."""
    from knowstream.models.encoder import MAX_TOKENS

    out = []
    for g in range(0, len(texts), group):
        sorted_texts = sorted(texts[g : g + group], key=len)
        for start in range(0, len(sorted_texts), batch):
            t = encoder.tokenizer(
                sorted_texts[start : start + batch],
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            ).to(encoder.device)
            out.append((t["input_ids"], t["attention_mask"]))
    return out


def raw_embed(encoder: Any, prepared: list[tuple[Any, Any]]) -> list[Any]:
    """MiniLM forward + mean pooling + L2 normalization per prepared batch, on the device."""
    import torch

    outs = []
    with torch.inference_mode():
        for ids, mask in prepared:
            states = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
            outs.append(torch.nn.functional.normalize(pooled, p=2, dim=-1))
    return outs


def timed_repeats(fn: Callable[[], Any], device: str, repeats: int) -> list[float]:
    walls = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        walls.append(time.perf_counter() - start)
    return walls


def run_raw(settings: Any, docs: list[dict[str, Any]], chunk_texts: list[str], repeats: int):
    """Raw forward seconds (median of ``repeats``) of embed and amortize, and their runs."""
    import torch

    from bench.amortize import prepare_raw, raw_forward
    from knowstream.models.encoder import load_encoder
    from knowstream.models.inference import load_amortizer
    from knowstream.pipelines.stages.amortize_compute import load_stage_encoder
    from knowstream.pipelines.stages.embed import Embed

    # The very objects the pipeline's handlers used: the process-wide model caches.
    embed_device, amortize_device = settings.embed_device, settings.amortize_device
    encoder = load_encoder(embed_device)
    amortize_encoder = load_stage_encoder(amortize_device, settings.amortize_dtype)
    mac = load_amortizer(settings.amortizer, amortize_device, settings.amortize_dtype)
    forward_batch = Embed(settings.torch_threads, settings.embed_batch).forward_batch
    log(f"raw forward: preparing inputs ({len(chunk_texts)} chunks, {len(docs)} docs)")
    embed_in = prepare_embed(encoder, chunk_texts, settings.embed_batch, forward_batch)
    texts = [d["text"] for d in docs]
    b = settings.amortize_batch
    amortize_in = [
        prepare_raw(mac, amortize_encoder, texts[i : i + b], settings.amortize_window_batch)
        for i in range(0, len(texts), b)
    ]

    def embed_all() -> None:
        raw_embed(encoder, embed_in)

    def amortize_all() -> None:
        with torch.inference_mode():
            for p in amortize_in:
                raw_forward(mac, amortize_encoder, p)

    raw_embed(encoder, embed_in[:1])  # warm-up: one batch each, not timed
    with torch.inference_mode():
        raw_forward(mac, amortize_encoder, amortize_in[0])
    sync(embed_device)
    sync(amortize_device)
    runs = {
        "embed": timed_repeats(embed_all, embed_device, repeats),
        "amortize": timed_repeats(amortize_all, amortize_device, repeats),
    }
    for name, walls in runs.items():
        log(f"raw forward {name}: " + ", ".join(f"{w:.2f} s" for w in walls))
    return {name: statistics.median(walls) for name, walls in runs.items()}, runs


# --- report ------------------------------------------------------------------------------------
def render(result: dict[str, Any]) -> None:
    n = result["docs"]
    p = result["pipeline"]
    table = Table(
        title=f"pipeline on {result['device_name']}: {n} docs, {p['wall_s']:.1f} s end to end "
        f"= {p['docs_per_s']:.1f} docs/s",
        title_justify="left",
    )
    for col in ("part", "seconds", "docs/s", "ms/doc", "model s", "raw s", "raw docs/s", "raw/in"):
        table.add_column(col, justify="left" if col == "part" else "right")
    raw = result["raw_forward_s"]
    for name, s in p["stage_s"].items():
        model = p["inference_ms"].get(name)
        r = raw.get(name)
        table.add_row(
            name,
            f"{s:.2f}",
            f"{n / s:.0f}" if s else "-",
            f"{1000 * s / n:.2f}",
            f"{model / 1000:.2f}" if model is not None else "",
            f"{r:.2f}" if r is not None else "",
            f"{n / r:.0f}" if r else "",
            f"{r / s:.2f}" if r and s else "",
        )
    other = p["wall_s"] - sum(p["stage_s"].values())
    table.add_row("other (runner, read-back)", f"{other:.2f}", "", f"{1000 * other / n:.2f}")
    table.add_row("end to end", f"{p['wall_s']:.2f}", f"{p['docs_per_s']:.1f}")
    g = result["goal"]
    table.add_row(
        "embed + amortize",
        f"{g['pipeline_s']:.2f}",
        f"{g['pipeline_docs_per_s']:.0f}",
        "",
        f"{g['model_s']:.2f}",
        f"{g['raw_s']:.2f}",
        f"{g['raw_docs_per_s']:.0f}",
        f"{g['ratio']:.2f}",
    )
    console.print(table)
    console.print(
        f"embed + amortize in the pipeline = {g['ratio']:.2f}x the raw forward's throughput "
        f"(goal >= 0.7: {'met' if g['ratio'] >= 0.7 else 'not met'}); inside the models' "
        f"run_inference alone: {g['model_ratio']:.2f}x"
    )


# --- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="JSONL(.gz) with doc_id, text")
    ap.add_argument("--n", type=int, default=5000, help="distinct documents, measured run")
    ap.add_argument("--device", default="cuda", help="embed_device and amortize_device")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--embed-batch", type=int, default=1024, help="chunks per embed batch")
    ap.add_argument("--amortize-batch", type=int, default=256, help="docs per amortize batch")
    ap.add_argument("--window-batch", type=int, default=64, help="windows per encoder forward")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: settings)")
    ap.add_argument("--amortizer", default="bundled", help="checkpoint folder, bundled, init")
    ap.add_argument("--shared", action="store_true", help="amortize_shared (one per machine)")
    ap.add_argument(
        "--beam-arg", action="append", default=[], help="pipeline option (default FnApiRunner)"
    )
    ap.add_argument("--warmup", type=int, default=256, help="docs of the warm-up run (0: none)")
    ap.add_argument("--repeats", type=int, default=3, help="raw forward passes (median)")
    ap.add_argument("--progress-s", type=float, default=10.0, help="seconds between lines")
    ap.add_argument("--home", type=Path, help="state folder (default: a fresh temporary one)")
    ap.add_argument("--out", type=Path, help="JSON results")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_before = datetime.now(UTC), os.getloadavg()
    import torch

    from knowstream.settings import Settings

    home = args.home or Path(tempfile.mkdtemp(prefix="knowstream-pipeline-gpu-"))
    overrides: dict[str, Any] = {
        "home": home,
        "embed_device": args.device,
        "amortize_device": args.device,
        "amortize_dtype": args.dtype,
        "embed_batch": args.embed_batch,
        "amortize_batch": args.amortize_batch,
        "amortize_window_batch": args.window_batch,
        "amortizer": args.amortizer,
        "amortize_shared": args.shared,
        "beam_args": args.beam_arg or ["--runner=FnApiRunner"],
        "staging": None,
        "failpoints": {},
    }
    if args.threads:
        overrides["torch_threads"] = args.threads
    settings = Settings(**overrides)
    on_cuda = torch.device(args.device).type == "cuda"
    device_name = torch.cuda.get_device_name(args.device) if on_cuda else "cpu"
    smi = nvidia_smi()
    log(f"device {args.device}: {device_name}" + (f" ({smi})" if smi else ""))

    docs = load_documents(args.data, args.n + args.warmup)
    measured, warm = docs[: args.n], docs[args.n :] or docs[: args.warmup]
    if len(measured) < args.n:
        console.print(f"[yellow]{args.data} has {len(docs)} distinct documents, not {args.n}[/]")
    n = len(measured)
    try:
        if args.warmup:
            # Other documents than the measured ones where the file has enough (no cache hit).
            w = run_pipeline(settings, warm[: args.warmup], "warm-up", args.progress_s)
            log(f"warm-up done ({w['wall_s']:.1f} s, model loads included)")
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
        p = run_pipeline(settings, measured, "measured", args.progress_s)
        peak = torch.cuda.max_memory_allocated(args.device) if on_cuda else None
        raw_s, raw_runs = run_raw(settings, measured, p.pop("chunk_texts"), args.repeats)
    finally:
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)

    p["stage_s"] = stage_seconds(p["stage_ms"])
    pipe_s = p["stage_s"]["embed"] + p["stage_s"]["amortize"]
    model_s = (p["inference_ms"].get("embed", 0) + p["inference_ms"].get("amortize", 0)) / 1000
    raw_total = raw_s["embed"] + raw_s["amortize"]
    result: dict[str, Any] = {
        **run_header("pipeline_gpu", started, load_before, VERSIONED_PACKAGES),
        "nvidia_smi": smi,
        "device": args.device,
        "device_name": device_name,
        "data": str(args.data),
        "docs": n,
        "warmup_docs": args.warmup,
        "settings": settings.model_dump(
            mode="json",
            include={
                "chunk_tokens",
                "chunk_overlap",
                "embed_batch",
                "embed_device",
                "amortize_batch",
                "amortize_device",
                "amortize_dtype",
                "amortize_window_batch",
                "amortize_shared",
                "torch_threads",
                "amortizer",
                "beam_args",
            },
        ),
        "cuda_peak_allocated_bytes": peak,
        "pipeline": p,
        "raw_forward_s": raw_s,
        "raw_forward_runs_s": raw_runs,
        "goal": {
            "pipeline_s": pipe_s,
            "pipeline_docs_per_s": n / pipe_s if pipe_s else None,
            "model_s": model_s,
            "raw_s": raw_total,
            "raw_docs_per_s": n / raw_total,
            "ratio": raw_total / pipe_s if pipe_s else 0.0,  # in-pipeline / raw throughput
            "model_ratio": raw_total / model_s if model_s else 0.0,
            "target": 0.7,
        },
    }
    render(result)
    if args.out:
        write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
