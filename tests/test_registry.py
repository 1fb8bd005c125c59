"""The version registry (MLflow on SQLite): unknown versions, lineages read once, and
``live`` moved through MLflow's SQLite tables without MLflow (``_alias``, the CLI's
promote/rollback/status)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from knowstream.connectors.mlflow import Registry, _alias
from knowstream.errors import BadInput, VersionNotFound, VersionNotServable
from tests.fixtures_broker import local_settings


@pytest.fixture
def registry(tmp_path):
    return Registry(local_settings(tmp_path / "home"))


def test_unknown_version_is_its_own_error_not_a_key_error(registry):
    with pytest.raises(VersionNotFound, match="memory version 999 does not exist") as e:
        registry.get(999)
    assert not isinstance(e.value, KeyError) and e.value.version == 999
    with pytest.raises(VersionNotFound):
        registry.lineage(999)
    pending, _ = registry.reserve(None, "ingest")
    with pytest.raises(VersionNotServable, match="pending, not published"):
        registry.set_live(pending)


def test_a_lineage_is_read_from_the_registry_once(registry, tmp_path):
    v1, _ = registry.reserve(None, "ingest")
    v2, _ = registry.reserve(v1, "ingest")
    assert registry.lineage(v2) == [v2, v1]
    # The registry's database becomes unreadable: a lineage already read needs no read.
    db = tmp_path / "home" / "mlflow.db"
    db.write_bytes(b"not a database" * 4096)
    assert registry.lineage(v2) == [v2, v1]
    with pytest.raises(Exception, match="not a database"):
        registry.versions()


def published(registry: Registry, parent: int | None = None) -> int:
    version, _ = registry.reserve(parent, "ingest")
    registry.client.set_model_version_tag(registry.name, str(version), "state", "published")
    return version


def test_the_fast_path_knows_the_schema_of_the_pinned_mlflow(registry):
    # A new MLflow with a new schema makes every move take the MLflow path (Fallback):
    # bump SCHEMA_REVISION once the tables _alias writes are checked against it.
    db = registry.settings.home / "mlflow.db"
    with sqlite3.connect(db) as conn:
        (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert revision == _alias.SCHEMA_REVISION


def test_live_moved_without_mlflow_is_what_mlflow_reads(registry):
    s = registry.settings
    assert _alias.read_live(s) is None and registry.live() is None
    v1 = published(registry)
    v2 = published(registry, v1)
    _alias.move_live(s, v2)
    assert registry.live() == _alias.read_live(s) == v2
    _alias.move_live(s, v1, backwards=True)
    assert registry.live() == _alias.read_live(s) == v1
    assert len(registry.get(v1).tags["live_at"].split(",")) == 1
    # MLflow's own path goes on from there, and the fast path reads what it wrote.
    registry.set_live(v2)
    assert _alias.read_live(s) == v2
    _alias.move_live(s, v1, backwards=True)
    assert registry.live() == v1
    assert len(registry.get(v1).tags["live_at"].split(",")) == 2


def test_the_fast_path_refuses_what_mlflows_path_refuses(registry):
    s = registry.settings
    v1 = published(registry)
    v2 = published(registry, v1)
    pending, _ = registry.reserve(v2, "ingest")
    _alias.move_live(s, v1)
    cases = [
        (lambda: _alias.move_live(s, 999), lambda: registry.set_live(999), VersionNotFound),
        (
            lambda: _alias.move_live(s, pending),
            lambda: registry.set_live(pending),
            VersionNotServable,
        ),
        (lambda: _alias.move_live(s, v2, backwards=True), lambda: registry.rollback(v2), BadInput),
        (lambda: _alias.move_live(s, v1, backwards=True), lambda: registry.rollback(v1), BadInput),
    ]
    for fast, mlflow, error in cases:
        with pytest.raises(error) as refused_fast:
            fast()
        with pytest.raises(error) as refused:
            mlflow()
        assert str(refused_fast.value) == str(refused.value)
        assert registry.live() == v1  # nothing moved
        assert "live_at" not in registry.get(v2).tags


def test_the_fast_path_leaves_servers_new_homes_and_other_schemas_to_mlflow(tmp_path):
    server = local_settings(tmp_path / "a", mlflow_uri="http://127.0.0.1:1")
    new_home = local_settings(tmp_path / "b")
    for s in (server, new_home):
        with pytest.raises(_alias.Fallback):
            _alias.move_live(s, 1)
        with pytest.raises(_alias.Fallback):
            _alias.read_live(s)
    other = local_settings(tmp_path / "c")
    registry = Registry(other)
    published(registry)
    with sqlite3.connect(other.home / "mlflow.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'a-newer-one'")
    with pytest.raises(_alias.Fallback):
        _alias.move_live(other, 1)
    assert registry.live() is None


def test_cli_moves_live_without_importing_mlflow(registry):
    """promote, rollback and status without a server import no MLflow (2 s of a 2.5 s
    command, BENCHMARKS.md 6.3): the alias moves in MLflow's SQLite tables."""
    v1 = published(registry)
    v2 = published(registry, v1)
    home = registry.settings.home
    script = textwrap.dedent(
        f"""
        import sys
        from typer.testing import CliRunner
        from knowstream.cli import app
        runner = CliRunner()
        for args in (["promote", "{v2}"], ["rollback", "{v1}"]):
            result = runner.invoke(app, ["--home", r"{home}", *args], catch_exceptions=False)
            assert result.exit_code == 0, result.output
            print(result.output.strip())
        print("mlflow imported:", "mlflow" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "live -> version 2" in out.stdout and "rolled back: live -> version 1" in out.stdout
    assert "mlflow imported: False" in out.stdout
    assert registry.live() == v1
