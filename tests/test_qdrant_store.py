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

import pytest

from bench.publish import Synth
from knowstream.connectors.qdrant import (
    Filter,
    close_clients,
    open_store,
    purge_version,
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
