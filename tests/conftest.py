"""Shared fixtures: real services only (tansu broker, Qdrant local, MLflow SQLite, Prefect).

The broker fixtures live in ``fixtures_broker``; here: a Prefect home shared by
the session (its first flow run sets up a local API, ~20 s, once) and settings
for a fresh, isolated memory per test.
"""

from __future__ import annotations

import os
import tempfile

import pytest

# Before Prefect is imported anywhere: a private, ephemeral local API.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="knowstream-prefect-"))
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["tests.fixtures_broker"]


@pytest.fixture
def memory_settings(kafka_settings, tmp_path):
    """Settings for an empty memory (own Qdrant path and MLflow DB) on a fresh topic."""
    from knowstream.connectors.qdrant import close_clients

    settings = kafka_settings.model_copy(update={"home": tmp_path / "home"})
    yield settings
    close_clients()
