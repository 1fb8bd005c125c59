"""Logs that last: JSON lines under <home>/logs, knowstream at INFO, other libraries at WARNING."""

from __future__ import annotations

import json
import logging

from knowstream import logs
from knowstream.settings import Settings


def test_logs_go_to_a_file_under_home(tmp_path):
    settings = Settings(home=tmp_path / "home")
    path = logs.setup(settings)
    logs.setup(settings)  # a second setup must not write every line twice
    try:
        logging.getLogger("knowstream.flows.ingest").info("batch %d", 7, extra={"lag": 3})
        logging.getLogger("mlflow.store").info("chatter")
        logging.getLogger("kafka.conn").warning("broker gone")
        logging.getLogger("knowstream.memory").debug("not at INFO")
    finally:
        for h in logging.getLogger().handlers[:]:
            if getattr(h, "_knowstream", False):
                logging.getLogger().removeHandler(h)
                h.close()
    assert path == tmp_path / "home" / "logs" / "knowstream.log"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["logger"], x["level"], x["msg"]) for x in lines] == [
        ("knowstream.flows.ingest", "INFO", "batch 7"),
        ("kafka.conn", "WARNING", "broker gone"),
    ]
    assert lines[0]["lag"] == 3 and isinstance(lines[0]["pid"], int)
