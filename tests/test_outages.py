"""Outages of the services behind ingestion: broker, MLflow server, Qdrant storage.

Each test runs the continuous worker (``ingest_flow(once=False)``) in a thread
against real services, takes one service away, checks that the worker retries
(health record "retrying" with the error) and commits nothing, gives the
service back, and checks that the worker recovers without a manual step.
Every wait is bounded; ``max_batches`` makes the worker end by itself once the
expected batches are in. Small backoff (0.2 s doubling to 2 s) keeps it quick.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from knowstream.connectors.kafka import committed_offsets, produce_file
from knowstream.connectors.qdrant import StoreHeld, close_clients
from knowstream.flows.batch import BatchReport
from knowstream.flows.ingest import ingest_flow
from knowstream.health import read_health
from knowstream.infra.services import (
    start_broker,
    start_mlflow_server,
    stop_broker,
    stop_mlflow_server,
)
from knowstream.memory import Memory
from knowstream.settings import Settings
from tests.fixtures_broker import free_port, local_settings
from tests.test_memory_e2e import sample_events, write_jsonl

FAST_RETRY = {"retry_base_s": 0.2, "retry_max_s": 2.0, "poll_timeout_ms": 500}


class Worker:
    """``ingest_flow`` in continuous mode on a daemon thread; ends after ``max_batches``."""

    def __init__(self, settings: Settings, max_batches: int) -> None:
        self.reports: list[BatchReport] = []
        self.error: BaseException | None = None

        def run() -> None:
            try:
                ingest_flow(
                    settings,
                    once=False,
                    max_batches=max_batches,
                    idle_sleep_s=0.2,
                    on_batch=self.reports.append,
                )
            except BaseException as e:  # surfaced by join()
                self.error = e

        self.thread = threading.Thread(target=run, name="ingest-worker", daemon=True)
        self.thread.start()

    def join(self, timeout_s: float) -> list[BatchReport]:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"worker still running after {timeout_s} s"
        assert self.error is None, repr(self.error)
        return self.reports


def wait_for(what: str, check: Callable[[], object], timeout_s: float) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def health_is(settings: Settings, state: str, **fields) -> Callable[[], dict | None]:
    def check() -> dict | None:
        h = read_health(settings) or {}
        ok = h.get("state") == state and all(h.get(k) == v for k, v in fields.items())
        return h if ok else None

    return check


def produce(settings: Settings, tmp: Path, events: list[dict]) -> None:
    produce_file(settings, write_jsonl(tmp / f"{uuid.uuid4().hex[:6]}.jsonl", events))


def assert_clean_versions(memory: Memory) -> None:
    """No version is left pending; every version is published or abandoned."""
    states = {v.version: v.state for v in memory.registry.versions()}
    assert set(states.values()) <= {"published", "abandoned"}, states


@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test's own (it gets stopped and restarted)."""
    close_clients()
    suffix = uuid.uuid4().hex[:8]
    settings = local_settings(
        tmp_path / "home", topic=f"t-{suffix}", group_id=f"g-{suffix}", **FAST_RETRY
    )
    start_broker(settings)
    yield settings
    stop_broker(settings)
    close_clients()


def test_broker_outage_is_retried_and_recovered(own_broker, tmp_path):
    """The broker dies under a running worker and comes back empty (memory://).

    The worker must notice (health "retrying" with the error, even while idle),
    and, once the broker is back, rejoin by itself and ingest what is produced.
    With memory:// the restarted broker has lost the topic and the committed
    offsets, so the events of the second batch are produced after the restart.
    """
    settings = own_broker
    events = sample_events(6)
    produce(settings, tmp_path, events[:3])
    worker = Worker(settings, max_batches=2)
    wait_for("first batch", health_is(settings, "running", batches=1), 180)
    assert committed_offsets(settings, settings.group_id) == {0: 3}

    stop_broker(settings)
    health = wait_for("retrying", health_is(settings, "retrying"), 60)
    assert "broker" in health["last_error"].lower() or "kafka" in health["last_error"].lower()
    assert worker.thread.is_alive() and len(worker.reports) == 1

    start_broker(settings)
    produce(settings, tmp_path, events[3:])
    reports = worker.join(120)
    assert [r.messages for r in reports] == [3, 3]
    assert [r.version for r in reports] == [1, 2]
    assert committed_offsets(settings, settings.group_id) == {0: 3}  # the new topic's 3
    memory = Memory(settings)
    assert memory.registry.live() == 2
    assert sorted(memory.view().docs()) == sorted(e["doc_id"] for e in events)
    assert_clean_versions(memory)
    assert read_health(settings)["state"] == "stopped"


