"""Kafka behind one module: micro-batch consumption with explicit commits
(``_source``), producing documents and dead letters (``_target``)."""

from knowstream.connectors.kafka._probe import require_broker
from knowstream.connectors.kafka._source import (
    BatchConsumer,
    KafkaRecord,
    commit_offset,
    committed_offsets,
    consumer_lag,
    count_messages,
    dead_letter_summary,
    group_position,
    offsets_of,
    read_range,
)
from knowstream.connectors.kafka._target import (
    EventProducer,
    ensure_topics,
    produce_file,
    send_dead_letters,
)

__all__ = [
    "BatchConsumer",
    "EventProducer",
    "KafkaRecord",
    "commit_offset",
    "committed_offsets",
    "consumer_lag",
    "count_messages",
    "dead_letter_summary",
    "ensure_topics",
    "group_position",
    "offsets_of",
    "produce_file",
    "read_range",
    "require_broker",
    "send_dead_letters",
]
