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
            raise KafkaError(
                f"{failed} message(s) were not delivered; first error: {first!r}"
            ) from first


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


def send_dead_letters(
    settings: Settings, letters: list[dict[str, Any]], *, since_ms: int | None = None
) -> int:
    """Publish records the pipeline rejected to ``settings.dlq_topic``, each at most
    once; returns how many were sent now.

    A letter is a ``DEAD_LETTER_SCHEMA`` row: the source coordinates ``topic,
    partition, offset``, ``reason`` and, when known, ``stage`` (default "parse"),
    ``error`` (exception class), ``detail``, ``doc_id``, ``key`` and ``value`` (the
    message as received). See ``dead_letter_message`` for what goes on the topic.

    Idempotent: a letter whose source coordinates are already on the DLQ is not
    sent again, so a batch retried after a failure between its dead letters and its
    commit does not duplicate them. The DLQ is read from ``since_ms`` (the oldest
    source record's timestamp; a dead letter is always written after its record)
    minus ``CLOCK_SKEW_MS``; ``None`` reads all of it.
    """
    if not letters:
        return 0
    ensure_topics(settings, [settings.dlq_topic], settings.partitions)
    unique = {source_id(letter): letter for letter in reversed(letters)}  # first one wins
    # Kafka reads timestamps below 0 as "latest"/"earliest": those mean "read it all".
    start_ms = None if since_ms is None or since_ms <= CLOCK_SKEW_MS else since_ms - CLOCK_SKEW_MS
    on_topic = dead_letter_sources(settings, start_ms)
    sent = 0
    with EventProducer(settings) as producer:
        for sid, letter in sorted(unique.items()):
            if sid not in on_topic:
                producer.send(
                    settings.dlq_topic, *dead_letter_message(letter, settings.dead_letter_max_bytes)
                )
                sent += 1
    return sent


# Tolerated difference between the source producer's clock and ours (see above).
CLOCK_SKEW_MS = 60 * 60 * 1000
# Text fields of a dead letter are cut to this many characters (exception messages
# may quote the whole input).
TEXT_CHARS = 1000
KEY_BYTES = 1024  # a longer key is cut as well
# What a Kafka record adds around key, value and headers (lengths, attributes,
# batch header), with room to spare.
RECORD_OVERHEAD = 512


def source_id(letter: dict[str, Any]) -> str:
    """The idempotency key of a dead letter: its source coordinates."""
    return f"{letter['topic']}/{letter['partition']}/{letter['offset']}"


def dead_letter_sources(settings: Settings, start_ts_ms: int | None = None) -> set[str]:
    """Source ids of the dead letters on ``settings.dlq_topic`` written since
    ``start_ts_ms`` (all of them when ``None``)."""
    from knowstream.connectors.kafka._source import read_range

    found: set[str] = set()
    for r in read_range(settings, settings.dlq_topic, start_ts_ms=start_ts_ms):
        header = dict(r.headers).get("source")
        if header is not None:
            found.add(header.decode())
            continue
        try:  # written before the header existed
            found.add(source_id(json.loads(r.value or b"")["source"]))
        except (ValueError, KeyError, TypeError):
            continue
    return found


def dead_letter_message(
    letter: dict[str, Any], max_bytes: int
) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """Key, value and headers of one dead letter, together under ``max_bytes``.

    The key is the original key (cut to ``KEY_BYTES``). The value is JSON:
    ``source`` (topic, partition, offset), ``stage``, ``error``, ``reason``,
    ``detail``, ``doc_id``, and the original ``value`` as text (undecodable bytes replaced),
    cut to what fits; ``truncated`` says whether key or value was cut and
    ``value_bytes`` is the original value's size. Headers ``source`` (the
    idempotency key), ``stage``, ``reason`` and ``source_offset`` let tools
    filter without parsing values.
    """
    raw_key: bytes | None = letter.get("key")
    raw_value: bytes | None = letter.get("value")
    key = None if raw_key is None else bytes(raw_key[:KEY_BYTES])
    stage = str(letter.get("stage") or "parse")
    body: dict[str, Any] = {
        "stage": stage,
        "error": _cut(letter.get("error")),
        "reason": _cut(letter.get("reason")),
        "detail": _cut(letter.get("detail")),
        "doc_id": _cut(letter.get("doc_id")),
        "source": {k: letter[k] for k in ("topic", "partition", "offset")},
        "value": None,
        "value_bytes": None if raw_value is None else len(raw_value),
        "truncated": raw_key is not None and len(raw_key) > KEY_BYTES,
    }
    headers = [
        ("source", source_id(letter).encode()),
        ("stage", stage.encode()),
        ("reason", str(body["reason"])[:256].encode()),
        ("source_offset", str(letter["offset"]).encode()),
    ]
    fixed = RECORD_OVERHEAD + len(key or b"") + sum(len(k) + len(v) for k, v in headers)

    def encode(n: int) -> bytes:
        if raw_value is not None:
            body["value"] = raw_value[:n].decode("utf-8", errors="replace")
            body["truncated"] |= n < len(raw_value)
        return json.dumps(body, ensure_ascii=False).encode("utf-8")

    n = 0 if raw_value is None else min(len(raw_value), max_bytes)
    value = encode(n)
    while fixed + len(value) > max_bytes:
        if n == 0:
            raise ValueError(f"dead letter of {source_id(letter)} cannot fit in {max_bytes} bytes")
        # Escapes make the JSON up to 6x longer than the bytes it holds: cut in
        # proportion, measure, repeat.
        n = max(0, min(n - 1, n * (max_bytes - fixed) // len(value)))
        value = encode(n)
    return key, value, headers


def _cut(text: object) -> str | None:
    return None if text is None else str(text)[:TEXT_CHARS]


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
