"""The ingest worker's health record, ``<home>/run/ingest.json``.

Written by the ingest flow, read by ``status``, ``/healthz`` and ``/admin/status``:
a plain file, so readers need neither the flow nor a running worker.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from knowstream.settings import Settings


def health_path(settings: Settings) -> Path:
    return settings.run_dir / "ingest.json"


def write_health(settings: Settings, **fields) -> None:
    """Atomically replace the worker's health record."""
    path = health_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "updated_at": datetime.now(UTC).isoformat(timespec="seconds")}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**record, **fields}, default=str))
    tmp.replace(path)


def read_health(settings: Settings) -> dict | None:
    try:
        return json.loads(health_path(settings).read_text())
    except (OSError, ValueError):
        return None
