"""The versioned store's behaviour, run on both backends behind ``connectors/qdrant``.

``edge`` is qdrant-edge (the embedded default); ``local`` is qdrant-client's local
mode, which stands in for a Qdrant server (``--qdrant-url`` runs the same
``ClientStore`` code against a server). Batches are synthetic but real: staged
rows written to Parquet and read back as the pipeline does (``bench/publish.py``),
published through ``Memory`` with MLflow on SQLite.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bench.publish import Synth
from knowstream.connectors.qdrant import (
    Filter,
    close_clients,
    open_store,
    purge_version,
    visible,
    write_version,
)
from knowstream.connectors.qdrant._client import INDEXED
from knowstream.memory import Memory
from knowstream.schemas.staged import StagedBatch
from knowstream.settings import Settings


@pytest.fixture(params=["edge", "local"])
def memory(request, tmp_path):
    settings = Settings(home=tmp_path / "home", qdrant_embedded=request.param)
    yield Memory(settings)
    close_clients()


def publish(memory: Memory, batch: StagedBatch, parent: int | None) -> int:
    info = memory.publish(
        batch, parent=parent, kind="ingest", offsets=[], model_versions={}, make_live=True
    )
    return info.version


def deletes(doc_ids: list[str], when) -> StagedBatch:
    docs = [
        {"doc_id": d, "op": "delete", "content_hash": "", "published_at": when, "title": ""}
        for d in doc_ids
    ]
    return StagedBatch(docs=docs)


def test_versions_see_their_own_lineage(memory, tmp_path):
    synth = Synth(0, tmp_path / "staging")
    v1 = publish(memory, synth.batch(["a", "b", "c"]), None)
    before = memory.view(v1).digest()
    v2 = publish(memory, synth.batch(["a", "d"]), v1)  # replaces a, adds d
    v3 = publish(memory, deletes(["b"], synth.clock), v2)
    side = publish(memory, synth.batch(["e"]), v1)  # a side line on v1

    assert sorted(memory.view(v1).docs()) == ["a", "b", "c"]
    assert sorted(memory.view(v2).docs()) == ["a", "b", "c", "d"]
    assert sorted(memory.view(v3).docs()) == ["a", "c", "d"]
    assert sorted(memory.view(side).docs()) == ["a", "b", "c", "e"]
    assert memory.view(v3).docs(kind="tombstone").keys() == {"b"}
    # A snapshot is never mutated: v1 reads the same after three more publishes.
    assert memory.view(v1).digest() == before
    hashes = [memory.view(v).docs(["a"])["a"]["content_hash"] for v in (v1, v2)]
    assert hashes[0] != hashes[1]
    # Counts and chunks follow the version too.
    counts = {v: memory.view(v).counts()["docs"] for v in (v1, v2, v3, side)}
    assert counts == {v1: 3, v2: 4, v3: 3, side: 4}
    assert memory.view(v3).chunks("b") == [] and memory.view(v1).chunks("b")


def test_search_returns_only_visible_chunks(memory, tmp_path):
    synth = Synth(1, tmp_path / "staging")
    first = synth.batch(["a", "b"])
    v1 = publish(memory, first, None)
    v2 = publish(memory, synth.batch(["a"]), v1)
    old_chunk = next(c for c in first.chunks if c["doc_id"] == "a")
    # The exact vector of a's old chunk: v1 finds it first, v2 must not see it at all.
    hits1 = memory.view(v1).search(old_chunk["embedding"], k=3)
    assert hits1[0].chunk_id == old_chunk["chunk_id"] and hits1[0].score > 0.99
    hits2 = memory.view(v2).search(old_chunk["embedding"], k=50)
    assert old_chunk["chunk_id"] not in {h.chunk_id for h in hits2}
    assert {h.doc_id for h in hits2} == {"a", "b"}


def test_purge_restores_the_parent_exactly(memory, tmp_path):
    synth = Synth(2, tmp_path / "staging")
    v1 = publish(memory, synth.batch(["a", "b"]), None)
    before, points = memory.view(v1).digest(), memory.store.count()
    lineage = memory.registry.lineage(v1)
    write_version(memory.store, 99, lineage, synth.batch(["a", "c"]))
    assert memory.store.count(Filter({"closed_in": [99]})) > 0
    purge_version(memory.store, 99)
    assert memory.store.count() == points
    assert memory.store.count(Filter({"closed_in": [99]})) == 0
    assert memory.view(v1).digest() == before


def test_reopened_store_serves_the_same_memory(memory, tmp_path):
    synth = Synth(3, tmp_path / "staging")
    v1 = publish(memory, synth.batch(["a", "b", "c"]), None)
    v2 = publish(memory, synth.batch(["b"]), v1)
    digests = [memory.view(v).digest() for v in (v1, v2)]
    close_clients()
    reopened = Memory(memory.settings)
    assert [reopened.view(v).digest() for v in (v1, v2)] == digests


HOLD = """
import sys
from knowstream.connectors.qdrant import StoreHeld, open_store
from knowstream.settings import Settings
try:
    open_store(Settings(home=sys.argv[1], qdrant_embedded=sys.argv[2]))
