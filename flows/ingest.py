"""Flow "ingest": the continuous path from Kafka to the live memory.

    knowstream ingest            # runs until stopped
    knowstream ingest --once     # drains what is on the topic, then exits

Per micro-batch: poll until an empty poll (or the batch cap), run the Beam
pipeline, publish a snapshot and move ``live`` to it, send dead letters, and
only then commit the offsets. A failure anywhere before the commit leaves the
offsets where they were: the batch is redelivered and, since every write is
idempotent and a failed publish is purged, nothing is lost or duplicated.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prefect import flow, get_run_logger

from knowstream.connectors.kafka import BatchConsumer, ensure_topics, send_dead_letters
from knowstream.flows.batch import BatchReport, process_batch
from knowstream.memory import Memory
from knowstream.settings import Settings


@flow(name="ingest", log_prints=True)
def ingest_flow(
    settings: Settings | None = None,
    once: bool = True,
    max_batches: int | None = None,
    idle_sleep_s: float = 1.0,
    on_batch: Callable[[BatchReport], None] | None = None,
) -> list[BatchReport]:
    settings = settings or Settings()
    log = get_run_logger()
    memory = Memory(settings)
    if purged := memory.recover():
        log.warning("purged versions left pending by dead writers: %s", purged)
    ensure_topics(settings, [settings.topic, settings.dlq_topic], settings.partitions)
    reports: list[BatchReport] = []
    with BatchConsumer(settings, settings.group_id) as consumer:
        while max_batches is None or len(reports) < max_batches:
            records = consumer.poll_batch(settings.max_batch_messages)
            if not records:
                if once:
                    break
                time.sleep(idle_sleep_s)
                continue
            report = process_batch(
                settings,
                memory,
                records,
                parent=memory.registry.live(),
                kind="ingest",
                make_live=True,
            )
            if report.dead_letters:
                send_dead_letters(settings, report.dead_letters)
            consumer.commit(records)
            reports.append(report)
            if on_batch:
                on_batch(report)
    return reports
