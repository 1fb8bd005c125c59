"""`knowstream report` on a real memory, rendered by headless Chromium; /report serves it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from knowstream.cli import app as cli
from knowstream.connectors.kafka import produce_file
from knowstream.connectors.mlflow import Registry
from knowstream.connectors.qdrant import close_clients
from knowstream.flows.backfill import backfill_flow, rollback_flow
from knowstream.flows.ingest import ingest_flow
from knowstream.report import live_moves, versions_of
from knowstream.serving.app import create_app
from tests.browser import check_page
from tests.test_memory_e2e import UPDATE, sample_events, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("Version timeline", "Documents, chunks", "Ingest throughput", "Dead letters", "Eval")


def test_report_renders_in_chromium(memory_settings, tmp_path):
    s = memory_settings
    lines = [*map(json.dumps, sample_events(3)), "{broken"]
    produce_file(s, write_jsonl(tmp_path / "a.jsonl", lines))
    ingest_flow(s, once=True)  # v1, one dead letter
    produce_file(s, write_jsonl(tmp_path / "b.jsonl", [UPDATE]))
    ingest_flow(s, once=True)  # v2
    backfill_flow(s, start={0: 0}, end={0: 2}, base="none")  # v3, a side line
    rollback_flow(1, s)
    close_clients()

    moves = live_moves(versions_of(Registry(s)))
    assert [(v, rollback) for _, v, rollback in moves] == [(1, False), (2, False), (1, True)]

    # An eval result saved under the home (as `knowstream eval` does) is the one shown.
    run = ROOT / "models" / "runs" / "mac-squad-h200-2026-11-27" / "eval.json"
    (s.home / "eval").mkdir()
    shutil.copy(run, s.home / "eval" / "eval-1.json")
    (s.home / "eval" / "eval-2.json").write_text('{"rows": "not an eval"}')  # newer, skipped
    env = {"KNOWSTREAM_HOME": str(s.home)}
    out = CliRunner().invoke(cli, ["--mlflow-uri", s.tracking_uri, "report"], env=env)
    assert out.exit_code == 0, out.output
    page = s.home / "reports" / "report.html"
    text = page.read_text()
    assert all(title in text for title in SECTIONS)
    assert "Evaluation: eval/eval-1.json" in text and "gold_passage" in text
    assert "v1 (live)" in text and "<b>1</b>rollbacks" in text and "invalid_json" in text
    assert not re.search(r"<script|(src|href)=[\"']?https?:", text)  # self-contained, offline

    shot = s.home / "reports" / "report.png"
    check = check_page(page.as_uri(), shot)
    assert check.errors == [] and check.title == "knowstream report"
    # timeline, counts, throughput/lag, dead letters, eval chart: all drawn
    assert len(check.svgs) == 5
    for svg in check.svgs:
        assert svg["width"] > 200 and svg["height"] > 40 and svg["marks"] > 10, svg
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    with TestClient(create_app(s)) as client:
        served = client.get("/report")
    close_clients()
    assert served.status_code == 200 and served.headers["content-type"].startswith("text/html")
    assert all(title in served.text for title in SECTIONS) and served.text.count("<svg") == 5