except StoreHeld as e:
    print(e)
"""


def test_second_process_gets_one_line_naming_the_holder(memory):
    memory.open_store()
    out = subprocess.run(
        [sys.executable, "-c", HOLD, str(memory.settings.home), memory.settings.qdrant_embedded],
        capture_output=True,
        text=True,
        timeout=120,
    )
    where = memory.settings.qdrant_location.resolve()
    assert out.stdout.count("\n") == 1, out
    line = out.stdout.strip()
    assert line.startswith(f"the store at {where} is held by process ")
    assert "--qdrant-url" in line and "knowstream serve" in line


def test_edge_indexes_every_filtered_field(tmp_path):
    store = open_store(Settings(home=tmp_path / "home"))
    try:
        assert set(INDEXED) <= set(store._shard.info().payload_schema)
    finally:
        close_clients()


def line_of_versions(memory: Memory, synth: Synth, n: int) -> list[int]:
    """``n`` versions on one line: a start, then replacements, a new doc and a delete."""
    versions = [publish(memory, synth.batch(["a", "b", "c"]), None)]
    for i in range(1, n):
        batch = deletes(["c"], synth.clock) if i == 2 else synth.batch(["a", f"n{i}"])
        versions.append(publish(memory, batch, versions[-1]))
    return versions


def same_content(memory: Memory, a: int, b: int) -> bool:
    """Versions a and b serve the same points: payloads equal, vectors to 1e-6."""

    def content(version: int) -> dict:
        out = {}
        lineage = memory.registry.lineage(version)
        for p in memory.store.scroll(visible(lineage), with_vectors=True):
            payload = {k: v for k, v in p.payload.items() if k not in ("version_from", "closed_in")}
            key = (payload["kind"], payload.get("chunk_id") or payload["doc_id"])
            out[key] = (payload, p.vector)
        return out

    ca, cb = content(a), content(b)
    return ca.keys() == cb.keys() and all(
        ca[k][0] == cb[k][0]
        and (ca[k][1] is cb[k][1] or np.allclose(ca[k][1], cb[k][1], rtol=0, atol=1e-6))
        for k in ca
    )


def test_compaction_folds_a_line_into_a_root_with_the_same_digest(memory, tmp_path):
    synth = Synth(4, tmp_path / "staging")
    line = line_of_versions(memory, synth, 4)
    digests = {v: memory.view(v).digest() for v in line}
    root = memory.compact()  # live: the end of the line
    assert root.parent is None and root.kind == "compact"
    assert memory.registry.live() == root.version
    assert memory.registry.lineage(root.version) == [root.version]
    assert same_content(memory, root.version, line[-1])
    if memory.settings.qdrant_embedded == "edge":  # local mode renormalizes vectors by an ulp
        assert memory.view(root.version).digest() == digests[line[-1]]
    assert memory.view(root.version).docs(kind="tombstone").keys() == {"c"}
    # The old line is untouched and readable until retired.
    assert {v: memory.view(v).digest() for v in line} == digests
    after = publish(memory, synth.batch(["b"]), root.version)
    assert memory.registry.lineage(after) == [after, root.version]
    assert sorted(memory.view(after).docs()) == sorted(memory.view(line[-1]).docs())


def test_retention_retires_what_no_kept_version_needs_and_frees_its_points(memory, tmp_path):
    synth = Synth(5, tmp_path / "staging")
    line = line_of_versions(memory, synth, 4)
    root = memory.compact().version
    after = publish(memory, synth.batch(["b"]), root)
    kept = {v: memory.view(v).digest() for v in (root, after)}
    # Everything was live within the last day: a 1-day policy keeps it all.
    assert memory.retain(keep_last=1, live_days=1) == []
    # Keep the last 2 and what was live in the last 0 days (live itself): the old line goes.
    assert memory.retain(keep_last=2, live_days=0) == line
    assert memory.store.count(Filter({"version_from": line})) == 0
    assert memory.store.count() == memory.store.count(Filter({"version_from": [root, after]}))
    assert {v: memory.view(v).digest() for v in (root, after)} == kept
    with pytest.raises(LookupError, match="retired"):
        memory.view(line[0])
    assert {r["version"]: r["state"] for r in memory.history()}[line[0]] == "retired"


def test_maintain_applies_the_configured_policy(memory, tmp_path):
    memory.settings = memory.settings.model_copy(
        update={"compact_after": 3, "retain_last": 1, "retain_live_days": 0}
    )
    synth = Synth(6, tmp_path / "staging")
    line = line_of_versions(memory, synth, 3)
    # A line of 3 is not longer than 3, and the last version needs all of it.
    assert memory.maintain() == {"retired": []}
    line.append(publish(memory, synth.batch(["a"]), line[-1]))
    done = memory.maintain()
    root = memory.registry.live()
    assert done == {"compacted": root, "retired": line}  # the root needs none of them
    assert memory.registry.lineage(root) == [root]


def indexing(memory: Memory) -> Memory:
    """The same memory with a 1 KB indexing threshold: an index step after a publish
    builds HNSW over anything written, and searches at a version that sees most points
    go through the graph (qdrant-edge; a no-op step on the other backend)."""
    return Memory(memory.settings.model_copy(update={"qdrant_index_kb": 1}))


def reads(memory: Memory, versions: list[int], queries: list[list[float]]) -> dict:
    """Everything a reader gets from these versions: search hits (ids, rounded scores),
    documents, tombstones, counts and the content digest."""
    out = {}
    for v in versions:
        view = memory.view(v)
        out[v] = {
            "hits": [
                [(h.chunk_id, round(h.score, 5)) for h in view.search(q, k=8)] for q in queries
            ],
            "docs": {d: p["content_hash"] for d, p in view.docs().items()},
            "tombstones": sorted(view.docs(kind="tombstone")),
            "counts": view.counts(),
            "digest": view.digest(),
        }
        if memory.settings.qdrant_embedded == "local":  # its reload renormalizes by an ulp,
            out[v]["digest"] = ""  # which can flip the digest's 5th decimal
    return out


def test_reads_are_the_same_after_each_index_step(memory, tmp_path):
    memory = indexing(memory)
    synth = Synth(7, tmp_path / "staging")
    first = synth.batch([f"d{i}" for i in range(40)])
    v1 = publish(memory, first, None)
    queries = [c["embedding"] for c in first.chunks[:6]] + [synth._unit() for _ in range(4)]
    before = reads(memory, [v1], queries)
    done = memory.maintain()
    edge = memory.settings.qdrant_embedded == "edge"
    if edge:
        assert done == {"indexed": True} and memory.store.indexed() > 0  # type: ignore[attr-defined]
    assert reads(memory, [v1], queries) == before
    # Replace and delete documents whose points now sit in indexed segments.
    v2 = publish(memory, synth.batch(["d0", "d1", "new"]), v1)
    v3 = publish(memory, deletes(["d2"], synth.clock), v2)
    unindexed = reads(memory, [v1, v2, v3], queries)
    memory.maintain()
    assert reads(memory, [v1, v2, v3], queries) == unindexed
    gone = {"d0": (v2, v3), "d1": (v2, v3), "d2": (v3,)}  # replaced in v2, deleted in v3
    for c in (c for c in first.chunks if c["doc_id"] in gone):
        # v1 finds the old chunk first; the versions that replaced or deleted it never do.
        assert memory.view(v1).search(c["embedding"], k=1)[0].chunk_id == c["chunk_id"]
        for v in gone[c["doc_id"]]:
            hits = memory.view(v).search(c["embedding"], k=60)
            assert c["chunk_id"] not in {h.chunk_id for h in hits}
            if v == v3 and c["doc_id"] == "d2":  # deleted: no chunk of it at all
                assert "d2" not in {h.doc_id for h in hits}
    # A version that was never published is purged exactly after its points were indexed.
    write_version(memory.store, 99, memory.registry.lineage(v3), synth.batch(["d3", "d4"]))
    memory.maintain()
    purge_version(memory.store, 99)
    assert reads(memory, [v1, v2, v3], queries) == unindexed
    # Compaction indexes its copies in steps; the root reads like the line's end.
    root = memory.compact().version
    tail = reads(memory, [v3], queries)[v3]
    assert reads(memory, [root], queries)[root] == tail
    assert reads(memory, [v1, v2, v3], queries) == unindexed


def test_an_indexed_store_reopens_with_its_index_and_the_same_reads(memory, tmp_path):
    memory = indexing(memory)
    synth = Synth(8, tmp_path / "staging")
    first = synth.batch([f"d{i}" for i in range(30)])
    v1 = publish(memory, first, None)
    memory.maintain()
    v2 = publish(memory, synth.batch(["d0", "x"]), v1)  # left unindexed
    queries = [c["embedding"] for c in first.chunks[:5]]
    expected = reads(memory, [v1, v2], queries)
    indexed = memory.store.indexed() if memory.settings.qdrant_embedded == "edge" else 0  # type: ignore[attr-defined]
    close_clients()
    reopened = Memory(memory.settings)
    assert reads(reopened, [v1, v2], queries) == expected
    if reopened.settings.qdrant_embedded == "edge":
        assert reopened.store.indexed() == indexed > 0  # type: ignore[attr-defined]
        reopened.maintain()  # indexes what v2 wrote
        assert reopened.store.indexed() > indexed  # type: ignore[attr-defined]
    assert reads(reopened, [v1, v2], queries) == expected


def test_asking_keeps_the_process_torch_threads(memory, tmp_path):
    """/ask encodes its question on Settings.torch_threads and restores the process's
    setting after (the LM of mac modes may use more)."""
    import torch

    from knowstream.query import query

    synth = Synth(9, tmp_path / "staging")
    publish(memory, synth.batch(["a", "b"]), None)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = query(memory, "what is in the river city", k=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(result.hits) == 2 and set(result.docs) <= {"a", "b"}
