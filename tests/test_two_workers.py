"""Two ingest workers in one consumer group (issue 3: monotonic, single-writer versions).

Real parts only: the session's tansu broker (a topic with 2 partitions), one embedded
Qdrant store and one MLflow SQLite store shared by both workers, Prefect's local API.
The embedded store allows one process, so the workers are two threads of
this process, each running the real ``ingest_flow`` with its own consumer and its
own ``Memory``: they meet only where two processes against a Qdrant server would,
at the broker (group membership, offsets), the registry (``live``, version numbers)
and the per-home publish lock.

The second worker starts once the first has published: it joins a group whose only
member is busy with a batch (a real rebalance, as when a worker is added), and it
starts the Prefect API no later than the first (two first flow runs at once race
on Prefect's database migrations, a Prefect matter unrelated to ingest). Batches
of 3 on both workers make them publish against each other all the time, so
compare-and-set losses (``ingest.cas_reruns``) are likely but not forced.
"""

from __future__ import annotations

import faulthandler
import json
import sys
import threading
from collections import Counter
from pathlib import Path

from knowstream.connectors.kafka import committed_offsets, produce_file, read_range
from knowstream.connectors.qdrant import Filter, visible
from knowstream.flows.ingest import ingest_flow
from knowstream.memory import Memory

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "stream.jsonl"
N_DOCS = 24
BATCH = 3
HANG_S = 600  # only a hang guard (threads dumped), not a timing assertion


def test_two_workers_share_partitions_and_publish_one_line_of_versions(memory_settings, tmp_path):
    settings = memory_settings.model_copy(
        update={"partitions": 2, "max_batch_messages": BATCH, "retry_base_s": 0.2}
    )
    events = [json.loads(x) for x in SAMPLE.read_text(encoding="utf-8").splitlines()[:N_DOCS]]
    for e in events:
        e["text"] = e["text"][:300]  # keeps the CPU pipeline quick
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    produce_file(settings, path)  # keyed by doc id: both partitions get documents
    ends: dict[int, int] = {}
    for r in read_range(settings, settings.topic):
        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
    assert sorted(ends) == [0, 1]

    results: dict[str, object] = {}
    first_published = threading.Event()

    def worker(name: str) -> None:
        try:
            results[name] = ingest_flow(
                settings, once=True, on_batch=lambda report: first_published.set()
            )
        except BaseException as e:  # reported by the assertions below
            results[name] = e

    a = threading.Thread(target=worker, args=("a",), name="worker-a", daemon=True)
    b = threading.Thread(target=worker, args=("b",), name="worker-b", daemon=True)
    a.start()
    first_published.wait(HANG_S)
    b.start()
    for t in (a, b):
        t.join(HANG_S)
    if a.is_alive() or b.is_alive():
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        raise AssertionError("an ingest worker did not finish; thread stacks are on stderr")
    for name in ("a", "b"):
        assert not isinstance(results[name], BaseException), (name, results[name])
    reports = {name: results[name] for name in ("a", "b")}

    # Both workers got partitions (and between them read all of them).
    partitions = {n: {o.partition for r in rs for o in r.offsets} for n, rs in reports.items()}
    assert partitions["a"] and partitions["b"], partitions
    assert partitions["a"] | partitions["b"] == {0, 1}

    # Versions: one line, strictly increasing, no number used twice, none pending.
    memory = Memory(settings)
    versions = memory.registry.versions()
    assert [v.state for v in versions] == ["published"] * len(versions), versions
    live = memory.registry.live()
    line = memory.registry.lineage(live)[::-1]  # oldest first
    assert line == sorted(set(line)), line
    assert line == [v.version for v in versions]  # no side line: no update was dropped
    assert all(v.parent == (line[i - 1] if i else None) for i, v in enumerate(versions))
    published = {n: [r.version for r in rs if r.version is not None] for n, rs in reports.items()}
    assert published["a"] and published["b"], published
    for mine in published.values():
        assert mine == sorted(set(mine))  # a worker's versions never go backwards
    assert sorted(published["a"] + published["b"]) == line  # each number once

    # Every document live exactly once, and written exactly once in the whole store.
    ids = Counter(e["doc_id"] for e in events)
    live_docs = Counter(p.payload["doc_id"] for p in memory.store.scroll(visible(line, kind="doc")))
    assert live_docs == ids
    stored = Counter(p.payload["doc_id"] for p in memory.store.scroll(Filter({"kind": ["doc"]})))
    assert stored == ids

    # Offsets: everything committed, nothing beyond.
    assert committed_offsets(settings, settings.group_id) == ends
    reruns = sum(r.counters.get("ingest.cas_reruns", 0) for rs in reports.values() for r in rs)
    print(f"two workers: {partitions=} {published=} compare-and-set reruns={reruns}")
