"""Dead letters on a real tansu broker: what they carry, that they always fit, that
each source record is dead-lettered once, and ``skip``."""

from __future__ import annotations

import json

from kafka import KafkaConsumer, TopicPartition
from typer.testing import CliRunner

from knowstream.cli import app
from knowstream.connectors.kafka import (
    EventProducer,
    committed_offsets,
    count_messages,
    ensure_topics,
    send_dead_letters,
)
from knowstream.schemas.event import dead_letter
from knowstream.settings import Settings

# What kafka-python's producer accepts by default (max_request_size).
PRODUCER_LIMIT = 1024 * 1024


def read_dlq(settings: Settings) -> list:
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    tp = TopicPartition(settings.dlq_topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    raw = []
    while polled := consumer.poll(timeout_ms=3000).get(tp, []):
        raw.extend(polled)
    consumer.close()
    return raw


def letter(settings: Settings, offset: int, **fields) -> dict:
    return {"topic": settings.topic, "partition": 0, "offset": offset, **fields}


def test_dead_letters_carry_source_stage_error_reason_and_original_value(kafka_settings):
    parse_letter = letter(
        kafka_settings,
        41,
        key=b"doc-9",
        value=b"{broken \xff",
        reason="invalid_json",
        detail="Expecting property name enclosed in double quotes",
    )  # without "stage", as parse's rows were: the sender defaults it
    stage_letter = dead_letter(
        {"topic": kafka_settings.topic, "partition": 0, "offset": 42},
        stage="embed",
        error="RuntimeError",
        reason="stage_error",
        detail="CUDA error: device-side assert",
        doc_id="doc-10",
    )
    assert send_dead_letters(kafka_settings, [parse_letter, stage_letter]) == 2

    raw = read_dlq(kafka_settings)
    first, second = (json.loads(r.value) for r in raw)
    assert raw[0].key == b"doc-9" and raw[1].key is None
    assert first == {
        "stage": "parse",
        "error": None,
        "reason": "invalid_json",
        "detail": "Expecting property name enclosed in double quotes",
        "doc_id": None,
        "source": {"topic": kafka_settings.topic, "partition": 0, "offset": 41},
        "value": "{broken \ufffd",
        "value_bytes": 9,
        "truncated": False,
    }
    assert (second["stage"], second["error"], second["doc_id"]) == (
        "embed",
        "RuntimeError",
        "doc-10",
    )
    assert second["detail"] == "CUDA error: device-side assert" and second["value"] is None
    assert dict(raw[0].headers) == {
        "source": f"{kafka_settings.topic}/0/41".encode(),
        "stage": b"parse",
        "reason": b"invalid_json",
        "source_offset": b"41",
    }


def test_dead_letters_always_fit_and_say_they_were_cut(kafka_settings):
    """5 MB and 50 MB payloads, a payload whose JSON escapes grow it sixfold, a huge key
    and a huge error message: each dead letter fits (the producer would refuse it
    otherwise), keeps the start of the payload and says it was cut."""
    limit = kafka_settings.dead_letter_max_bytes
    letters = [
        letter(kafka_settings, 0, key=b"k", value=b"x" * 5_000_000, reason="too_large"),
        letter(kafka_settings, 1, key=b"k", value=b"y" * 50_000_000, reason="too_large"),
        letter(kafka_settings, 2, key=b"k", value=b"\x01" * 200_000, reason="invalid_json"),
        letter(kafka_settings, 3, key=b"K" * 100_000, value=b"{}", reason="bad_key"),
        letter(kafka_settings, 4, key=b"k", value=b"z" * 10, reason="e" * 2_000_000),
    ]
    assert send_dead_letters(kafka_settings, letters) == 5

    raw = read_dlq(kafka_settings)
    assert [json.loads(r.value)["source"]["offset"] for r in raw] == [0, 1, 2, 3, 4]
    bodies = [json.loads(r.value) for r in raw]
    for r in raw:
        assert len(r.value) + len(r.key or b"") + sum(len(v) for _, v in r.headers) <= limit
    assert limit < PRODUCER_LIMIT
    assert [b["truncated"] for b in bodies] == [True, True, True, True, False]
    assert [b["value_bytes"] for b in bodies] == [5_000_000, 50_000_000, 200_000, 2, 10]
    assert bodies[0]["value"] == "x" * len(bodies[0]["value"]) and len(bodies[0]["value"]) > 1000
    assert bodies[1]["value"].startswith("yyy") and bodies[2]["value"].startswith("\x01")
    assert len(raw[3].key) < 100_000 and bodies[3]["value"] == "{}"
    assert len(bodies[4]["reason"]) < 2000 and bodies[4]["value"] == "z" * 10


def test_dead_letters_are_sent_once_per_source_record(kafka_settings):
    """A retried batch sends its dead letters again: those already on the DLQ are
    skipped (by source coordinates), also when given twice in one call."""
    first = [
        letter(kafka_settings, o, key=None, value=b"bad", reason="invalid_json") for o in (3, 5)
    ]
    assert send_dead_letters(kafka_settings, first) == 2
    retried = [*first, letter(kafka_settings, 8, key=None, value=b"bad", reason="empty")]
    assert send_dead_letters(kafka_settings, retried + retried) == 1
    assert send_dead_letters(kafka_settings, retried) == 0
    offsets = [json.loads(r.value)["source"]["offset"] for r in read_dlq(kafka_settings)]
    assert offsets == [3, 5, 8]


def test_skip_moves_the_group_past_one_message_and_records_it(kafka_settings, tmp_path):
    ensure_topics(kafka_settings, [kafka_settings.topic], 1)
    with EventProducer(kafka_settings) as producer:
        for i in range(3):
            producer.send(kafka_settings.topic, f"d{i}".encode(), f"message {i}".encode())
    runner = CliRunner()
    common = ["--home", str(tmp_path), "--bootstrap-servers", kafka_settings.bootstrap_servers]
    common += ["--topic", kafka_settings.topic]
    env = {"KNOWSTREAM_GROUP_ID": kafka_settings.group_id}

    def skip(offset: int):
        args = [*common, "skip", "--partition", "0", "--offset", str(offset)]
        return runner.invoke(app, args, env=env, catch_exceptions=False)

    wrong = skip(1)  # the group would read offset 0 next: offset 1 is not "the stuck one"
    assert wrong.exit_code == 1 and "at offset 0, not 1" in wrong.output
    assert committed_offsets(kafka_settings, kafka_settings.group_id) == {}

    done = skip(0)
    assert done.exit_code == 0, done.output
    assert committed_offsets(kafka_settings, kafka_settings.group_id) == {0: 1}
    (raw,) = read_dlq(kafka_settings)
    body = json.loads(raw.value)
    assert body["reason"] == "skipped by operator" and body["stage"] == "operator"
    assert body["source"]["offset"] == 0 and body["value"] == "message 0" and raw.key == b"d0"

    assert skip(1).exit_code == 0  # the next one, once
    assert committed_offsets(kafka_settings, kafka_settings.group_id) == {0: 2}
    assert skip(1).exit_code == 1
    assert count_messages(kafka_settings, kafka_settings.dlq_topic) == 2
