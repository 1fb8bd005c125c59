"""Flow "ingest": the continuous path from Kafka to the live memory.

    knowstream ingest            # runs until stopped
    knowstream ingest --once     # drains what is on the topic, then exits

Per micro-batch: poll until an empty poll (or the batch cap), run the Beam
pipeline, publish a snapshot and move ``live`` to it, send dead letters, and
only then commit the offsets. A failure anywhere before the commit leaves the
offsets where they were: the batch is redelivered and, since a failed publish
is purged and a replayed batch rebuilds the same content, nothing is lost or
duplicated.

A batch is published at most once: one published but not committed (a failure
or a stop after the publish) is resumed from its manifest (``flows.resume``).
Dead letters are sent at most once per source record.

Failures are retried with exponential backoff: the consumer is dropped and
rejoined, so the retry starts again from the committed offsets. Outages (broker,
MLflow, Qdrant) are retried until the service is back; other errors, and every
error in ``--once``, get ``Settings.retry_attempts`` tries (``flows.retries``),
then the worker stops as ``failed``. An amortizer spec naming a registry model or
version that does not exist fails at start. SIGINT/SIGTERM abandon the current
batch (``flows.stopping``). The worker's condition (running, retrying with the
last error, stopped, failed with the reason) is kept in ``<home>/run/ingest.json``
for ``knowstream status`` and the API's ``/healthz``.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential

from knowstream.connectors.kafka import BatchConsumer, ensure_topics, send_dead_letters
from knowstream.connectors.mlflow._registry import AmortizerRegistryError, resolve_amortizer
from knowstream.flows.batch import BatchReport, process_batch
from knowstream.flows.observe import after_batch
from knowstream.flows.resume import resume
from knowstream.flows.retries import is_transient, retryable, stop_after
from knowstream.flows.stopping import Stopped, rearm, stop_signal
from knowstream.health import write_health
from knowstream.memory import Memory, StaleParent
from knowstream.settings import Settings


def _require_broker(settings: Settings, timeout_s: float = 2.0) -> None:
    """Raise ``ConnectionError`` unless some bootstrap server accepts a connection."""
    for server in settings.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
                return
        except (OSError, ValueError):
            continue
    raise ConnectionError(f"Kafka broker unreachable at {settings.bootstrap_servers}")


def notify(callback: Callable[[int], object], version: int) -> None:
    """Tell ``callback`` that ``version`` is live; its failure is logged, never the batch's:
    the version is published, and the offsets must still be committed."""
    try:
        callback(version)
    except Exception:
        logging.getLogger(__name__).warning(
            "on_published(%s) failed; the batch goes on", version, exc_info=True
        )


@flow(name="ingest", log_prints=True)
def ingest_flow(
    settings: Settings | None = None,
    once: bool = True,
    max_batches: int | None = None,
    idle_sleep_s: float = 0.1,
    on_batch: Callable[[BatchReport], None] | None = None,
    stop: threading.Event | None = None,
    max_duration_s: float | None = None,
    on_published: Callable[[int], object] | None = None,
) -> list[BatchReport]:
    """``stop``: set it to end the loop after the current batch (``serve --ingest``).
    ``max_duration_s``: end after the batch in progress once this long has passed (one
    window of the ``ingest`` deployment, ``flows/deploy.py``). ``on_published``: called
    with a batch's version as soon as it is published and live, before its dead letters,
    its commit and the batch's annotations (``serve --ingest`` answers from it at once).
    ``idle_sleep_s``: the pause after an empty read; the read itself has already waited
    ``poll_timeout_ms`` for records, so a short one."""
    settings = settings or Settings()
    log = get_run_logger()
    reports: list[BatchReport] = []
    consumer: BatchConsumer | None = None
    memory: Memory | None = None
    dirty = False  # a batch failed since the last recover()

    def one_batch() -> BatchReport | None:
        """Poll, process, publish, dead-letter, commit. None when the topic is drained."""
        nonlocal consumer, memory, dirty
        try:
            if memory is not None and dirty:
                # A failed publish whose cleanup failed too (its store was down) left
                # a version pending under our own pid: purge it now, not at restart.
                if purged := memory.recover():
                    log.warning("purged versions left pending by a failed publish: %s", purged)
                dirty = False
            if memory is None:
                memory = Memory(settings)
                memory.open_store()  # before joining the group: a held store fails first
                if purged := memory.recover():
                    log.warning("purged versions left pending by dead writers: %s", purged)
            if consumer is None:
                ensure_topics(settings, [settings.topic, settings.dlq_topic], settings.partitions)
                consumer = BatchConsumer(settings, settings.group_id)
            records = consumer.poll_batch(settings.max_batch_messages)
            if not records:
                # A joined consumer whose broker died polls "nothing" without an
                # error: without this probe an outage while idle would read as a
                # drained topic (``--once`` exits, status stays "running").
                _require_broker(settings)
                return None
            since_ms = min(r.timestamp_ms for r in records)  # no dead letter is older
            # How long the oldest record waited for this batch (its timestamp is the
            # producer's clock): with the batch's durations, a record's way to live.
            queued = max(0.0, time.time() - since_ms / 1000)
            if (resumed := resume(settings, memory, records)) is not None:
                report, published = resumed
                send_dead_letters(settings, report.dead_letters, since_ms=since_ms)
                consumer.commit(published)
                finished = {id(r) for r in published}
                consumer.rewind([r for r in records if id(r) not in finished])
                report.lag = consumer.backlog()
                return report
            reruns = 0
            while True:
                try:
                    report = process_batch(
                        settings,
                        memory,
                        records,
                        parent=memory.registry.live(),
                        kind="ingest",
                        make_live=True,
                    )
                    break
                except StaleParent:
                    # Another worker published first: rebuild this batch on the new
                    # live. Keep the consumer: leaving the group would rebalance
                    # the other worker mid-batch too.
                    reruns += 1
                    log.info("live moved while this batch was processed; rerunning it")
            if reruns:  # lost compare-and-sets, visible in the report (contention)
                report.counters["ingest.cas_reruns"] = reruns
            report.durations["queued"] = queued
            if on_published is not None and report.version is not None:
                notify(on_published, report.version)
            send_dead_letters(settings, report.dead_letters, since_ms=since_ms)
            consumer.commit(records)
            report.lag = consumer.backlog()
            # Compaction and retention, as configured; after the commit: the batch is done.
            if report.version is not None and (done := memory.maintain()):
                log.info("after version %s: %s", report.version, done)
            return report
        except BaseException:
            dirty = True
            # Drop the group membership: the retry resumes from the committed offsets.
            if consumer is not None:
                consumer.close()
                consumer = None
            raise

    degraded = False  # health says "retrying": the next success must say "running" again

    def retrying(state: RetryCallState) -> None:
        nonlocal degraded
        degraded = True
        error = state.outcome.exception() if state.outcome else None
        log.warning("batch failed (attempt %d), retrying: %r", state.attempt_number, error)
        write_health(
            settings, state="retrying", attempt=state.attempt_number, last_error=repr(error)
        )

    retry = Retrying(
        retry=retry_if_exception(retryable),
        stop=stop_after(settings, once),
        wait=wait_exponential(multiplier=settings.retry_base_s, max=settings.retry_max_s),
        before_sleep=retrying,
        reraise=True,
    )
    stop = stop or threading.Event()
    window = threading.Timer(max_duration_s, stop.set) if max_duration_s else None
    if window:
        window.daemon = True
        window.start()
    rearm()  # our SIGTERM handler over Prefect's bridge (flows/stopping.py)
    write_health(settings, state="running", batches=0)
    try:
        try:
            resolve_amortizer(settings)  # a missing registry model fails now, not per batch
        except AmortizerRegistryError:
            pass  # unreachable: the batches retry it
        while (max_batches is None or len(reports) < max_batches) and not stop.is_set():
            if (signum := stop_signal()) is not None:  # in case a library swallowed it
                raise Stopped(signum)
            report = retry(one_batch)
            if degraded:
                degraded = False
                write_health(settings, state="running", batches=len(reports), recovered=True)
            if report is None:
                if once:
                    break
                stop.wait(idle_sleep_s)
                continue
            reports.append(report)
            after_batch(settings, memory, report)
            write_health(
                settings,
                state="running",
                batches=len(reports),
                last_version=report.version,
                last_offsets=[o.__dict__ for o in report.offsets],
            )
            if on_batch:
                on_batch(report)
    except BaseException as e:
        if (signum := stop_signal(e)) is not None:
            reason = f"stopped by {signal.Signals(signum).name}"
            write_health(settings, state="stopped", batches=len(reports), reason=reason)
            if isinstance(e, Stopped | TerminationSignal):
                raise
            raise Stopped(signum) from e  # one Beam wrapped
        write_health(
            settings,
            state="failed",
            batches=len(reports),
            reason=f"{type(e).__name__}: {e}".splitlines()[0][:500],
            transient=is_transient(e),
            last_error=repr(e),
        )
        raise
    finally:
        if window:
            window.cancel()
        if consumer is not None:
            consumer.close()
    write_health(settings, state="stopped", batches=len(reports))
    return reports
