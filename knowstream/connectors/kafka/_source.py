"""Reading document events from Kafka: group micro-batches, replays and counts.

Two facts about the local broker (tansu 0.6) shape everything here:

1. Its "latest offset" lookup is wrong: it answers with the first offset of the
   last stored batch + 1 (889 for 1,000 messages), so ``end_offsets``, lag tools
   and ``auto_offset_reset="latest"`` are all off. We never ask for end offsets.
   A read ends when a poll comes back empty after ``settings.poll_timeout_ms``,
   or earlier when every partition's position has reached the high watermark
   that the broker reports *in fetch responses* (``consumer.highwater``), which
   is correct. The second rule only saves the idle wait of the first: it is
   "caught up as of the last fetch", and anything produced later belongs to the
   next read. An empty poll counts only once every partition has answered a
   fetch and no position is below its partition's last high watermark: before
   that, "empty" may just mean "not asked yet" or "rejoining the group" (see
   ``_drained``).
2. Its timestamp lookup (``offsets_for_times``) answers at batch granularity and,
   when no record is at or after the timestamp, returns offset 0 with timestamp
   -1 instead of "none". Timestamp ranges therefore seek with it and then filter
   each record by its own timestamp.

Offsets follow Kafka's convention everywhere: a committed offset, an ``end`` and
a position all name the *next* record, so ranges are [start, end).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata

from knowstream.settings import Settings

# How long a group member may spend between two polls before the broker drops it
# from the group. A micro-batch is fully processed (parse, embed, amortize, upsert)
# between two polls, which can take minutes on CPU; kafka-python's default of 5 min
# would turn a slow batch into a CommitFailedError and a re-delivery.
MAX_POLL_INTERVAL_MS = 30 * 60 * 1000

# How long a read waits for the broker's first fetch response before giving up.
FIRST_FETCH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class KafkaRecord:
    """One consumed message, detached from the client library."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()


def offsets_of(records: Iterable[KafkaRecord]) -> list[dict]:
    """Per topic-partition offset range of ``records``:
    ``[{"topic", "partition", "start", "end"}]``, start inclusive, end exclusive,
    sorted by topic then partition. What a snapshot manifest records for replay."""
    ranges: dict[tuple[str, int], list[int]] = {}
    for r in records:
        span = ranges.setdefault((r.topic, r.partition), [r.offset, r.offset])
        span[0] = min(span[0], r.offset)
        span[1] = max(span[1], r.offset)
    return [
        {"topic": topic, "partition": partition, "start": lo, "end": hi + 1}
        for (topic, partition), (lo, hi) in sorted(ranges.items())
    ]


