"""Local services: start, status, stop, port conflicts, durable storage."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from knowstream.connectors.kafka import EventProducer, ensure_topics, read_range
from knowstream.infra.services import (
    S3_PORT_ENV,
    ServiceError,
    broker_status,
    start_broker,
    stop_all,
    stop_broker,
)
from knowstream.settings import Settings
from tests.fixtures_broker import free_port, local_settings


def test_port_taken_by_another_process_is_a_clear_error(tmp_path: Path) -> None:
    # Bound but not listening: connecting fails, yet the broker could not bind.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        settings = local_settings(tmp_path, bootstrap_servers=f"127.0.0.1:{port}")
        with pytest.raises(ServiceError, match=f"port {port} on 127.0.0.1 is already in use"):
            start_broker(settings)
    assert not broker_status(settings)["running"]


def test_non_loopback_host_is_refused(tmp_path: Path) -> None:
    settings = local_settings(tmp_path, bootstrap_servers="10.20.30.40:9092")
    with pytest.raises(ServiceError, match="not a loopback address"):
        start_broker(settings)


def test_status_follows_start_and_stop(tmp_path: Path) -> None:
    settings = local_settings(tmp_path)
    assert broker_status(settings)["running"] is False
    start_broker(settings)
    try:
        status = broker_status(settings)
        assert status["running"] is True
        assert status["address"] == settings.bootstrap_servers
        assert status["storage"] == "memory://tansu/"
        assert (settings.run_dir / "broker.pid").read_text().strip() == str(status["pid"])
        start_broker(settings)  # already running: no-op, same process
        assert broker_status(settings)["pid"] == status["pid"]
    finally:
        stop_all(settings)
    assert broker_status(settings) == {**status, "running": False, "pid": None}
    assert not (settings.run_dir / "broker.pid").exists()


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is needed to install s3rver")
def test_s3_storage_survives_a_broker_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(S3_PORT_ENV, str(free_port()))
    settings: Settings = local_settings(tmp_path, broker_storage="s3://tansu/", topic="durable")
    start_broker(settings)
    try:
        assert broker_status(settings)["s3"]["running"] is True
        ensure_topics(settings, [settings.topic], 1)
        with EventProducer(settings) as producer:
            for i in range(20):
                producer.send(settings.topic, None, b"kept-%d" % i)
        stop_broker(settings)
        assert broker_status(settings)["s3"]["running"] is False
        start_broker(settings)
        values = [r.value for r in read_range(settings, settings.topic)]
        assert values == [b"kept-%d" % i for i in range(20)]
    finally:
        stop_broker(settings)
