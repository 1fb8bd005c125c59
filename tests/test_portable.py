"""Past one machine: the micro-batch pipeline on Beam's portable runner (job service +
EXTERNAL SDK workers from a worker pool) and on FnApiRunner with 2 worker processes,
staging on s3rver, against the same micro-batch in-process. The portable run takes its
amortizer from the MLflow registry (the bundled weights registered as version 1): the
driver shares the pinned checkpoint under the staging URL and the pool's workers load it
from there, not from the driver's disk.

Real processes throughout: tansu, s3rver, ``local_job_service_main`` and the worker pool
(``services.start_beam``, what ``knowstream up --beam`` runs), Qdrant local, MLflow.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs
import pytest
from typer.testing import CliRunner

from knowstream.cli import app
from knowstream.connectors.kafka import produce_file
from knowstream.connectors.qdrant import close_clients
from knowstream.flows.ingest import ingest_flow
from knowstream.flows.train import train_register
from knowstream.health import read_health
from knowstream.infra.services import start_beam, start_s3, stop_beam, stop_s3
from knowstream.memory import Memory
from knowstream.models.inference import bundled_checkpoint
from knowstream.pipelines.checkpoints import MARKER
from knowstream.pipelines.pipeline import PipelineFailed
from knowstream.settings import Settings
from tests.fixtures_broker import free_port, local_settings

pytestmark = pytest.mark.skipif(shutil.which("npm") is None, reason="s3rver comes from npm")

SAMPLE = Path(__file__).parent.parent / "data" / "sample" / "stream.jsonl"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, list[str]]]:
    """s3rver with a staging bucket, Beam's job service and a worker pool; yields the
    settings that reach them and the portable runner's Beam arguments."""
    home = tmp_path_factory.mktemp("cluster")
    settings = local_settings(
        home, staging="s3://staging/batches", s3_endpoint_url=f"http://127.0.0.1:{free_port()}"
    )
    env = pytest.MonkeyPatch()
    try:
        for k, v in start_s3(settings).items():  # the driver's S3 credentials
            env.setenv(k, v)
        # The pool's own temporary folder (its workers' checkpoint cache): a disk of its own.
        with pytest.MonkeyPatch.context() as pool_env:
            (home / "pool-tmp").mkdir()
            pool_env.setenv("TMPDIR", str(home / "pool-tmp"))
            beam_args = start_beam(settings, free_port(), free_port())
        yield settings, beam_args
    finally:
        stop_beam(settings)
        stop_s3(settings)
        env.undo()


def _sample(tmp_path: Path, n: int) -> Path:
    lines = SAMPLE.read_text().splitlines()[:n] + ["not json: a dead letter"]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(kafka_settings: Settings, cluster_settings: Settings, home: Path, **beam) -> Settings:
    return kafka_settings.model_copy(
        update={
            "home": home,
            "group_id": f"{kafka_settings.group_id}-{home.name}",
            "staging": cluster_settings.staging,
            "s3_endpoint_url": cluster_settings.s3_endpoint_url,
            # One document (and chunk) per forward pass: float16 entries depend on which
            # documents share a padded batch, and 2 workers split the batch differently.
            "amortize_batch": 1,
            "embed_batch": 1,
            "retry_attempts": 1,
            **beam,
        }
    )


def _digest(settings: Settings, version: int) -> str:
    try:
        return Memory(settings).view(version).digest()
    finally:
        close_clients()