class BatchConsumer:
    """A consumer-group member that hands out micro-batches and commits them
    explicitly once they are processed (at-least-once delivery).

    Usage::

        with BatchConsumer(settings) as consumer:
            records = consumer.poll_batch()
            process(records)
            consumer.commit(records)

    Nothing is committed automatically: records polled but not committed are
    delivered again to the next member of the group (after a restart or a crash).
    """

    def __init__(
        self, settings: Settings, group_id: str | None = None, join_timeout_s: float | None = None
    ) -> None:
        self._settings = settings
        self.group_id = group_id or settings.group_id
        # A tansu group join takes about half the session timeout; allow several.
        self._join_timeout_s = join_timeout_s or max(30.0, 3 * settings.session_timeout_ms / 1000)
        self._consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers.split(","),
            group_id=self.group_id,
            client_id=f"knowstream-{self.group_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=1000,
            max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
        )
        self._consumer.subscribe([settings.topic])

    def __enter__(self) -> BatchConsumer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Leave the group without committing anything."""
        self._consumer.close(autocommit=False)

    def poll_batch(self, max_messages: int | None = None) -> list[KafkaRecord]:
        """Up to ``max_messages`` (default ``settings.max_batch_messages``) records,
        read until the group's partitions are drained (see the module docstring).

        The first call waits for the group join: until the member has partitions,
        an empty poll only means "joining", not "no data". Raises ``TimeoutError``
        when no partition is assigned within the join timeout (broker down, topic
        missing, or more members than partitions).
        """
        limit = max_messages or self._settings.max_batch_messages
        records = self._await_assignment(limit)
        deadline = time.monotonic() + FIRST_FETCH_TIMEOUT_S
        # Poll at least once per call: the high watermarks of the previous call's
        # last fetch are stale by now.
        while len(records) < limit:
            polled = _poll(self._consumer, self._settings.poll_timeout_ms, limit - len(records))
            records.extend(polled)
            if _drained(self._consumer, self._consumer.assignment(), bool(polled), deadline):
                break
        return records

    def commit(self, records: Sequence[KafkaRecord]) -> None:
        """Commit, per partition, the offset after the last of ``records``.

        Explicit offsets (not "whatever was polled") so that a caller that polled
        more than it processed commits only what it processed.
        """
        offsets = {
            TopicPartition(span["topic"], span["partition"]): OffsetAndMetadata(span["end"], "", -1)
            for span in offsets_of(records)
        }
        if offsets:
            self._consumer.commit(offsets)

    def backlog(self) -> dict[int, int]:
        """``{partition: records after this member's position}`` as of the last fetch
        (its high watermark, which tansu reports correctly): the consumer lag once the
        polled records are committed, without reading the backlog."""
        out = {}
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is not None:
                out[tp.partition] = max(0, high - self._consumer.position(tp))
        return out

    def rewind(self, records: Sequence[KafkaRecord]) -> None:
        """Deliver ``records`` (polled, not processed) again at the next poll."""
        for span in offsets_of(records):
            self._consumer.seek(TopicPartition(span["topic"], span["partition"]), span["start"])

    def _await_assignment(self, limit: int) -> list[KafkaRecord]:
        records: list[KafkaRecord] = []
        deadline = time.monotonic() + self._join_timeout_s
        while not self._consumer.assignment():
            # A join still in flight is no outage (see ``_timed_out``). Without
            # this rule a second worker gave up after 30 s whenever the first one
            # was in a longer batch, left the group (another rebalance for the
            # busy worker) and retried into the same wait.
            if _timed_out(self._consumer, deadline):
                raise TimeoutError(
                    f"consumer group {self.group_id!r} got no partition of topic "
                    f"{self._settings.topic!r} within {self._join_timeout_s:.0f} s: is the "
                    f"broker at {self._settings.bootstrap_servers} up, does the topic exist, "
                    "and are there no more members than partitions?"
                )
            # The poll that completes the join may already return records.
            records.extend(_poll(self._consumer, 200, limit))
        return records


# --- groupless reads: replay, lag, counts -------------------------------------------


def read_range(
    settings: Settings,
    topic: str,
    start: Mapping[int, int] | None = None,
    end: Mapping[int, int] | None = None,
    start_ts_ms: int | None = None,
    end_ts_ms: int | None = None,
) -> list[KafkaRecord]:
    """Records of ``topic`` in a range, read without a consumer group (nothing is
    committed, no group is joined): for replays and backfills.

    Partitions read: those named in ``start`` or ``end``, or every partition of the
    topic when neither is given. Per partition, offsets run from ``start[p]``
    (default: the beginning) to ``end[p]`` exclusive (default: the current end).
    ``start_ts_ms``/``end_ts_ms`` further keep only records whose timestamp is in
    [start_ts_ms, end_ts_ms). Returns ``[]`` for a topic that does not exist.
    """
    with _GrouplessConsumer(settings) as consumer:
        partitions = sorted({*(start or {}), *(end or {})}) or consumer.partitions(topic)
        starts: dict[int, int | None] = {p: (start or {}).get(p) for p in partitions}
        if start_ts_ms is not None:
            starts = consumer.seek_times(topic, starts, start_ts_ms)
        return [
            r
            for r in consumer.scan(topic, starts, end or {}, settings.poll_timeout_ms)
            if (start_ts_ms is None or r.timestamp_ms >= start_ts_ms)
            and (end_ts_ms is None or r.timestamp_ms < end_ts_ms)
        ]


def committed_offsets(settings: Settings, group_id: str) -> dict[int, int]:
    """``{partition: committed offset}`` of ``group_id`` on ``settings.topic``;
    partitions the group never committed are absent."""
    admin = KafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers.split(","), client_id="knowstream-offsets"
    )
    try:
        offsets = admin.list_group_offsets(group_id).get(group_id, {})
    finally:
        admin.close()
    return {
        tp.partition: meta.offset
        for tp, meta in offsets.items()
        if tp.topic == settings.topic and meta.offset >= 0
    }


def group_position(settings: Settings, group_id: str, partition: int) -> int:
    """The offset ``group_id`` reads next on ``settings.topic[partition]``: its
    committed offset, else the partition's first (the group starts at the beginning)."""
    committed = committed_offsets(settings, group_id)
    if partition in committed:
        return committed[partition]
    with _GrouplessConsumer(settings) as consumer:
        if partition not in consumer.partitions(settings.topic):
            raise LookupError(f"topic {settings.topic!r} has no partition {partition}")
        return consumer.beginning(settings.topic, partition)


def commit_offset(settings: Settings, group_id: str, partition: int, offset: int) -> None:
    """Commit ``offset`` for ``group_id`` on ``settings.topic[partition]`` from outside
    the group (no join). The broker refuses it while the group has members."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers.split(","),
        group_id=group_id,
        client_id="knowstream-skip",
        enable_auto_commit=False,
    )
    try:
        tp = TopicPartition(settings.topic, partition)
        consumer.assign([tp])  # manual assignment: commits without a group generation
        consumer.commit({tp: OffsetAndMetadata(offset, "", -1)})
    finally:
        consumer.close(autocommit=False)


def consumer_lag(settings: Settings, group_id: str) -> dict:
    """Records of ``settings.topic`` not yet committed by ``group_id``:
    ``{"total": int, "partitions": {partition: int}}``.

    Counted by reading from the committed offsets (the beginning where nothing is
    committed, as the group itself would) to the end, because the broker's end
    offsets are wrong. Costs a read of the backlog; fine for ``status``.
    """
    committed = committed_offsets(settings, group_id)
    with _GrouplessConsumer(settings) as consumer:
        starts = {p: committed.get(p) for p in consumer.partitions(settings.topic)}
        lag = dict.fromkeys(starts, 0)
        for r in consumer.scan(settings.topic, starts, {}, settings.poll_timeout_ms):
            lag[r.partition] += 1
    return {"total": sum(lag.values()), "partitions": lag}


def count_messages(settings: Settings, topic: str) -> int:
    """Number of records in ``topic`` (0 if it does not exist), by reading it."""
    with _GrouplessConsumer(settings) as consumer:
        starts = dict.fromkeys(consumer.partitions(topic))
        return sum(1 for _ in consumer.scan(topic, starts, {}, settings.poll_timeout_ms))


class _GrouplessConsumer:
    """A consumer with manual assignment and no group: reads never move a group's
    offsets and need no join (which costs seconds on tansu)."""

    def __init__(self, settings: Settings) -> None:
        self._consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers.split(","),
            group_id=None,
            client_id="knowstream-reader",
            enable_auto_commit=False,
        )

    def __enter__(self) -> _GrouplessConsumer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._consumer.close()

    def partitions(self, topic: str) -> list[int]:
        return sorted(self._consumer.partitions_for_topic(topic))

    def beginning(self, topic: str, partition: int) -> int:
        tp = TopicPartition(topic, partition)
        return self._consumer.beginning_offsets([tp])[tp]

    def seek_times(
        self, topic: str, starts: Mapping[int, int | None], ts_ms: int
    ) -> dict[int, int | None]:
        """Move each start forward to the first batch at or after ``ts_ms``.
        Partitions with nothing that recent are dropped."""
        found = self._consumer.offsets_for_times({TopicPartition(topic, p): ts_ms for p in starts})
        moved: dict[int, int | None] = {}
        for tp, hit in found.items():
            # tansu says "nothing at or after ts_ms" as offset 0, timestamp -1.
            if hit is None or hit.timestamp < ts_ms:
                continue
            floor = starts[tp.partition]
            moved[tp.partition] = hit.offset if floor is None else max(floor, hit.offset)
        return moved

    def scan(
        self,
        topic: str,
        starts: Mapping[int, int | None],
        ends: Mapping[int, int],
        idle_ms: int,
    ) -> Iterator[KafkaRecord]:
        """Yield records of ``starts``' partitions from each start (``None``: the
        beginning) up to ``ends[p]`` exclusive, else until drained."""
        consumer = self._consumer
        active = {TopicPartition(topic, p) for p in starts}
        if not active:
            return  # missing topic, or no partition has records in the time range
        consumer.assign(sorted(active))
        for tp in sorted(active):
            offset = starts[tp.partition]
            if offset is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)
            if tp.partition in ends and (offset or 0) >= ends[tp.partition]:
                active.discard(tp)  # empty range
        consumer.pause(*(set(consumer.assignment()) - active))
        deadline = time.monotonic() + FIRST_FETCH_TIMEOUT_S
        while active:
            polled = _poll(consumer, idle_ms)
            for r in polled:
                tp = TopicPartition(r.topic, r.partition)
                if tp not in active:
                    continue  # fetched before its partition was paused
                if r.offset >= ends.get(r.partition, r.offset + 1):
                    active.discard(tp)
                    consumer.pause(tp)
                    continue
                yield r
            if active and _drained(consumer, active, bool(polled), deadline):
                break


# --- shared helpers -----------------------------------------------------------------


def _poll(
    consumer: KafkaConsumer, timeout_ms: int, max_records: int | None = None
) -> list[KafkaRecord]:
    polled: dict[TopicPartition, list[ConsumerRecord]] = consumer.poll(
        timeout_ms=timeout_ms, max_records=max_records
    )
    return [_record(r) for batch in polled.values() for r in batch]


def _record(r: ConsumerRecord) -> KafkaRecord:
    headers = tuple((k, v) for k, v in r.headers or ())
    return KafkaRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp, headers)


def _drained(
    consumer: KafkaConsumer, partitions: Iterable[TopicPartition], polled: bool, deadline: float
) -> bool:
    """Whether a read over ``partitions`` is over after a poll that did (``polled``)
    or did not return records.

    After records: over when every position has reached the high watermark of its
    partition's last fetch response. After an empty poll: over, unless some
    partition has had no fetch response at all yet, or its position is still
    below the high watermark of its last one; then the poll was only slow
    (offset lookup, slow storage, a group rebalance), and stopping would report
    "no data" for data never asked for, or known to be there. Raises
    ``TimeoutError`` when that lasts past ``deadline``.
    """
    tps = list(partitions)
    highs = [consumer.highwater(tp) for tp in tps]
    caught_up = all(
        high is not None and consumer.position(tp) >= high
        for tp, high in zip(tps, highs, strict=True)
    )
    if polled or caught_up:
        # After an empty poll, "caught up" must include the positions: a poll
        # spent rejoining the group (another member joined or left; a tansu join
        # takes ~3 s, longer than a poll timeout) comes back empty while the
        # partitions keep their positions and high watermarks. Taking that for
        # "drained" made `ingest --once` exit with records left behind, and no
        # error (tests/test_two_workers.py: up to 11 of 24 documents lost).
        return caught_up
    if _timed_out(consumer, deadline):
        raise TimeoutError(
            f"no fetch response for {[str(tp) for tp in tps]} within "
            f"{FIRST_FETCH_TIMEOUT_S:.0f} s: is the broker up?"
        )
    return False


def _timed_out(consumer: KafkaConsumer, deadline: float) -> bool:
    """Whether a wait for the broker that should have ended by ``deadline`` has
    timed out.

    Not while this consumer's group (re)join is in flight at a coordinator it can
    reach: the broker answers a JoinGroup only once every member has rejoined, and
    a member rejoins at its next poll, i.e. after the micro-batch it is busy with,
    which may take minutes. Waiting for that is part of sharing partitions, not an
    outage. The broker ends any rebalance within the rebalance timeout we send
    (``MAX_POLL_INTERVAL_MS``, dropping members that take longer), so that much
    longer at most. A broker that goes away makes the coordinator unknown, and
    ``deadline`` applies again.
    """
    now = time.monotonic()
    if now <= deadline:
        return False
    # kafka-python has no public accessor for the member state; groupless
    # readers (and a kafka-python without it) fall back to the plain deadline.
    coordinator = getattr(consumer, "_coordinator", None)
    joining = (
        coordinator is not None
        and coordinator.rebalance_in_progress()
        and not coordinator.coordinator_unknown()
    )
    return not (joining and now <= deadline + MAX_POLL_INTERVAL_MS / 1000)


def dead_letter_summary(settings: Settings) -> dict:
    """The dead-letter topic read once: ``{"messages", "distinct", "by_reason"}``.

    A batch that is redelivered (a crash after its dead letters were sent, before
    the commit) sends them again; ``distinct`` and ``by_reason`` count each source
    record (topic, partition, offset) once, by its latest reason.
    """
    messages, reasons = 0, {}
    with _GrouplessConsumer(settings) as consumer:
        starts = dict.fromkeys(consumer.partitions(settings.dlq_topic))
        for r in consumer.scan(settings.dlq_topic, starts, {}, settings.poll_timeout_ms):
            messages += 1
            try:
                body = json.loads(r.value or b"")  # a null value is unreadable too
                src = body["source"]
                key = (src["topic"], src["partition"], src["offset"])
                reasons[key] = str(body.get("reason"))
            except (ValueError, KeyError, TypeError):  # not ours: count it as its own
                reasons[(r.topic, r.partition, r.offset)] = "unreadable"
    by_reason: dict[str, int] = {}
    for reason in reasons.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    return {"messages": messages, "distinct": len(reasons), "by_reason": by_reason}
