"""The CLI against a real memory: produce, ingest, snapshots, ask, status, rollback."""

from __future__ import annotations

import uuid

from typer.testing import CliRunner

from knowstream.cli import app
from knowstream.connectors.qdrant import close_clients
from tests.test_memory_e2e import sample_events, write_jsonl


def test_cli_round_trip(broker, tmp_path):
    close_clients()
    suffix = uuid.uuid4().hex[:8]
    common = [
        "--home",
        str(tmp_path / "home"),
        "--bootstrap-servers",
        broker.bootstrap_servers,
        "--topic",
        f"cli-{suffix}",
    ]
    env = {"KNOWSTREAM_GROUP_ID": f"cli-{suffix}", "COLUMNS": "200"}
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(app, [*common, *args], env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    events = write_jsonl(tmp_path / "e.jsonl", sample_events(4))
    assert "sent 4 messages" in cli("produce", str(events))
    assert "version 1" in cli("ingest", "--once")
    update = {
        **sample_events(1)[0],
        "text": "Super Bowl 50 ended 27–23.",
        "published_at": "2017-01-01T00:00:00Z",
    }
    cli("produce", str(write_jsonl(tmp_path / "u.jsonl", [update])))
    assert "version 2" in cli("ingest", "--once")

    table = cli("snapshots")
    assert "memory snapshots" in table and "published" in table
    assert "27–23" in cli("ask", "What was the final score of Super Bowl 50?", "--k", "2")
    assert "24–10" in cli(
        "ask", "What was the final score of Super Bowl 50?", "--version", "1", "--k", "2"
    )

    status = cli("status")
    assert "live version" in status and "consumer lag" in status and "dead letters" in status
    assert str(tmp_path / "home" / "logs" / "knowstream.log") in status.replace("\n", "")
    assert "live -> version 1" in cli("rollback", "1")
    assert "24–10" in cli("ask", "What was the final score of Super Bowl 50?", "--k", "2")
    for command in (
        "up",
        "ingest",
        "backfill",
        "ask",
        "snapshots",
        "rollback",
        "promote",
        "deploy",
    ):
        assert "Usage" in runner.invoke(app, [command, "--help"]).output
    close_clients()
