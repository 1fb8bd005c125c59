"""``/ask`` latency on CPU: mode mac against mode rag (k=5), same questions, real HTTP app.

    .venv/bin/python bench/ask_latency.py --data /work/shared/data/squad_v1.1/dev.jsonl \
        --n-docs 50 --n-questions 30 --out bench/results/ask-latency-50x30.json

How, all on the real parts (no mocks, see AGENTS.md):

1. A memory built by the real ingest path, as in ``bench/e2e.py``: a tansu broker of its own
   on a free loopback port, the first ``--n-docs`` distinct documents of ``--data`` produced
   as upsert events, one ``ingest_flow(settings, once=True)`` (Prefect local API, Beam
   FnApiRunner, Qdrant local mode, MLflow on SQLite). The broker stops after ingest.
2. The HTTP app (``serving.app.create_app``) behind FastAPI's ``TestClient``: requests go
   through Starlette routing, validation, the handler and JSON encoding in this process, with
   no socket in between. Up to ``--n-questions`` questions of ``--data`` about the ingested
   documents (spread over the documents).
3. One warm-up request per mode (loads the LM, the encoder and the amortizer; reported apart),
   then each question is asked once in every mode of ``--modes``, modes in a rotating order
   per question so that no mode always runs first. Each request's wall time is measured
   around ``client.post``; inside it, timers around ``query`` (retrieval), the modulation
   bank read (with the banked documents' texts, for an amortizer that lets the LM pick
   the entry) and ``Generator.answer`` (the LM, that pick included) split it.
4. p50/p95 per mode (a table), and every request in ``--out``. The bytes the memory stores
   per document (the Qdrant doc point's payload, its ``modulation`` part) are read back from
   the memory at the end.

"evidence" (retrieval only, no generation) is in the default modes as a baseline: it is the
part of both modes that is not the LM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first, not the root; append,
    sys.path.append(str(ROOT))  # so that an installed knowstream stays first (bench/_common.py)

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from bench._common import (  # noqa: E402
    StepTimer,
    console,
    instrumented,
    isolate_prefect,
    load_documents,
    load_questions,
    percentile,
    run_header,
    timed_call,
    write_result,
)

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

    from knowstream.settings import Settings

VERSIONED_PACKAGES = (
    "torch",
    "transformers",
    "fastapi",
    "starlette",
    "qdrant-client",
    "apache-beam",
    "mlflow",
    "prefect",
    "gguf",
)
K = 5
PARTS = ("retrieval (query)", "bank read", "generation (LM)")


def build_memory(settings: Settings, docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Produce ``docs`` and run the real ingest flow once; what it did and how long it took."""
    from bench.e2e import produce
    from knowstream.flows.ingest import ingest_flow
    from knowstream.infra.services import start_broker, stop_broker

    try:
        with console.status("starting the tansu broker..."):
            start_broker(settings)
        produce_s = produce(settings, docs)
        with console.status(f"ingesting {len(docs)} docs (Prefect, Beam, Qdrant, MLflow)..."):
            reports, ingest_s = timed_call(lambda: ingest_flow(settings, once=True))
    finally:
        stop_broker(settings)
    versions = [r.version for r in reports]
    dead = sum(len(r.dead_letters) for r in reports)
    if not versions or versions[-1] is None or dead:
        raise RuntimeError(f"ingest published versions {versions} with {dead} dead letters")
    return {
        "produce_s": produce_s,
        "ingest_s": ingest_s,
        "versions": versions,
        "dead_letters": dead,
    }


def timing_targets() -> list[tuple[object, str, str]]:
    import knowstream.query as query_mod
    from knowstream.connectors.qdrant._source import VersionView
    from knowstream.serving.generate import Generator

    return [
        (query_mod, "query", PARTS[0]),
        (VersionView, "modulation_bank", PARTS[1]),
        (VersionView, "texts", PARTS[1]),
        (Generator, "answer", PARTS[2]),
    ]


def ask(client: TestClient, question: str, mode: str) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    response = client.post("/ask", json={"question": question, "k": K, "mode": mode})
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"/ask {mode}: HTTP {response.status_code}: {response.text[:200]}")
    return response.json(), seconds


