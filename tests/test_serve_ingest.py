"""`knowstream serve --ingest` as a real process, operated from others while it runs.

One process holds the embedded store and runs the API and the continuous ingest
worker; this test produces updates to the broker and checks that ``/ask`` follows
each new version and a rollback without a restart, that ``status``, ``snapshots``,
``ask``, ``promote``, ``rollback``, ``backfill``, ``compact`` and ``retain`` from
other processes go through its API, and that a process that tries to open the
store itself gets the one clear line. Waits are hang guards, not timing assertions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from knowstream.connectors.kafka import produce_file
from tests.fixtures_broker import free_port
from tests.test_memory_e2e import UPDATE, fresh, sample_events, write_jsonl

QUESTION = "What was the final score of Super Bowl 50?"
HANG_S = 300


def wait_for(what: str, check, server: subprocess.Popen, timeout_s: float = HANG_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"serve exited ({server.returncode}) while waiting for {what}")
        try:
            if got := check():
                return got
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def served(broker, tmp_path):
    settings = fresh(broker, tmp_path)
    port = free_port()
    env = {
        **os.environ,
        "KNOWSTREAM_HOME": str(settings.home),
        "KNOWSTREAM_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "KNOWSTREAM_TOPIC": settings.topic,
        "KNOWSTREAM_GROUP_ID": settings.group_id,
        "KNOWSTREAM_POLL_TIMEOUT_MS": "500",
        "PREFECT_HOME": str(tmp_path / "prefect"),  # its own ephemeral Prefect API
        "COLUMNS": "200",
    }
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "knowstream.cli", "serve", "--ingest", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield settings, f"http://127.0.0.1:{port}", env, server
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
        log.close()
        print((tmp_path / "serve.log").read_text()[-4000:])


def cli(env: dict, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "knowstream.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    if ok:
        assert out.returncode == 0, out
    return out


def test_serve_ingest_is_operated_from_other_processes(served, tmp_path):
    settings, url, env, server = served

    def ask(version: int | None = None) -> dict:
        body = {"question": QUESTION, "k": 2, "version": version}
        r = httpx.post(f"{url}/ask", json=body, timeout=60)
        return r.json() if r.status_code == 200 else {}

    def live() -> int | None:
        return httpx.get(f"{url}/healthz", timeout=10).json()["live"]

    address = Path(settings.home) / "run" / "server.json"
    wait_for("the address file", address.exists, server)
    assert json.loads(address.read_text())["url"] == url

    # Each produced batch becomes the version /ask serves, without a restart.
    produce_file(settings, write_jsonl(tmp_path / "v1.jsonl", sample_events(4)))
    wait_for("version 1", lambda: live() == 1, server)
    first = ask()
    assert first["version"] == 1 and any("24–10" in e["text"] for e in first["evidence"])
    produce_file(settings, write_jsonl(tmp_path / "v2.jsonl", [UPDATE]))
    wait_for("version 2", lambda: live() == 2, server)
    second = ask()
    assert second["version"] == 2 and any("27–23" in e["text"] for e in second["evidence"])

    # The worker's series are on the server's /metrics: one registry per process.
    scraped = {
        (m.name, tuple(sorted(m.labels.items()))): m.value
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        for m in family.samples
    }
    topic = (("topic", settings.topic),)
    batches = (("kind", "ingest"), ("outcome", "published"), *topic)
    assert scraped[("knowstream_ingest_batches_total", batches)] == 2
    assert scraped[("knowstream_ingest_consumer_lag", (("partition", "0"), *topic))] == 0
    stage = (("counter", "accepted"), ("stage", "parse"), *topic)
    assert scraped[("knowstream_ingest_stage_items_total", stage)] == 5
    assert scraped[("knowstream_live_version", ())] == 2

    # Other processes: they go through the API while serve holds the store.
    status = cli(env, "status").stdout
    assert f"{url} (serve --ingest)" in status and "live version" in status
    snapshots = cli(env, "snapshots").stdout
    assert "memory snapshots" in snapshots and snapshots.count("published") == 2
    assert "rolled back: live -> version 1" in cli(env, "rollback", "1").stdout
    rolled = ask()  # the server moved its own alias: served at once
    assert rolled["version"] == 1 and any("24–10" in e["text"] for e in rolled["evidence"])
    assert "(memory version 1)" in cli(env, "ask", QUESTION, "--k", "2").stdout
    refused = cli(env, "rollback", "2", ok=False)
    assert refused.returncode == 1 and "not older than live 1" in refused.stderr
    assert "live -> version 2" in cli(env, "promote", "2").stdout
    assert ask()["version"] == 2
    backfill = cli(env, "backfill", "--base", "none", "--from-offset", "0:0").stdout
    assert "replayed 5 records -> version 3" in backfill
    assert live() == 2 and ask(3)["version"] == 3  # a side line; live untouched

    # A process that opens the store itself: one clear line, no retries, no traceback.
    opener = cli(env, "ingest", "--once", ok=False)
    assert opener.returncode == 1
    held = [line for line in opener.stderr.splitlines() if "is held by" in line]
    store = settings.qdrant_location.resolve()
    assert held == [opener.stderr.strip().splitlines()[-1]], opener.stderr
    assert held[0].startswith(f"error: the store at {store} is held by process {server.pid} ")
    assert "knowstream serve --ingest" in held[0] and "--qdrant-url" in held[0]
    assert "Traceback" not in opener.stderr

    # And ingest keeps going after all that.
    later = {**UPDATE, "text": UPDATE["text"] + " 71,088 attended."}
    later["published_at"] = "2017-01-01T00:00:00Z"
    produce_file(settings, write_jsonl(tmp_path / "v4.jsonl", [later]))
    wait_for("version 4", lambda: live() == 4, server)
    assert ask()["version"] == 4

    # Compaction and retention through the API: live moves to the root, the rest is freed.
    assert "compacted into version 5" in cli(env, "compact").stdout
    assert live() == 5 and any("27–23" in e["text"] for e in ask()["evidence"])
    retained = cli(env, "retain", "--keep-last", "1", "--live-days", "0").stdout
    assert "retired 4 versions: [1, 2, 3, 4]" in retained
    assert ask(2) == {} and ask()["version"] == 5

    server.send_signal(signal.SIGINT)
    assert server.wait(120) == 0
    assert not address.exists()
