"""The API server when the registry stops answering: it keeps serving the last live
version, and says so (log, /metrics, /healthz)."""

from __future__ import annotations

import logging
import re
import time

from fastapi.testclient import TestClient

from knowstream.connectors.qdrant import close_clients
from knowstream.metrics import Metrics
from knowstream.serving.app import create_app
from tests.fixtures_broker import local_settings


def _failures(client: TestClient) -> float:
    m = re.search(
        r"^knowstream_live_refresh_failures_total (\S+)$", client.get("/metrics").text, re.M
    )
    assert m, "the failure counter is exported"
    return float(m.group(1))


def _wait_for_more_failures(client: TestClient, than: float) -> float:
    deadline = time.monotonic() + 120  # a bound on waiting, not an assertion on speed
    while (n := _failures(client)) <= than:
        assert time.monotonic() < deadline, "the refresh never failed"
        time.sleep(0.1)
    return n


def test_failed_refresh_of_live_is_logged_counted_and_aged(tmp_path, caplog):
    settings = local_settings(tmp_path / "home")
    app = create_app(settings, poll_s=0.05, metrics=Metrics())
    try:
        with TestClient(app) as client, caplog.at_level(logging.WARNING):
            assert _failures(client) == 0
            health = client.get("/healthz").json()
            assert health["status"] == "ok" and health["live"] is None
            # The registry's database becomes unreadable under the running server.
            (tmp_path / "home" / "mlflow.db").write_bytes(b"not a database" * 4096)
            first = _wait_for_more_failures(client, 0)
            age = client.get("/healthz").json()["live_age_s"]
            _wait_for_more_failures(client, first + 20)  # 20 polls: ages >= 1 s more
            assert client.get("/healthz").json()["live_age_s"] > age  # no successful read since
        assert any("reading live failed" in r.getMessage() for r in caplog.records)
    finally:
        close_clients()
