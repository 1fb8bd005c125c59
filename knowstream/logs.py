"""Logs that last: the terminal, and JSON lines in a rotating file under ``<home>/logs/``.

Every module logs through ``logging.getLogger(__name__)`` (``knowstream.*``). Entry
points call :func:`setup` once. Prefect attaches its API handler to the
``knowstream`` logger too (``PREFECT_LOGGING_EXTRA_LOGGERS``), so the flow-run
pages in Prefect's UI show the same lines; its own chatter and that of the other
libraries stay at WARNING.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from logging.handlers import RotatingFileHandler
from pathlib import Path

from knowstream.settings import Settings

# Libraries that log a lot at INFO (one line per HTTP call, per Beam bundle, per migration).
QUIET = (
    "prefect",
    "mlflow",
    "alembic",
    "apache_beam",
    "kafka",
    "urllib3",
    "httpx",
    "httpcore",
    "qdrant_client",
    "torch",
    "transformers",
    "sentence_transformers",
    "matplotlib",
)
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5


def log_file(settings: Settings) -> Path:
    return settings.home / "logs" / "knowstream.log"


def history_file(settings: Settings) -> Path:
    """One JSON line per processed batch (``flows/observe.py``), plotted by the report."""
    return settings.home / "history" / "batches.jsonl"


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, pid, message, and any ``extra=``."""

    _plain = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in self._plain})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (test runners and rich swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _not_beam_root(record: logging.LogRecord) -> bool:
    """Beam warns through the root logger about optional cloud clients; the file keeps it."""
    return not (record.name == "root" and "apache_beam" in record.pathname)


def setup(settings: Settings, *, level: str | None = None) -> Path:
    """Send ``knowstream.*`` at ``level`` (default ``settings.log_level``) to stderr and to
    the rotating file, other libraries' warnings to both; returns the file's path."""
    # Before Prefect and MLflow are imported: they configure their loggers from these.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "knowstream")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    path = log_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = RotatingFileHandler(path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8")
    to_file.setFormatter(JsonLines())
    to_terminal = _Stderr()
    to_terminal.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_terminal.addFilter(_not_beam_root)
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_knowstream", False)]:
        root.removeHandler(h)  # setup twice in one process (tests) must not double lines
        h.close()
    ours: list[logging.Handler] = [to_file, to_terminal]
    for h in ours:
        h._knowstream = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.WARNING)
    logging.getLogger("knowstream").setLevel(level or settings.log_level)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    return path
