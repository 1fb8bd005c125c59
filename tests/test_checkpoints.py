"""Amortizer checkpoints shared under an ``s3://`` staging URL (``pipelines/checkpoints.py``):
what the driver uploads once and a worker on another machine copies back and loads.

Real s3rver (``services.start_s3``, as ``knowstream up`` runs it) and Beam's S3 filesystem;
the "worker" is this process with Beam's filesystem options set as an SDK worker sets them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from knowstream.connectors import staging as staging_store
from knowstream.infra.services import start_s3, stop_s3
from knowstream.models.inference import bundled_checkpoint
from knowstream.models.mac import MAC
from knowstream.pipelines.checkpoints import MARKER, local_checkpoint, share_checkpoint
from knowstream.settings import Settings
from tests.fixtures_broker import free_port, local_settings

pytestmark = pytest.mark.skipif(shutil.which("npm") is None, reason="s3rver comes from npm")

FILES = ("config.json", "model.safetensors")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, PipelineOptions]]:
    """s3rver with a staging bucket; the settings and the Beam options that reach it, set
    as this process's filesystem options (what a Beam worker gets from its job)."""
    home = tmp_path_factory.mktemp("s3")
    settings = local_settings(
        home, staging="s3://staging/batches", s3_endpoint_url=f"http://127.0.0.1:{free_port()}"
    )
    env = pytest.MonkeyPatch()
    before = FileSystems._pipeline_options
    try:
        for k, v in start_s3(settings).items():
            env.setenv(k, v)
        options = PipelineOptions(staging_store.beam_options(settings))
        FileSystems.set_options(options)
        yield settings, options
    finally:
        FileSystems.set_options(before)
        stop_s3(settings)
        env.undo()


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A pinned registry folder as ``resolve_amortizer`` leaves it (the bundled weights)."""
    folder = tmp_path / "driver" / "knowstream-amortizer-v1"
    folder.mkdir(parents=True)
    for f in FILES:
        shutil.copy(bundled_checkpoint() / f, folder / f)
    return folder


def _write(url: str, data: bytes) -> None:
    with FileSystems.create(url, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)


def _read(url: str) -> bytes:
    with FileSystems.open(url, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def _same_files(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in FILES)


def test_a_shared_checkpoint_loads_back_on_another_machine_and_is_shared_once(
    s3, checkpoint, tmp_path
):
    settings, options = s3
    url = share_checkpoint(str(checkpoint), settings.staging_url, options)
    prefix = "s3://staging/batches/models/knowstream-amortizer-v1-"
    assert url.startswith(prefix) and len(url) == len(prefix) + 16
    assert _read(f"{url}/model.safetensors") == (checkpoint / "model.safetensors").read_bytes()

    # A worker: a fresh local folder with the same bytes and the same weights hash.
    worker = tmp_path / "worker"
    local = Path(local_checkpoint(url, into=worker))
    assert local.parent == worker and local.name == url.rsplit("/", 1)[1]
    assert _same_files(local, checkpoint)
    assert MAC.load(local).version == MAC.load(checkpoint).version
    assert local_checkpoint(url, into=worker) == str(local)  # complete: reused
    assert sorted(p.name for p in worker.iterdir()) == [local.name]  # no temporary left

    # A second share uploads nothing: an object changed behind its back stays as it is.
    _write(f"{url}/config.json", b"{}")
    assert share_checkpoint(str(checkpoint), settings.staging_url, options) == url
    assert _read(f"{url}/config.json") == b"{}"
    # ... and a worker refuses files that do not match the marker's sha256.
    with pytest.raises(ValueError, match="sha256"):
        local_checkpoint(url, into=tmp_path / "worker2")
    assert list((tmp_path / "worker2").iterdir()) == []

    # Without its marker the upload counts as unfinished: workers refuse it, the next
    # share uploads it again.
    FileSystems.delete([f"{url}/{MARKER}"])
    with pytest.raises(FileNotFoundError, match=MARKER):
        local_checkpoint(url, into=tmp_path / "worker3")
    assert share_checkpoint(str(checkpoint), settings.staging_url, options) == url
    assert _same_files(Path(local_checkpoint(url, into=tmp_path / "worker3")), checkpoint)


def test_local_staging_and_named_specs_pass_through(s3, checkpoint, tmp_path):
    settings, options = s3
    local_staging = str(tmp_path / "staging")
    assert share_checkpoint(str(checkpoint), local_staging, options) == str(checkpoint)
    assert not (tmp_path / "staging").exists()
    for spec in ("bundled", "init"):
        assert share_checkpoint(spec, settings.staging_url, options) == spec
        assert local_checkpoint(spec) == spec
    assert local_checkpoint(str(checkpoint)) == str(checkpoint)
