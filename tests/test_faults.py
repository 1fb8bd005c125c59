"""Per-document fault isolation, end to end: tansu -> Prefect ingest -> Beam -> Qdrant + MLflow.

A failpoint (``Settings.failpoints``) makes one document raise inside a stage's real code
path; the document must be dead-lettered with its stage named, none of its rows published,
and its batch neighbours published, in ``--once`` and in continuous ingestion.
"""

from __future__ import annotations

import json

import pytest

from knowstream.connectors.kafka import committed_offsets, produce_file, read_range
from knowstream.flows.ingest import ingest_flow
from knowstream.memory import Memory
from knowstream.models.inference import load_amortizer
from tests.test_memory_e2e import fresh, sample_events, write_jsonl

STAGES = ["chunk", "embed", "triples", "amortize"]


def dlq_bodies(settings) -> list[dict]:
    return [json.loads(r.value) for r in read_range(settings, settings.dlq_topic, None, None)]


def assert_published_whole(memory: Memory, version: int, events: list[dict]) -> None:
    """Each event's document is in ``version`` with its content, chunks, triples and entry."""
    view = memory.view(version)
    docs = view.docs([e["doc_id"] for e in events])
    modulations = view.modulations([e["doc_id"] for e in events])
    entry_shape = load_amortizer(memory.settings.amortizer).config.entry_shape
    for e in events:
        chunks = view.chunks(e["doc_id"])
        assert chunks and all(c["text"] in e["text"] for c in chunks)
        assert docs[e["doc_id"]]["triples"]
        assert modulations[e["doc_id"]].to_array().shape == entry_shape


def assert_absent(memory: Memory, version: int, doc_id: str) -> None:
    view = memory.view(version)
    assert doc_id not in view.docs()
    assert not view.chunks(doc_id) and not view.modulations([doc_id])


@pytest.mark.parametrize("stage", STAGES)
def test_a_document_failing_in_a_stage_is_dead_lettered_and_its_batch_publishes(
    broker, tmp_path, stage
):
    events = sample_events(3)
    faulty = events[1]["doc_id"]
    settings = fresh(broker, tmp_path).model_copy(update={"failpoints": {stage: [faulty]}})
    produce_file(settings, write_jsonl(tmp_path / "docs.jsonl", events))

    reports = ingest_flow(settings, once=True)

    assert [r.version for r in reports] == [1]
    [letter] = reports[0].dead_letters
    assert {k: letter[k] for k in ("offset", "doc_id", "stage", "error", "reason")} == {
        "offset": 1,
        "doc_id": faulty,
        "stage": stage,
        "error": "InjectedFault",
        "reason": "stage_error",
    }
    assert letter["detail"] == f"failpoint: {stage} fails for {faulty}"
    # The message as it was received: replayable from the dead letter alone.
    assert letter["key"] == faulty.encode() and json.loads(letter["value"]) == events[1]
    assert reports[0].counters[f"{stage}.failed"] == 1
    [body] = dlq_bodies(settings)
    assert (body["stage"], body["error"], body["doc_id"]) == (stage, "InjectedFault", faulty)
    assert body["source"] == {"topic": settings.topic, "partition": 0, "offset": 1}
    assert json.loads(body["value"]) == events[1]

    memory = Memory(settings)
    assert_published_whole(memory, 1, [events[0], events[2]])
    assert_absent(memory, 1, faulty)
    assert memory.registry.manifest(1).counts["docs"] == 2
    assert committed_offsets(settings, settings.group_id) == {0: 3}  # nothing redelivered


def test_continuous_ingest_isolates_a_failure_in_every_stage_and_goes_on(broker, tmp_path):
    events = sample_events(6)
    ids = [e["doc_id"] for e in events]
    failpoints = dict(zip(STAGES, ([i] for i in ids), strict=False))  # the first four fail
    settings = fresh(broker, tmp_path).model_copy(update={"failpoints": failpoints})
    later = [
        {
            **events[1],
            "text": events[1]["text"] + " Updated.",
            "published_at": "2020-01-01T00:00:00Z",
        },
        sample_events(7)[6],
    ]
    produce_file(settings, write_jsonl(tmp_path / "first.jsonl", events))

    def next_batch(report) -> None:
        if report.version == 1:  # the stream goes on after a batch with four failures
            produce_file(settings, write_jsonl(tmp_path / "second.jsonl", later))

    reports = ingest_flow(
        settings, once=False, max_batches=2, idle_sleep_s=0.2, on_batch=next_batch
    )

    assert [r.version for r in reports] == [1, 2]
    letters = [(x["doc_id"], x["stage"]) for r in reports for x in r.dead_letters]
    assert sorted(letters) == sorted(
        [*((ids[i], s) for i, s in enumerate(STAGES)), (ids[1], "embed")]
    )
    assert sorted((b["doc_id"], b["stage"]) for b in dlq_bodies(settings)) == sorted(letters)

    memory = Memory(settings)
    assert_published_whole(memory, 1, events[4:])
    assert_published_whole(memory, 2, [*events[4:], later[1]])
    for doc_id in ids[:4]:
        assert_absent(memory, 2, doc_id)
    assert committed_offsets(settings, settings.group_id) == {0: 8}
