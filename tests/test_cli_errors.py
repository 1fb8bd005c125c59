"""Each expected failure of the CLI: one line on stderr naming the cause and the fix,
exit code 1, no traceback (unless --debug) and no third-party noise. Real processes:
interpreter-exit noise (a Qdrant client's __del__) only shows there."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from knowstream.connectors.kafka import produce_file
from tests.fixtures_broker import free_port

KNOWSTREAM = str(Path(sys.executable).parent / "knowstream")


def knowstream(home: Path, *args: str, servers: str | None = None) -> subprocess.CompletedProcess:
    servers = servers or f"127.0.0.1:{free_port()}"  # nothing listens there
    argv = [KNOWSTREAM, "--home", str(home), "--bootstrap-servers", servers, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


# knowstream's own progress records (INFO, knowstream.*) are the log stream, not failures.
OWN_LOG = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO knowstream\.")


def one_line_failure(result: subprocess.CompletedProcess, *expected: str) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if not OWN_LOG.match(line)]
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stdout
    for part in expected:
        assert part in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["promote", "999"], ["memory version 999 does not exist", "knowstream snapshots"]),
        (["rollback", "999"], ["memory version 999 does not exist"]),
        (["backfill", "--from-offset", "abc"], ["'abc' is not PARTITION:OFFSET", "0:1200"]),
        (["backfill", "--from-time", "yesterday"], ["'yesterday' is not an ISO-8601 time"]),
        (["ask", "--k", "-1", "Who won?"], ["--k -1", "at least 1"]),
        (["produce", "missing.jsonl"], ["no file missing.jsonl", "JSONL or Parquet"]),
        (["backfill", "--amortizer", "no-such-ckpt"], ["'no-such-ckpt': no checkpoint", "bundled"]),
    ],
)
def test_bad_input_fails_in_one_line(tmp_path, args, expected):
    one_line_failure(knowstream(tmp_path / "home", *args), *expected)


def test_an_invalid_setting_names_itself_and_its_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("KNOWSTREAM_AMORTIZER", "models:/a/b/c")
    line = one_line_failure(
        knowstream(tmp_path / "home", "snapshots"),
        "invalid setting amortizer [KNOWSTREAM_AMORTIZER]",
        "models:/NAME@ALIAS",
    )
    assert "unexpected" not in line


def test_status_with_the_broker_down_says_so_in_one_line(tmp_path):
    result = knowstream(tmp_path / "home", "status")
    one_line_failure(result, "no Kafka broker answers at 127.0.0.1:", "knowstream up")
    assert "knowstream status" in result.stdout  # the rest of the table is still shown


def test_a_store_held_by_another_process_fails_in_one_line(kafka_settings, tmp_path):
    home = tmp_path / "home"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys
                from knowstream.memory import Memory
                from knowstream.settings import Settings
                Memory(Settings(home={str(home)!r})).open_store()
                print("holding", flush=True)
                sys.stdin.read()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        servers = kafka_settings.bootstrap_servers
        result = knowstream(
            home, "--topic", kafka_settings.topic, "ingest", "--once", servers=servers
        )
        one_line_failure(result, "is held by process", "--qdrant-url")
    finally:
        holder.stdin.close()
        holder.wait(60)


def test_a_backfill_over_a_range_without_records_says_so(kafka_settings, tmp_path):
    events = tmp_path / "events.jsonl"
    doc = {
        "doc_id": "d1",
        "op": "upsert",
        "title": "T",
        "text": "Some text.",
        "published_at": "2016-01-01T00:00:00Z",
    }
    events.write_text(json.dumps(doc) + "\n")
    produce_file(kafka_settings, events)
    result = knowstream(
        tmp_path / "home",
        "--topic",
        kafka_settings.topic,
        "backfill",
        "--base",
        "none",
        "--from-offset",
        "0:99999",
        servers=kafka_settings.bootstrap_servers,
    )
    one_line_failure(result, f"no records in that range of {kafka_settings.topic}")


def test_debug_shows_the_traceback(tmp_path):
    result = knowstream(tmp_path / "home", "--debug", "promote", "999")
    assert result.returncode == 1
    assert "Traceback" in result.stdout + result.stderr and "VersionNotFound" in result.stderr


def test_a_clean_command_prints_no_third_party_noise(tmp_path):
    result = knowstream(tmp_path / "home", "snapshots")
    assert result.returncode == 0 and result.stderr == "", result.stderr
