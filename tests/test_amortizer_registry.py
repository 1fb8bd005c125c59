"""The amortizer from the MLflow registry: versions, aliases, the local cache, manifests.

Real parts only: MLflow on SQLite in a tmp home (two small checkpoints registered by
``flows/train.py``'s ``train_register``), Prefect's local API, Beam's FnApiRunner and
Qdrant local mode for the backfills. No Kafka: backfills replay a Parquet archive.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from knowstream.connectors.mlflow._registry import (
    AmortizerRegistryError,
    ResolvedAmortizer,
    amortizer_cache_dir,
    resolve_amortizer,
)
from knowstream.connectors.qdrant import close_clients
from knowstream.flows.backfill import backfill_flow, promote_flow
from knowstream.flows.batch import fingerprint, model_versions
from knowstream.flows.train import train_register
from knowstream.memory import Memory
from knowstream.models.inference import load_amortizer
from knowstream.models.mac import MAC, MACConfig
from knowstream.pipelines.stages.amortize import Amortize
from knowstream.schemas.event import EVENT_SCHEMA
from tests.fixtures_broker import free_port, local_settings
from tests.test_memory_e2e import sample_events

NAME = "knowstream-amortizer"
LIVE_SPEC = f"models:/{NAME}@live"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A home whose registry holds two amortizer versions (seeds 1 and 2): settings,
    {registry version: weights hash}."""
    tmp = tmp_path_factory.mktemp("amortizer-registry")
    settings = local_settings(tmp / "home", amortizer="init")
    metrics = tmp / "metrics.json"
    metrics.write_text(
        json.dumps(
            {"config": {}, "mac_config": {}, "n_params": 0, "device": "cpu", "train": [], "val": []}
        )
    )
    hashes = {}
    for seed in (1, 2):
        checkpoint = tmp / f"seed{seed}"
        MAC.init(MACConfig(seed=seed)).save(checkpoint)
        # the first becomes live, the second is registered without moving the alias
        out = train_register(str(metrics), str(checkpoint), alias=seed == 1, settings=settings)
        hashes[out["version"]] = MAC.load(checkpoint).version
    assert sorted(hashes) == [1, 2] and len(set(hashes.values())) == 2
    yield settings, hashes
    close_clients()


def point_live(settings, version: int) -> None:
    MlflowClient(settings.tracking_uri).set_registered_model_alias(NAME, "live", str(version))


def test_alias_resolves_to_one_cached_version_and_follows_the_alias(registered):
    settings, hashes = registered
    point_live(settings, 1)
    r = resolve_amortizer(settings, LIVE_SPEC)
    assert (r.name, r.version) == (NAME, 1)
    assert Path(r.path) == amortizer_cache_dir(settings, NAME, 1)
    assert Path(r.path).is_relative_to(settings.home / "cache" / "amortizer")
    assert load_amortizer(r.path).version == hashes[1]
    assert resolve_amortizer(settings, "registry") == ResolvedAmortizer("registry", r.path, NAME, 1)

    point_live(settings, 2)  # the alias moves: the next resolve gets the other version
    r2 = resolve_amortizer(settings, LIVE_SPEC)
    assert (r2.version, load_amortizer(r2.path).version) == (2, hashes[2])
    assert Path(r.path).is_dir()  # the older copy stays (a batch may still be using it)

    pinned = resolve_amortizer(settings, f"models:/{NAME}/1")
    assert (pinned.version, pinned.path) == (1, r.path)
    # Only complete folders: the temporary download folders were renamed or removed.
    assert sorted(p.name for p in (settings.home / "cache" / "amortizer").iterdir()) == [
        f"{NAME}-v1",
        f"{NAME}-v2",
    ]
    # The manifest's versions name the registry version; the fingerprint ignores it
    # (the weights hash is in it already).
    versions = model_versions(settings, r2)
    assert versions["amortizer"] == hashes[2]
    assert (versions["amortizer_model"], versions["amortizer_model_version"]) == (NAME, "2")
    plain = {k: v for k, v in versions.items() if not k.startswith("amortizer_model")}
    assert fingerprint(versions) == fingerprint(plain)
    bf16 = settings.model_copy(update={"amortize_dtype": "bfloat16"})
    assert fingerprint(model_versions(bf16, r2)) != fingerprint(versions)

    with pytest.raises(LookupError, match="nope"):
        resolve_amortizer(settings, f"models:/{NAME}@nope")
    with pytest.raises(LookupError):
        resolve_amortizer(settings, f"models:/{NAME}/9")
    with pytest.raises(ValueError, match="resolve"):
        Amortize(LIVE_SPEC, 1)  # the Beam stage only takes a resolved folder


def test_registry_down_is_a_clear_error_but_a_cached_pin_needs_none(registered, monkeypatch):
    settings, hashes = registered
    resolve_amortizer(settings, f"models:/{NAME}/1")  # in the cache
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    down = settings.model_copy(update={"mlflow_uri": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(AmortizerRegistryError, match="unreadable"):
        resolve_amortizer(down, LIVE_SPEC)  # an alias must be asked
    pinned = resolve_amortizer(down, f"models:/{NAME}/1")
    assert load_amortizer(pinned.path).version == hashes[1]


def archive(path: Path, n: int = 2) -> Path:
    rows = []
    for e in sample_events(n):
        at = datetime.fromisoformat(e["published_at"].replace("Z", "+00:00")).astimezone(UTC)
        rows.append({**e, "published_at": at, "metadata": json.dumps(e.get("metadata", {}))})
    pq.write_table(pa.Table.from_pylist(rows, schema=EVENT_SCHEMA), path)
    return path


def test_backfill_with_a_new_version_is_a_promotable_side_line(registered, tmp_path):
    settings, hashes = registered
    events = archive(tmp_path / "events.parquet")
    point_live(settings, 1)
    first = backfill_flow(settings, archive=str(events), base="none", amortizer=LIVE_SPEC)
    memory = Memory(settings)
    memory.set_live(first.version)
    m1 = memory.registry.manifest(first.version).model_versions
    assert (m1["amortizer_model"], m1["amortizer_model_version"], m1["amortizer"]) == (
        NAME,
        "1",
        hashes[1],
    )

    # A new amortizer version: the same events rebuilt on live, as a side line.
    point_live(settings, 2)
    side = backfill_flow(settings, archive=str(events), base="live", amortizer=LIVE_SPEC)
    assert side.counters["amortize.docs"] == 2  # other weights: the documents are rebuilt
    assert memory.registry.live() == first.version  # live untouched
    m2 = memory.registry.manifest(side.version).model_versions
    assert (m2["amortizer_model_version"], m2["amortizer"]) == ("2", hashes[2])
    assert memory.registry.get(side.version).parent == first.version

    promote_flow(side.version, settings)
    assert memory.registry.live() == side.version
