"""Writing to Kafka: topics, document events from files, and dead letters.

Messages are opaque bytes here. Parsing and validation belong to the pipeline's
parse stage, which is why ``produce_file`` forwards even a line that is not JSON:
the stage must see it and dead-letter it with a reason, so that a bad input line
is visible on the DLQ topic instead of silently dropped at ingestion.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from knowstream.settings import Settings

PROGRESS_EVERY = 1000  # messages between two progress callbacks


def ensure_topics(settings: Settings, topics: list[str], partitions: int) -> None:
    """Create ``topics`` with ``partitions`` partitions (replication 1) unless they
    exist; existing topics are left as they are."""
    admin = KafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers.split(","), client_id="knowstream-admin"
    )
    try:
        # raise_errors=False: one request for all topics, then per-topic errors,
        # so "already exists" on one topic cannot hide a real error on another.
        result = admin.create_topics(
            {name: {"num_partitions": partitions, "replication_factor": 1} for name in topics},
            raise_errors=False,
        )
    finally:
        admin.close()
    for topic in result["topics"]:
        error = for_code(topic["error_code"])
        if topic["error_code"] != 0 and error is not TopicAlreadyExistsError:
            raise error(f"cannot create topic {topic['name']!r}: {topic['error_message']}")


class EventProducer:
    """A producer that waits for all in-sync replicas (``acks="all"``) and turns
    any failed send into an exception at ``flush()``.

    Sends are asynchronous; without the error check a message that failed after
    its retries would be lost without a trace.
    """

    def __init__(self, settings: Settings) -> None:
        self._producer = KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers.split(","),
            client_id="knowstream-producer",
            acks="all",
            linger_ms=5,
        )
        self._errors: list[BaseException] = []

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self._producer.close()

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Queue one message; delivery is confirmed (or reported) by ``flush()``."""
        future = self._producer.send(topic, key=key, value=value, headers=headers)
        future.add_errback(self._errors.append)

    def flush(self) -> None:
        """Wait until every queued message is acknowledged; raise the first error
        if any message failed."""
        self._producer.flush()
        if self._errors:
            failed, first = len(self._errors), self._errors[0]
            self._errors.clear()
            raise KafkaError(f"{failed} message(s) were not delivered; first error: {first!r}")


def produce_file(
    settings: Settings, path: Path, progress: Callable[[int], None] | None = None
) -> int:
    """Send every document of a JSONL or Parquet file to ``settings.topic``;
    return how many messages were sent.

    JSONL lines are sent byte for byte (blank lines skipped), valid JSON or not.
    Parquet rows are sent as JSON objects. Each message is keyed by its
    ``doc_id`` when it has one, so that all versions of a document land on one
    partition, in order. ``progress(n_sent)`` is called every ``PROGRESS_EVERY``
    messages and once at the end.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        messages = _jsonl_messages(path)
    elif suffix in (".parquet", ".pq"):
        messages = _parquet_messages(path)
    else:
        raise ValueError(f"{path}: expected a .jsonl or .parquet file")
    ensure_topics(settings, [settings.topic, settings.dlq_topic], settings.partitions)
    sent = 0
    with EventProducer(settings) as producer:
        for key, value in messages:
            producer.send(settings.topic, key, value)
            sent += 1
            if progress is not None and sent % PROGRESS_EVERY == 0:
                progress(sent)
    # Leaving the block flushed: every message is acknowledged by now.
    if progress is not None:
        progress(sent)
    return sent


def send_dead_letters(settings: Settings, letters: list[dict[str, Any]]) -> None:
    """Publish records the pipeline rejected to ``settings.dlq_topic``.

    Each letter is a ``DEAD_LETTER_SCHEMA`` row. The dead letter keeps the original
    key and carries, as JSON, the stage that refused the record, the reason (a
    short machine code such as ``invalid_json``), the error class, a human-readable
    detail, the doc id if known, where the record came from, and the original value
    (as text, undecodable bytes replaced). ``reason``, ``stage`` and
    ``source_offset`` are also Kafka headers, so tools can filter without parsing
    values.
    """
    if not letters:
        return
    ensure_topics(settings, [settings.dlq_topic], settings.partitions)
    with EventProducer(settings) as producer:
        for letter in letters:
            value = letter["value"]
            body = {
                "stage": letter["stage"],
                "reason": letter["reason"],
                "error": letter["error"],
                "detail": letter["detail"],
                "doc_id": letter["doc_id"],
                "source": {
                    "topic": letter["topic"],
                    "partition": letter["partition"],
                    "offset": letter["offset"],
                },
                "value": None if value is None else value.decode("utf-8", errors="replace"),
            }
            headers = [
                ("reason", str(letter["reason"]).encode()),
                ("stage", str(letter["stage"]).encode()),
                ("source_offset", str(letter["offset"]).encode()),
            ]
            producer.send(settings.dlq_topic, letter["key"], json.dumps(body).encode(), headers)


def _jsonl_messages(path: Path) -> Iterator[tuple[bytes | None, bytes]]:
    # Binary mode: a line that is not valid UTF-8 must still reach the topic as is.
    with path.open("rb") as lines:
        for line in lines:
            raw = line.rstrip(b"\r\n")
            if raw.strip():
                yield _doc_key(raw), raw


def _doc_key(raw: bytes) -> bytes | None:
    try:
        doc = json.loads(raw)
    except ValueError:  # includes JSONDecodeError and UnicodeDecodeError
        return None
    if isinstance(doc, dict) and doc.get("doc_id") is not None:
        return str(doc["doc_id"]).encode()
    return None


def _parquet_messages(path: Path) -> Iterator[tuple[bytes | None, bytes]]:
    import pyarrow.parquet as pq  # heavy; only Parquet ingestion needs it

    for batch in pq.ParquetFile(path).iter_batches(batch_size=PROGRESS_EVERY):
        for row in batch.to_pylist():
            doc_id = row.get("doc_id")
            key = None if doc_id is None else str(doc_id).encode()
            # default=str: dates and decimals become strings, not a crash.
            yield key, json.dumps(row, default=str, ensure_ascii=False).encode()
