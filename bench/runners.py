"""The micro-batch pipeline on CPU under different Beam runners: docs/s of ``run_batch``.

    .venv/bin/python bench/runners.py --data /work/shared/data/squad_v1.1/documents.jsonl \
        --n 300 --out bench/results/runners-squad-300.json

Runs the real pipeline (``knowstream.pipelines.pipeline.run_batch``: parse, dedup, chunk,
embed, triples, amortize, Parquet staging, read-back) over the first N documents of
``--data``, once per runner, in this order:

- ``in-process``: FnApiRunner in this process (the default ``Settings.beam_args``);
- ``multi-processing``: FnApiRunner with ``--direct_running_mode=multi_processing
  --direct_num_workers=2`` (two SDK worker processes);
- ``portable`` (with ``--portable``): PortableRunner on the job service and worker pool
  of ``knowstream up --beam`` under ``--home``, started and stopped here.

Each run loads the models inside its workers, as a fresh batch on a fresh worker does:
the wall time includes it, and ``--repeat`` repeats every runner. No publish, no Kafka:
the figures are the pipeline's. Staging is a local folder under ``--home``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import free_port, load_documents, run_header, write_result  # noqa: E402
from knowstream.connectors import staging as staging_store  # noqa: E402
from knowstream.pipelines.pipeline import run_batch  # noqa: E402
from knowstream.settings import Settings  # noqa: E402

MULTI = ["--runner=FnApiRunner", "--direct_running_mode=multi_processing"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="JSONL of documents")
    parser.add_argument("--n", type=int, default=300, help="documents per batch")
    parser.add_argument("--repeat", type=int, default=1, help="runs per runner")
    parser.add_argument("--workers", type=int, default=2, help="multi-processing workers")
    parser.add_argument("--portable", action="store_true", help="also the portable runner")
    parser.add_argument("--home", type=Path, default=Path(".knowstream/bench-runners"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started, load_before = datetime.now(UTC), os.getloadavg()

    docs = load_documents(args.data, args.n)
    records = [
        {
            "topic": "bench",
            "partition": 0,
            "offset": i,
            "key": d["doc_id"].encode(),
            "value": json.dumps(d).encode(),
            "timestamp_ms": 0,
        }
        for i, d in enumerate(docs)
    ]
    base = Settings(home=args.home)
    runners = {
        "in-process": ["--runner=FnApiRunner"],
        "multi-processing": [*MULTI, f"--direct_num_workers={args.workers}"],
    }
    if args.portable:
        from knowstream.infra.services import start_beam

        runners["portable"] = start_beam(base, free_port(), free_port())
    rows = []
    try:
        for name, beam_args in runners.items():
            for attempt in range(args.repeat):
                settings = base.model_copy(update={"beam_args": beam_args})
                url = staging_store.batch_url(settings)
                t0, cpu0 = time.perf_counter(), time.process_time()
                result = run_batch(settings, records, known={}, model="bench", staging=url)
                wall = time.perf_counter() - t0
                staging_store.remove(settings, url)
                row = {
                    "runner": name,
                    "beam_args": beam_args,
                    "attempt": attempt,
                    "docs": len(docs),
                    "upserts": result.staged.upserts,
                    "chunks": len(result.staged.chunks),
                    "wall_s": round(wall, 2),
                    "driver_cpu_s": round(time.process_time() - cpu0, 2),
                    "docs_per_s": round(len(docs) / wall, 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if args.portable:
            from knowstream.infra.services import stop_beam

            stop_beam(base)
    result = {
        **run_header("runners", started, load_before, ["apache-beam", "torch"]),
        "n": len(docs),
        "runs": rows,
    }
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