def run_questions(
    settings: Settings, questions: list[dict[str, Any]], modes: list[str]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Warm-up per mode, then every question in every mode; (warm-up seconds, requests)."""
    from fastapi.testclient import TestClient

    from knowstream.serving.app import create_app

    timer = StepTimer()
    warm_up: dict[str, float] = {}
    requests: list[dict[str, Any]] = []
    with TestClient(create_app(settings)) as client:
        with console.status("warm-up: one request per mode (loads the LM and encoders)..."):
            for mode in modes:
                _, warm_up[mode] = ask(client, questions[0]["question"], mode)
        columns = (TextColumn("ask"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=console) as progress, instrumented(timer, timing_targets()):
            task = progress.add_task("ask", total=len(questions) * len(modes))
            for i, q in enumerate(questions):
                for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
                    timer.take()
                    body, seconds = ask(client, q["question"], mode)
                    parts = timer.take()
                    answer = body["answer"] or ""
                    requests.append(
                        {
                            "question": q["question"],
                            "doc_id": q["doc_id"],
                            "mode": mode,
                            "seconds": seconds,
                            "parts_s": parts,
                            "answer": answer,
                            "answer_matches": any(
                                a.lower() in answer.lower() for a in q["answers"] if a
                            ),
                            "evidence": len(body["evidence"]),
                            "gold_doc_retrieved": any(
                                e["doc_id"] == q["doc_id"] for e in body["evidence"]
                            ),
                            "docs": len(body["docs"]),
                        }
                    )
                    progress.advance(task)
    return warm_up, requests


def stored_bytes(settings: Settings) -> dict[str, Any]:
    """Bytes the live memory stores per document: doc point payloads as JSON, their
    ``modulation`` part, and the Qdrant local-mode folder on disk."""
    from knowstream.connectors.qdrant import Filter
    from knowstream.memory import Memory

    memory = Memory(settings)
    payload, modulation, data, n = 0, 0, 0, 0
    for p in memory.store.scroll(Filter({"kind": ["doc"]})):
        payload += len(json.dumps(p.payload, ensure_ascii=False).encode())
        modulation += len(json.dumps({"modulation": p.payload["modulation"]}).encode())
        data += len(p.payload["modulation"]["data"])
        n += 1
    disk = sum(f.stat().st_size for f in settings.qdrant_location.rglob("*") if f.is_file())
    return {
        "doc_points": n,
        "points": memory.store.count(),
        "doc_payload_json_per_doc": payload / n,
        "modulation_json_per_doc": modulation / n,
        "modulation_base64_data_per_doc": data / n,
        "vector_float16_per_doc": 16 * 576 * 2,
        "qdrant_folder_bytes": disk,
        "qdrant_folder_bytes_per_doc": disk / n,
    }


def summarize(requests: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    out = {}
    for mode in modes:
        rs = [r for r in requests if r["mode"] == mode]
        secs = [r["seconds"] for r in rs]
        out[mode] = {
            "requests": len(rs),
            "p50_s": percentile(secs, 50),
            "p95_s": percentile(secs, 95),
            "mean_s": sum(secs) / len(secs),
            "max_s": max(secs),
            "parts_p50_s": {
                p: percentile([r["parts_s"].get(p, 0.0) for r in rs], 50) for p in PARTS
            },
            "answer_contains_gold": sum(r["answer_matches"] for r in rs) / len(rs),
            "gold_doc_retrieved": sum(r["gold_doc_retrieved"] for r in rs) / len(rs),
        }
    return out


def render(result: dict[str, Any]) -> None:
    table = Table(
        title=f"/ask latency, k={K}: {result['docs']} docs, {result['questions']} questions "
        f"per mode, CPU ({result['torch_threads']} torch threads), seconds",
        title_justify="left",
    )
    for col in ("mode", "p50", "p95", "mean", "max", *(f"p50 {p}" for p in PARTS)):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for mode, s in result["latency"].items():
        table.add_row(
            mode,
            f"{s['p50_s']:.3f}",
            f"{s['p95_s']:.3f}",
            f"{s['mean_s']:.3f}",
            f"{s['max_s']:.3f}",
            *(f"{s['parts_p50_s'][p]:.3f}" for p in PARTS),
        )
    console.print(table)
    b = result["stored_bytes"]
    console.print(
        f"stored per doc: {b['doc_payload_json_per_doc']:,.0f} B doc point payload (JSON), of "
        f"which {b['modulation_json_per_doc']:,.0f} B modulation; "
        f"Qdrant folder {b['qdrant_folder_bytes_per_doc']:,.0f} B/doc ({b['points']} points)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="JSONL: doc_id, title, text, question")
    ap.add_argument("--n-docs", type=int, default=50, help="distinct documents to ingest")
    ap.add_argument("--n-questions", type=int, default=30, help="questions, each asked per mode")
    ap.add_argument("--modes", default="evidence,rag,mac", help="comma-separated /ask modes")
    ap.add_argument("--home", type=Path, help="state folder, new or empty (default: fresh temp)")
    ap.add_argument("--keep", action="store_true", help="keep a temporary --home afterwards")
    ap.add_argument("--out", type=Path, help="JSON results (default: bench/results/ask.json)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    out = args.out or Path(__file__).parent / "results" / "ask.json"
    temporary = args.home is None
    home = Path(tempfile.mkdtemp(prefix="knowstream-bench-")) if temporary else args.home
    if home.exists() and any(home.iterdir()):
        console.print(f"[red]--home {home} is not empty; give a new or empty folder[/red]")
        return 2
    home.mkdir(parents=True, exist_ok=True)
    home = home.resolve()
    isolate_prefect(home)

    docs = load_documents(args.data, args.n_docs)
    questions = load_questions(args.data, {d["doc_id"] for d in docs}, args.n_questions)
    if not docs or not questions:
        console.print(f"[red]{args.data}: {len(docs)} docs, {len(questions)} questions[/red]")
        return 2

    import torch

    from bench.e2e import bench_settings
    from knowstream.connectors.qdrant import close_clients

    settings = bench_settings(home)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    try:
        ingest = build_memory(settings, docs)
        warm_up, requests = run_questions(settings, questions, modes)
        stored = stored_bytes(settings)
    finally:
        close_clients()
    result: dict[str, Any] = {
        **run_header("ask_latency", started, load_before, VERSIONED_PACKAGES),
        "data": str(args.data),
        "docs": len(docs),
        "questions": len(questions),
        "k": K,
        "modes": modes,
        "torch_threads": torch.get_num_threads(),
        "client": "fastapi.testclient.TestClient (in-process ASGI, no socket)",
        "amortizer": settings.amortizer,
        "ingest": ingest,
        "warm_up_s": warm_up,
        "latency": summarize(requests, modes),
        "stored_bytes": stored,
        "requests": requests,
    }
    render(result)
    write_result(out, result)
    if temporary and not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