def test_once_mode_does_not_mistake_a_dead_broker_for_a_drained_topic(own_broker):
    """``ingest --once`` against a broker that is gone fails loudly, never "drained"."""
    settings = own_broker.model_copy(update={"retry_attempts": 2})
    stop_broker(settings)
    with pytest.raises(Exception):  # noqa: B017 - whichever client error comes first
        ingest_flow(settings, once=True)
    health = read_health(settings)
    assert health["state"] == "failed" and health["last_error"]


def test_mlflow_server_outage_at_publish(kafka_settings, tmp_path, monkeypatch):
    """The MLflow server dies between batches; the next batch cannot publish.

    Nothing is committed and live stays put while it is down; once the server is
    back (same backend store), the worker publishes and commits by itself, and
    no version is left pending.
    """
    # One quick attempt per MLflow call: the worker's backoff does the retrying.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    close_clients()
    base = kafka_settings.model_copy(update={"home": tmp_path / "home", **FAST_RETRY})
    port = free_port()
    url = start_mlflow_server(base, port=port)
    settings = base.model_copy(update={"mlflow_uri": url})
    try:
        events = sample_events(6)
        produce(settings, tmp_path, events[:3])
        worker = Worker(settings, max_batches=2)
        wait_for("first batch", health_is(settings, "running", batches=1), 180)
        assert Memory(settings).registry.live() == 1

        stop_mlflow_server(base)
        produce(settings, tmp_path, events[3:])
        health = wait_for("retrying", health_is(settings, "retrying"), 90)
        assert health["last_error"]
        # Let it fail a few times: still nothing committed past the first batch.
        wait_for("third attempt", lambda: (read_health(settings) or {}).get("attempt", 0) >= 3, 60)
        assert committed_offsets(settings, settings.group_id) == {0: 3}
        assert len(worker.reports) == 1

        assert start_mlflow_server(base, port=port) == url
        reports = worker.join(120)
        assert [r.messages for r in reports] == [3, 3]
        assert committed_offsets(settings, settings.group_id) == {0: 6}
        memory = Memory(settings)
        assert memory.registry.live() == reports[-1].version
        assert memory.registry.get(reports[-1].version).parent == 1
        assert sorted(memory.view().docs()) == sorted(e["doc_id"] for e in events)
        assert_clean_versions(memory)
    finally:
        stop_mlflow_server(base)
        close_clients()


HOLDER = """
import sys, time
from knowstream.connectors.qdrant import open_store
from knowstream.settings import Settings
open_store(Settings(home=sys.argv[1]))
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_held_store_fails_at_once_with_one_line(memory_settings, tmp_path):
    """Another process holds the embedded store: that is not an outage, and no retry
    can end it. The worker fails at once, naming the holder and the fixes, and
    commits nothing; once the holder is gone the same batch goes through."""
    settings = memory_settings.model_copy(update=FAST_RETRY)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(settings.home), "120"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        produce(settings, tmp_path, sample_events(3))
        with pytest.raises(StoreHeld) as held:
            ingest_flow(settings, once=True)
        line = str(held.value)
        assert "\n" not in line
        assert str(settings.qdrant_location.resolve()) in line
        assert f"held by process {holder.pid}" in line and "--qdrant-url" in line
        health = read_health(settings)
        assert health["state"] == "failed" and "attempt" not in health  # never retried
        assert committed_offsets(settings, settings.group_id) == {}
    finally:
        holder.terminate()
        holder.wait(10)
    reports = ingest_flow(settings, once=True)
    assert [(r.messages, r.version) for r in reports] == [(3, 1)]
    assert committed_offsets(settings, settings.group_id) == {0: 3}
    assert len(Memory(settings).view().docs()) == 3
