"""The version registry (MLflow on SQLite): unknown versions, and lineages read once."""

from __future__ import annotations

import pytest

from knowstream.connectors.mlflow import Registry
from knowstream.errors import VersionNotFound, VersionNotServable
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
