"""Talking to a running ``knowstream serve``: its address file and its HTTP API.

The embedded store admits one process. While ``serve`` runs it holds the store
and writes its address to ``<home>/run/server.json``; the CLI commands that
need the memory (``status``, ``snapshots``, ``ask``, ``promote``, ``rollback``,
``backfill``) then go through its API instead of opening the store themselves.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

from knowstream.settings import Settings


def address_path(settings: Settings):
    return settings.run_dir / "server.json"


def write_address(settings: Settings, url: str, *, ingest: bool) -> None:
    path = address_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "url": url,
        "pid": os.getpid(),
        "ingest": ingest,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def remove_address(settings: Settings) -> None:
    """Remove the address file if it is this process's (a newer server may own it)."""
    path = address_path(settings)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def running_server(settings: Settings) -> str | None:
    """The URL of the server of this home, if one is running; None otherwise."""
    try:
        record = json.loads(address_path(settings).read_text())
        os.kill(int(record["pid"]), 0)  # a file left by a killed server names a dead pid
    except (OSError, ValueError, KeyError):
        return None
    return record["url"]


class ApiError(RuntimeError):
    """The server refused the request; the message is its one-line reason."""


def call(settings: Settings, url: str, method: str, path: str, body: dict | None = None):
    """One request to the server; its JSON answer, or :class:`ApiError`."""
    import httpx  # here: finding no server (the CLI's first question) needs no HTTP client

    headers = {}
    if settings.api_token:
        headers["Authorization"] = f"Bearer {settings.api_token.get_secret_value()}"
    # Backfills run a whole batch inside the server: no read timeout.
    timeout = httpx.Timeout(10.0, read=None)
    r = httpx.request(method, url + path, json=body, headers=headers, timeout=timeout)
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise ApiError(f"{method} {url}{path}: {r.status_code} {detail}")
    return r.json()