def test_portable_and_multiprocessing_runs_publish_the_in_process_memory(
    kafka_settings, cluster, tmp_path
):
    cluster_settings, portable = cluster
    produce_file(kafka_settings, _sample(tmp_path, 3))
    runs = {
        "in-process": ["--runner=FnApiRunner"],
        "portable": portable,
        "multi-processing": [
            "--runner=FnApiRunner",
            "--direct_running_mode=multi_processing",
            "--direct_num_workers=2",
        ],
    }
    digests = {}
    for name, args in runs.items():
        settings = _run(kafka_settings, cluster_settings, tmp_path / name, beam_args=args)
        if name == "portable":
            settings = _with_registry_amortizer(settings, tmp_path)
        reports = ingest_flow(settings, once=True)
        assert [r.version for r in reports] == [1], name
        assert reports[0].counters["parse.accepted"] == 3
        assert len(reports[0].dead_letters) == 1
        digests[name] = _digest(settings, 1)
        # Staged on s3rver, read back, removed: nothing staged under the home.
        assert not (settings.home / "staging").exists()
        if name == "portable":  # the manifest names the registry version, as on one machine
            versions = Memory(settings).registry.manifest(1).model_versions
            close_clients()
            assert versions["amortizer_model"] == "knowstream-amortizer"
            assert versions["amortizer_model_version"] == "1"
    assert digests["portable"] == digests["in-process"]
    assert digests["multi-processing"] == digests["in-process"]
    # Each batch's objects were removed after its publish; the registry checkpoint the
    # portable run shared stays (content-addressed, for the next batches).
    endpoint = urlparse(cluster_settings.s3_endpoint_url)
    s3 = pafs.S3FileSystem(endpoint_override=endpoint.netloc, scheme="http", region="us-east-1")
    left = s3.get_file_info(
        pafs.FileSelector("staging/batches", recursive=True, allow_not_found=True)
    )
    files = sorted(f.path for f in left if f.type == pafs.FileType.File)
    shared = files[0].rsplit("/", 1)[0]
    assert shared.startswith("staging/batches/models/knowstream-amortizer-v1-")
    assert files == [f"{shared}/{f}" for f in sorted((MARKER, *CHECKPOINT))]
    # The pool's workers loaded it from there: their copy, on their disk, is the bundled one.
    worker_copy = (
        cluster_settings.home / "pool-tmp" / "knowstream-checkpoints" / shared.rsplit("/")[-1]
    )
    for f in CHECKPOINT:
        assert (worker_copy / f).read_bytes() == (bundled_checkpoint() / f).read_bytes()


CHECKPOINT = ("config.json", "model.safetensors")


def _with_registry_amortizer(settings: Settings, tmp_path: Path) -> Settings:
    """``settings`` with the amortizer "registry", whose live version 1 is the bundled
    checkpoint (registered as ``flows/train.py`` registers a trained one)."""
    metrics = tmp_path / "metrics.json"
    metrics.write_text(
        json.dumps(
            {"config": {}, "mac_config": {}, "n_params": 0, "device": "cpu", "train": [], "val": []}
        )
    )
    out = train_register(str(metrics), str(bundled_checkpoint()), settings=settings)
    assert out["version"] == 1
    return settings.model_copy(update={"amortizer": "registry"})


def test_a_worker_error_reaches_status_and_the_logs_with_its_traceback(
    kafka_settings, cluster, tmp_path
):
    cluster_settings, portable = cluster
    produce_file(kafka_settings, _sample(tmp_path, 1))
    # A bucket nobody created: only the workers touch staging, so only they fail.
    settings = _run(kafka_settings, cluster_settings, tmp_path / "home", beam_args=portable)
    settings = settings.model_copy(update={"staging": "s3://no-such-bucket/batches"})
    with pytest.raises(PipelineFailed, match="NoSuchBucket") as failed:
        ingest_flow(settings, once=True)
    assert "Traceback (most recent call last)" in str(failed.value)
    health = read_health(settings)
    assert health["state"] == "failed" and "NoSuchBucket" in health["last_error"]
    assert "Traceback" in health["last_error"]
    job_log = (cluster_settings.run_dir / "beam-job.log").read_text()
    assert "NoSuchBucket" in job_log
    close_clients()
    shown = CliRunner().invoke(
        app,
        [
            "--home",
            str(settings.home),
            "--bootstrap-servers",
            settings.bootstrap_servers,
            "--topic",
            settings.topic,
            "status",
        ],
        env={"COLUMNS": "400"},
    )
    close_clients()
    assert shown.exit_code == 0, shown.output
    assert "NoSuchBucket" in shown.output
    assert Memory(settings).registry.live() is None  # nothing published
    close_clients()
