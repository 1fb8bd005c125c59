"""End to end on real parts: tansu -> Prefect ingest flow -> Beam -> Qdrant local + MLflow SQLite.

One module-scoped memory is built once (version 1 from sample documents, version 2
from updates, deletes and malformed messages); most tests read it. Tests that
need their own state (replays, failures, backfills) build their own.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from knowstream.connectors.kafka import (
    committed_offsets,
    count_messages,
    produce_file,
    read_range,
)
from knowstream.connectors.qdrant import close_clients
from knowstream.flows.backfill import backfill_flow, promote_flow, rollback_flow
from knowstream.flows.ingest import ingest_flow
from knowstream.health import read_health
from knowstream.memory import Memory, PublishError, StaleParent
from knowstream.query import query
from knowstream.schemas.staged import StagedBatch

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
N_DOCS = 16  # sample documents in version 1: enough to retrieve among, quick to embed


def sample_events(n: int = N_DOCS) -> list[dict]:
    lines = (SAMPLE / "stream.jsonl").read_text(encoding="utf-8").splitlines()
    events = [json.loads(x) for x in lines]
    wanted = ["Super_Bowl_50_0", "Super_Bowl_50_2", "Black_Death_0", "Oxygen_0"]
    picked = [e for e in events if e["doc_id"] in wanted][:n]
    picked += [e for e in events if e["doc_id"] not in wanted][: n - len(picked)]
    return picked


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            f.write("\n")
    return path


def fresh(settings, tmp: Path):
    suffix = uuid.uuid4().hex[:8]
    close_clients()
    return settings.model_copy(
        update={"home": tmp / f"home-{suffix}", "topic": f"t-{suffix}", "group_id": f"g-{suffix}"}
    )


UPDATE = {
    "doc_id": "Super_Bowl_50_0",
    "op": "upsert",
    "title": "Super_Bowl_50",
    "text": "Super Bowl 50 was won by the Denver Broncos, who defeated the Carolina Panthers "
    "27–23 at Levi's Stadium in Santa Clara, California, on February 7, 2016.",
    "published_at": "2016-07-01T00:00:00Z",
}
DELETE = {"doc_id": "Black_Death_0", "op": "delete", "published_at": "2016-07-01T00:00:01Z"}
MALFORMED = [
    "this line is not JSON",
    json.dumps({"op": "upsert", "text": "no id"}),
    json.dumps({"doc_id": "x", "op": "patch", "text": "unknown op"}),
]


@pytest.fixture(scope="module")
def built(broker, tmp_path_factory):
    """A memory with version 1 (sample docs) and version 2 (update, delete, malformed)."""
    tmp = tmp_path_factory.mktemp("e2e")
    settings = fresh(broker, tmp)
    produce_file(settings, write_jsonl(tmp / "v1.jsonl", sample_events()))
    v1 = ingest_flow(settings, once=True)[-1].version
    memory = Memory(settings)
    before = query(memory, "What was the final score of Super Bowl 50?", k=3)
    produce_file(settings, write_jsonl(tmp / "v2.jsonl", [UPDATE, DELETE, *MALFORMED]))
    reports = ingest_flow(settings, once=True)
    return {
        "settings": settings,
        "memory": memory,
        "v1": v1,
        "v2": reports[-1].version,
        "report2": reports[-1],
        "before": before,
    }


def test_round_trip(built):
    memory, v1 = built["memory"], built["v1"]
    assert v1 == 1
    counts = memory.view(v1).counts()
    assert counts["docs"] == N_DOCS
    assert counts["chunks"] >= N_DOCS
    hit_docs = [h.doc_id for h in built["before"].hits]
    assert "Super_Bowl_50_0" in hit_docs
    assert any("24–10" in h.text for h in built["before"].hits)
    history = {r["version"]: r for r in memory.history()}
    assert history[1]["docs"] == N_DOCS and history[1]["state"] == "published"
    manifest = memory.registry.manifest(1)
    assert manifest.offsets[0].start == 0 and manifest.offsets[0].end == N_DOCS
    checksum = memory.registry.get(1).tags["content_checksum"]
    assert checksum and checksum == manifest.checksums["delta"]
    assert set(manifest.model_versions) == {"embedder", "amortizer", "chunker", "triples"}
    assert manifest.counts["triples"] > 0


def test_update_replaces_derived_data_and_old_version_keeps_it(built):
    memory, v1, v2 = built["memory"], built["v1"], built["v2"]
    assert v2 == 2 and memory.registry.live() == 2
    old, new = memory.view(v1), memory.view(v2)
    old_doc, new_doc = (
        old.docs(["Super_Bowl_50_0"])["Super_Bowl_50_0"],
        new.docs(["Super_Bowl_50_0"])["Super_Bowl_50_0"],
    )
    assert old_doc["content_hash"] != new_doc["content_hash"]
    assert "24–10" in " ".join(c["text"] for c in old.chunks("Super_Bowl_50_0"))
    new_text = " ".join(c["text"] for c in new.chunks("Super_Bowl_50_0"))
    assert "27–23" in new_text and "24–10" not in new_text
    assert old_doc["triples"] != new_doc["triples"]
    old_mod = old.modulations(["Super_Bowl_50_0"])["Super_Bowl_50_0"]
    new_mod = new.modulations(["Super_Bowl_50_0"])["Super_Bowl_50_0"]
    assert old_mod.checksum != new_mod.checksum
    assert new_mod.to_array().shape == old_mod.to_array().shape == tuple(old_mod.shape)
    result = query(memory, "What was the final score of Super Bowl 50?", k=3)
    assert result.version == 2 and any("27–23" in h.text for h in result.hits)


def test_delete_removes_everything_derived(built):
    memory, v1, v2 = built["memory"], built["v1"], built["v2"]
    lineage = memory.registry.lineage(v2)
    from knowstream.connectors.qdrant import visible

    left = [
        p.payload["kind"] for p in memory.store.scroll(visible(lineage, doc_ids=["Black_Death_0"]))
    ]
    assert left == ["tombstone"]  # no doc, chunk, triple or modulation left
    assert "Black_Death_0" not in memory.view(v2).docs()
    assert "Black_Death_0" in memory.view(v1).docs()
    assert memory.view(v2).counts()["docs"] == N_DOCS - 1


def test_malformed_messages_go_to_the_dlq_with_reasons(built):
    settings, report = built["settings"], built["report2"]
    reasons = sorted(letter["reason"] for letter in report.dead_letters)
    assert reasons == ["invalid_json", "missing_doc_id", "unknown_op"]
    dlq = read_range(settings, settings.dlq_topic, None, None)
    assert len(dlq) == 3
    bodies = [json.loads(r.value) for r in dlq]
    assert {b["reason"] for b in bodies} == set(reasons)
    assert all(b["source"]["topic"] == settings.topic for b in bodies)
    assert count_messages(settings, settings.dlq_topic) == 3


def test_rollback_restores_the_prior_answers_exactly(built):
    memory, settings = built["memory"], built["settings"]
    before = built["before"]
    rollback_flow(built["v1"], settings)
    try:
        after = query(memory, before.question, k=3)
        assert after.version == built["v1"]
        assert [(h.doc_id, h.chunk_id, h.text) for h in after.hits] == [
            (h.doc_id, h.chunk_id, h.text) for h in before.hits
        ]
        assert after.triples == before.triples
        # Version 2 is still there, readable and promotable.
        assert "27–23" in " ".join(c["text"] for c in memory.view(2).chunks("Super_Bowl_50_0"))
    finally:
        promote_flow(built["v2"], settings)
    assert memory.registry.live() == built["v2"]


def test_reingesting_the_same_stream_changes_nothing(built, tmp_path):
    settings, memory = built["settings"], built["memory"]
    produce_file(settings, write_jsonl(tmp_path / "again.jsonl", sample_events()[:4]))
    reports = ingest_flow(settings, once=True)
    assert [r.version for r in reports] == [None]  # nothing changed: no new version
    assert (
        reports[0].counters.get("dedup.unchanged", 0) + reports[0].counters.get("dedup.stale", 0)
        == 4
    )
    assert memory.registry.live() == built["v2"]


def test_same_stream_gives_the_same_snapshot_content(broker, tmp_path):
    digests = []
    for _ in range(2):
        settings = fresh(broker, tmp_path)
        produce_file(settings, write_jsonl(tmp_path / "s.jsonl", sample_events(6)))
        ingest_flow(settings, once=True)
        digests.append(Memory(settings).view().digest())
    close_clients()
    assert digests[0] == digests[1]


def test_backfill_leaves_live_alone_until_promoted(broker, tmp_path):
    settings = fresh(broker, tmp_path)
    produce_file(settings, write_jsonl(tmp_path / "b.jsonl", sample_events(6)))
    live = ingest_flow(settings, once=True)[-1].version
    memory = Memory(settings)
    live_digest = memory.view().digest()
    # Replay the first 3 offsets into a fresh line (base "none").
    report = backfill_flow(settings, start={0: 0}, end={0: 3}, base="none")
    side = report.version
    assert side is not None and side != live
    assert memory.registry.live() == live
    assert memory.view().digest() == live_digest
    assert len(memory.view(side).docs()) == 3
    assert memory.registry.get(side).parent is None
    promote_flow(side, settings)
    assert memory.registry.live() == side
    assert len(memory.view().docs()) == 3


def test_failed_publish_commits_no_offsets_and_publishes_nothing(broker, tmp_path):
    settings = fresh(broker, tmp_path).model_copy(update={"retry_attempts": 2, "retry_base_s": 0.1})
    produce_file(settings, write_jsonl(tmp_path / "f.jsonl", sample_events(3)))
    memory = Memory(settings)
    # A real failure after the data is written: the artifact store is unwritable
    # (a file stands where its folder must be).
    root = settings.artifact_root
    assert not root.exists()
    root.write_text("not a folder")
    with pytest.raises(PublishError):
        ingest_flow(settings, once=True)
    assert committed_offsets(settings, settings.group_id) in ({}, {0: 0})
    assert memory.registry.live() is None
    states = [v.state for v in memory.registry.versions()]
    assert states == ["abandoned", "abandoned"]  # each attempt failed cleanly
    health = read_health(settings)
    assert health["state"] == "failed" and "PublishError" in health["last_error"]
    assert memory.store.count() == 0  # purged
    # The store comes back; the same batch is redelivered and published.
    root.unlink()
    reports = ingest_flow(settings, once=True)
    assert reports[-1].version == 3 and memory.registry.live() == 3
    assert len(memory.view().docs()) == 3


def test_publish_on_a_stale_live_is_refused(built):
    """Compare-and-set: a batch built on an older live must not become live."""
    memory = built["memory"]
    live = memory.registry.live()
    before = len(memory.registry.versions())
    with pytest.raises(StaleParent):
        memory.publish(
            StagedBatch(),
            parent=live - 1,
            kind="ingest",
            offsets=[],
            model_versions={},
            make_live=True,
            require_live_parent=True,
        )
    assert memory.registry.live() == live and len(memory.registry.versions()) == before
