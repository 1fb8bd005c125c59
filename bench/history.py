"""Publish and /ask against history: after 10 versions on one line, after many, and after
compacting that line into a root.

    .venv/bin/python bench/history.py --docs 1000 --versions 10,1000 \
        --out bench/results/history-10-1000.json

How (the parts and the synthetic batches of ``bench/publish.py``, qdrant-edge by default):
a memory of ``--docs`` documents in one version, then a line of small versions on top of it
(``--step`` docs each: half replacing held docs, half new). When the line is 10 (and then
each further count in ``--versions``) versions long, the measurements of ``bench/publish.py``
run there: a 100-doc publish on the line's end (3 times, rolled back each time), the dedup
lookup, search and ``/ask`` in evidence mode. Last, the line is compacted
(``Memory.compact``) and the same is measured on the root. A version's filter lists its
lineage, so without compaction its cost grows with the line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # as in bench/publish.py: the root after an installed knowstream
    sys.path.append(str(ROOT))
from bench._common import run_header, timed_call, write_result  # noqa: E402
from bench.publish import (  # noqa: E402
    VERSIONED_PACKAGES,
    Synth,
    bench_settings,
    console,
    grow,
    index_step,
    measure,
    publish,
    render,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--docs", type=int, default=1000, help="documents in the memory")
    ap.add_argument("--versions", default="10,1000", help="line lengths to measure at")
    ap.add_argument("--step", type=int, default=2, help="docs per version of the line")
    ap.add_argument("--embedded", choices=["edge", "local"], default="edge")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ask", type=int, default=40, help="/ask calls timed per measurement")
    ap.add_argument("--out", type=Path, default=Path("bench/results/history.json"))
    args = ap.parse_args(argv)
    lengths = sorted(int(v) for v in args.versions.split(","))

    from knowstream.connectors.qdrant import close_clients
    from knowstream.memory import Memory

    home = Path(tempfile.mkdtemp(prefix="knowstream-history-")).resolve()
    started, load_before = datetime.now(UTC), os.getloadavg()
    memory = Memory(bench_settings(home, None, args.embedded))
    synth = Synth(args.seed, home / "staging")
    held: list[str] = []
    points: list[dict] = []
    line_s: list[float] = []  # each small publish of the line, in order
    try:
        build = grow(memory, synth, held, args.docs, args.docs)
        line = 1
        for length in lengths:
            while line < length:
                picked = synth.rng.choice(held, size=args.step // 2, replace=False)
                replaced = [str(x) for x in picked]
                new = [f"line-{line}-{i}" for i in range(args.step - len(replaced))]
                held += new
                live = memory.registry.live()
                _, seconds = timed_call(
                    lambda r=replaced, n=new, p=live: publish(memory, synth.batch([*r, *n]), p)
                )
                line_s.append(seconds)
                index_step(memory)  # as ingest runs after each publish (not timed in it)
                line += 1
            at = measure(
                memory,
                synth,
                held,
                batch_docs=100,
                repeats=args.repeats,
                replace_fraction=0.5,
                questions=args.ask,
            )
            points.append({"line_versions": length, **at})
        root, compact_s = timed_call(lambda: memory.compact())
        at = measure(
            memory,
            synth,
            held,
            batch_docs=100,
            repeats=args.repeats,
            replace_fraction=0.5,
            questions=args.ask,
        )
        points.append({"line_versions": 1, "compacted_from": root.version, **at})
    finally:
        close_clients()
    result = {
        **run_header("history", started, load_before, VERSIONED_PACKAGES),
        "qdrant": {"edge": "qdrant-edge", "local": "local mode"}[args.embedded],
        "docs": args.docs,
        "step": args.step,
        "batch": 100,
        "repeats": args.repeats,
        "build_batch": args.docs,
        "build": build,
        "line_publish_s": line_s,
        "compact_s": compact_s,
        "sizes": points,
    }
    for p in points:  # render() labels columns by "docs": say the line length there instead
        p["docs"] = f"line {p['line_versions']}" if "compacted_from" not in p else "compacted"
    render(result)
    console.print(f"compaction of the {lengths[-1]}-version line: {compact_s:.1f} s")
    write_result(args.out, result)
    shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
