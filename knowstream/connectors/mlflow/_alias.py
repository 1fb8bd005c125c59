"""Moving ``live`` without importing MLflow: its SQLite registry through ``sqlite3``.

``knowstream promote`` and ``rollback`` move one alias. Through MLflow's client that
costs a new process 2.5-4 s, almost all of it importing MLflow and SQLAlchemy and
opening the store (a new process each time; BENCHMARKS.md 6.3). When the registry is
the embedded one (MLflow on SQLite under ``<home>``) these functions do the same
reads and writes on MLflow's own tables in one transaction, with the standard
library only. MLflow stays the one registry: nothing is kept anywhere else.

The fast path is taken only for a database whose schema is the revision it was
written against (``SCHEMA_REVISION``, MLflow's alembic head of the pinned version,
checked by ``tests/test_registry.py``); otherwise, for an MLflow server, or when the
database does not exist yet, the callers use :class:`Registry` (``Fallback``).
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from knowstream.errors import BadInput, VersionNotFound, VersionNotServable
from knowstream.settings import Settings

LIVE = "live"
# MLflow's schema head (alembic revision) of the pinned mlflow (constraints.txt).
SCHEMA_REVISION = "dc11669786a5"
WORKSPACE = "default"  # MLflow's workspace when workspaces are off (knowstream's case)
DELETED = "Deleted_Internal"  # MLflow's stage of a deleted version
LIVE_AT_KEEP = 150  # live_at stamps kept on a version (the report draws live's moves)


class Fallback(Exception):
    """The fast path does not apply here: use MLflow's client."""


def not_servable(version: int, state: str) -> VersionNotServable:
    return VersionNotServable(
        f"memory version {version} is {state}, not published: only published "
        "versions can go live (`knowstream snapshots` shows each state)"
    )


def not_backwards(version: int, live: int) -> BadInput:
    return BadInput(
        f"rollback goes back: version {version} is not older than live {live} "
        f"(`knowstream promote {version}` moves live forward)"
    )


def live_at(previous: str, now: datetime | None = None) -> str:
    """The ``live_at`` tag after one more move to its version."""
    stamps = [t for t in previous.split(",") if t]
    stamps.append((now or datetime.now(UTC)).isoformat(timespec="seconds"))
    return ",".join(stamps[-LIVE_AT_KEEP:])


def _database(settings: Settings) -> Path:
    if settings.mlflow_uri:
        raise Fallback("an MLflow server")
    path = settings.home / "mlflow.db"
    if not path.is_file():
        raise Fallback("no registry yet")
    return path


def _connect(settings: Settings) -> sqlite3.Connection:
    conn = sqlite3.connect(_database(settings), timeout=30.0, isolation_level=None)
    try:
        revision = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.DatabaseError:
        revision = None
    if revision is None or revision[0] != SCHEMA_REVISION:
        conn.close()
        raise Fallback(f"schema revision {revision}")
    return conn


def _live(conn: sqlite3.Connection, name: str) -> int | None:
    row = conn.execute(
        "SELECT a.version FROM registered_model_aliases a JOIN model_versions v"
        " ON v.workspace = a.workspace AND v.name = a.name AND v.version = a.version"
        " WHERE a.workspace = ? AND a.name = ? AND a.alias = ? AND v.current_stage != ?",
        (WORKSPACE, name, LIVE, DELETED),
    ).fetchone()
    return None if row is None else int(row[0])


def read_live(settings: Settings) -> int | None:
    """The live version, as ``Registry.live()``; ``Fallback`` where that must answer."""
    with closing(_connect(settings)) as conn:
        return _live(conn, settings.memory_model)


def move_live(settings: Settings, version: int, *, backwards: bool = False) -> None:
    """``Registry.set_live(version)`` (``backwards``: ``Registry.rollback``), in one
    SQLite transaction: the version must exist and be published, and for a rollback be
    older than live; then the alias moves and the version's ``live_at`` gets a stamp.
    Raises ``Fallback`` where MLflow's client must do it."""
    name = settings.memory_model
    with closing(_connect(settings)) as conn:
        conn.execute("BEGIN IMMEDIATE")  # the checks and the writes see one state
        try:
            exists = conn.execute(
                "SELECT 1 FROM model_versions WHERE workspace = ? AND name = ? AND version = ?"
                " AND current_stage != ?",
                (WORKSPACE, name, version, DELETED),
            ).fetchone()
            if exists is None:
                raise VersionNotFound(version)
            tags = dict(
                conn.execute(
                    "SELECT key, value FROM model_version_tags"
                    " WHERE workspace = ? AND name = ? AND version = ?",
                    (WORKSPACE, name, version),
                ).fetchall()
            )
            state = tags.get("state", "pending")
            if state != "published":
                raise not_servable(version, state)
            if backwards and (live := _live(conn, name)) is not None and version >= live:
                raise not_backwards(version, live)
            conn.execute(
                "INSERT OR REPLACE INTO registered_model_aliases (workspace, name, alias, version)"
                " VALUES (?, ?, ?, ?)",
                (WORKSPACE, name, LIVE, version),
            )
            conn.execute(
                "INSERT OR REPLACE INTO model_version_tags (workspace, key, name, version, value)"
                " VALUES (?, 'live_at', ?, ?, ?)",
                (WORKSPACE, name, version, live_at(tags.get("live_at") or "")),
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
