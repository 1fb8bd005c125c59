"""Staging: where a batch's Parquet delta waits between the pipeline and the publish.

``Settings.staging_url`` is a local folder or ``s3://bucket/prefix``. Beam's workers
write it through Beam's filesystems (``apache-beam[aws]`` for ``s3://``, configured by
the pipeline options of :func:`beam_options`), so the driver and the workers share no
disk. The publishing driver reads a batch back through pyarrow's filesystems into a
local copy under ``<home>/cache/staging``: MLflow logs those files as the version's
artifacts. Each batch has its own folder (:func:`batch_url`), removed with
:func:`remove` once published; a failed batch leaves it for inspection.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from knowstream.settings import Settings


def is_remote(url: str) -> bool:
    return "://" in url


def batch_url(settings: Settings) -> str:
    """A fresh folder for one batch under the staging URL (named by a uuid, never by data)."""
    return f"{settings.staging_url.rstrip('/')}/{uuid.uuid4().hex}"


def beam_options(settings: Settings) -> list[str]:
    """Pipeline options Beam's S3 filesystem needs on every worker (none for a folder)."""
    if not settings.staging_url.startswith("s3://"):
        return []
    options = [f"--s3_region_name={settings.s3_region}"]
    if settings.s3_endpoint_url:
        options.append(f"--s3_endpoint_url={settings.s3_endpoint_url}")
    return options


def _filesystem(settings: Settings, url: str) -> tuple[pafs.FileSystem, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3":
        return pafs.FileSystem.from_uri(url)
    kwargs: dict[str, str] = {"region": settings.s3_region}
    if settings.s3_endpoint_url:
        endpoint = urlparse(settings.s3_endpoint_url)
        kwargs.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme or "https")
    return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}"


def local_copy(settings: Settings, url: str) -> Path:
    """The batch folder at ``url`` as a local folder: itself, or a copy of the objects."""
    if not is_remote(url):
        return Path(url)
    fs, path = _filesystem(settings, url)
    into = _cache(settings, url)
    into.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(into.resolve()), fs, pafs.LocalFileSystem())
    return into


def remove(settings: Settings, url: str) -> None:
    """Delete a batch's staged files, and their local copy."""
    if not is_remote(url):
        shutil.rmtree(url, ignore_errors=True)
        return
    fs, path = _filesystem(settings, url)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    shutil.rmtree(_cache(settings, url), ignore_errors=True)


def _cache(settings: Settings, url: str) -> Path:
    return settings.home / "cache" / "staging" / url.rstrip("/").rsplit("/", 1)[-1]
