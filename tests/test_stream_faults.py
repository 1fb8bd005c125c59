"""Nothing stalls the stream (issue 8), end to end against the real broker and stores:
oversized messages, a failure after the publish, errors that retrying cannot fix.

The per-stage faults (a document that makes chunk, embed, triples or amortize
raise) are tested with the stages; the signal tests are in ``test_stop.py``.
"""

from __future__ import annotations

import json
import shutil

import pytest
from kafka import KafkaProducer
from typer.testing import CliRunner

from knowstream.cli import app
from knowstream.connectors.kafka import (
    BatchConsumer,
    committed_offsets,
    count_messages,
    ensure_topics,
    read_range,
    send_dead_letters,
)
from knowstream.connectors.qdrant import close_clients
from knowstream.flows.batch import process_batch
from knowstream.flows.ingest import ingest_flow
from knowstream.health import read_health
from knowstream.memory import Memory
from knowstream.models.inference import bundled_checkpoint
from knowstream.settings import Settings
from tests.test_memory_e2e import sample_events
from tests.test_outages import FAST_RETRY


def produce(settings: Settings, messages: list[tuple[str | None, bytes]]) -> None:
    """Messages as they are, up to 60 MB (the broker takes them; the producer's
    default limit is 1 MiB)."""
    ensure_topics(settings, [settings.topic, settings.dlq_topic], settings.partitions)
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", max_request_size=60_000_000
    )
    for key, value in messages:
        producer.send(settings.topic, key=key and key.encode(), value=value).get(timeout=60)
    producer.close()


def event(e: dict) -> tuple[str, bytes]:
    return e["doc_id"], json.dumps(e).encode()


def dead_letters(settings: Settings) -> list[dict]:
    return [json.loads(r.value or b"") for r in read_range(settings, settings.dlq_topic)]


def test_oversized_messages_are_dead_lettered_once_and_the_stream_goes_on(memory_settings):
    settings = memory_settings
    e = sample_events(4)
    big = [
        json.dumps({"doc_id": f"big-{n}", "text": "x" * n}).encode() for n in (5 << 20, 50 << 20)
    ]
    produce(
        settings, [event(e[0]), ("big-5", big[0]), event(e[1]), ("big-50", big[1]), event(e[2])]
    )

    reports = ingest_flow(settings, once=True)
    assert sum(r.messages for r in reports) == 5
    assert committed_offsets(settings, settings.group_id) == {0: 5}
    memory = Memory(settings)
    assert sorted(memory.view().docs()) == sorted(x["doc_id"] for x in e[:3])
    letters = dead_letters(settings)
    assert [(x["source"]["offset"], x["reason"], x["truncated"]) for x in letters] == [
        (1, "too_large", True),
        (3, "too_large", True),
    ]
    assert [x["value_bytes"] for x in letters] == [len(b) for b in big]

    # A rerun finds nothing left; the next message is ingested as usual.
    assert ingest_flow(settings, once=True) == []
    produce(settings, [event(e[3])])
    (report,) = ingest_flow(settings, once=True)
    assert report.version == memory.registry.live() and "Oxygen_0" in str(memory.view().docs())
    assert count_messages(settings, settings.dlq_topic) == 2


def test_a_failure_after_the_publish_resumes_instead_of_publishing_again(memory_settings):
    """The state a failure after the publish leaves behind, built with the real
    steps: the batch published (but ``live`` not moved yet), its dead letter sent,
    its offsets not committed. The next ingest must finish that batch (move live,
    commit) without building or publishing it again and without a second dead
    letter, then go on with what came after it."""
    settings = memory_settings
    e = sample_events(4)
    produce(settings, [event(x) for x in e[:3]] + [(None, b"not json")])
    memory = Memory(settings)
    with BatchConsumer(settings) as consumer:
        records = consumer.poll_batch()
        report = process_batch(
            settings, memory, records, parent=None, kind="ingest", make_live=False
        )
        send_dead_letters(settings, report.dead_letters)
    assert (report.version, memory.registry.live()) == (1, None)
    assert committed_offsets(settings, settings.group_id) == {}
    produce(settings, [event(e[3])])  # the redelivery brings one more message

    reports = ingest_flow(settings, once=True)
    assert [(r.messages, r.version, r.counters.get("ingest.resumed")) for r in reports] == [
        (4, 1, 1),
        (1, 2, None),
    ]
    assert [(v.version, v.parent, v.state) for v in memory.registry.versions()] == [
        (1, None, "published"),
        (2, 1, "published"),
    ]
    assert memory.registry.live() == 2
    assert committed_offsets(settings, settings.group_id) == {0: 5}
    assert sorted(memory.view().docs()) == sorted(x["doc_id"] for x in e)
    assert [(x["source"]["offset"], x["reason"]) for x in dead_letters(settings)] == [
        (3, "invalid_json")
    ]


def test_a_missing_registry_model_fails_the_worker_fast_with_the_reason(memory_settings, tmp_path):
    settings = memory_settings
    produce(settings, [event(sample_events(1)[0])])
    args = ["--home", str(settings.home), "--bootstrap-servers", settings.bootstrap_servers]
    args += ["--topic", settings.topic]
    env = {
        "KNOWSTREAM_GROUP_ID": settings.group_id,
        "KNOWSTREAM_AMORTIZER": "models:/no-such-amortizer@live",
        "COLUMNS": "300",
    }
    runner = CliRunner()
    result = runner.invoke(app, [*args, "ingest"], env=env, catch_exceptions=False)  # continuous
    assert result.exit_code == 1
    # One line naming the fix, not an "unexpected" error.
    line = next(x for x in result.output.splitlines() if x.startswith("error: "))
    assert "no-such-amortizer" in line and "KNOWSTREAM_AMORTIZER=bundled" in line
    assert "unexpected" not in line
    health = read_health(settings)
    assert health["state"] == "failed" and "no-such-amortizer" in health["reason"]
    assert health["transient"] is False
    status = runner.invoke(app, [*args, "status"], env=env, catch_exceptions=False).output
    assert '"state": "failed"' in status and "no-such-amortizer" in status
    assert committed_offsets(settings, settings.group_id) == {}
    close_clients()
    assert Memory(settings).registry.versions() == []


def test_an_error_retrying_cannot_fix_stops_the_worker_after_the_configured_attempts(
    memory_settings, tmp_path
):
    """A corrupt amortizer checkpoint fails every batch the same way: continuous
    ingest gives it ``retry_attempts`` tries, then stops as failed (it used to
    retry forever)."""
    corrupt = tmp_path / "corrupt-checkpoint"
    corrupt.mkdir()
    shutil.copy(bundled_checkpoint() / "config.json", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    settings = memory_settings.model_copy(
        update={"amortizer": str(corrupt), "retry_attempts": 2, **FAST_RETRY}
    )
    produce(settings, [event(sample_events(1)[0])])
    with pytest.raises(Exception) as failed:  # noqa: PT011 - whatever safetensors raises
        ingest_flow(settings, once=False)
    health = read_health(settings)
    assert health["state"] == "failed" and health["transient"] is False
    assert health["reason"].startswith(type(failed.value).__name__)
    assert committed_offsets(settings, settings.group_id) == {}
    assert Memory(settings).registry.versions() == []
