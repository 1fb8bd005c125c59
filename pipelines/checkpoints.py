"""Amortizer checkpoints that Beam's workers on other machines can read.

A registry amortizer is pinned by the driver to a folder of its own disk
(``resolve_amortizer``: ``<home>/cache/amortizer/<name>-v<version>``), which workers
of a job service, Flink or Dataflow cannot see. When staging is a URL
(``s3://bucket/prefix``), :func:`share_checkpoint` copies the folder's checkpoint
files once, through Beam's filesystems and the pipeline options the staging write
uses, to a content-addressed place beside the batches:

    <staging>/models/<folder name>-<first 16 hex of the files' sha256>/
        config.json  model.safetensors  CHECKPOINT.json (written last)

``CHECKPOINT.json`` (the file names and their sha256) is the marker: a folder without
it is an upload that did not finish, and is uploaded again; with it, nothing is
copied. The amortize stage gets the URL, and its ``load_model`` calls
:func:`local_checkpoint` in the worker: the files are copied once per machine into
a temporary folder (a temporary directory renamed into place, checked against the
marker's sha256) and loaded from there as before. Local staging needs none of this:
driver and workers share the disk, and the stage gets the folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from apache_beam.io.filesystem import CompressionTypes, FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

MARKER = "CHECKPOINT.json"
_NAMED = ("bundled", "init")  # specs every worker resolves by itself
_CHUNK = 1 << 20


def is_url(spec: str) -> bool:
    return "://" in spec


def _filesystem(url: str, options: PipelineOptions | None) -> FileSystem:
    """Beam's filesystem for ``url``, configured by ``options`` (None: the process's
    options, which a Beam worker gets from its job)."""
    if options is None:
        return FileSystems.get_filesystem(url)
    scheme = FileSystems.get_scheme(url)
    systems = [fs for fs in FileSystem.get_all_subclasses() if fs.scheme() == scheme]
    if len(systems) != 1:
        raise ValueError(f"no single Beam filesystem for {url!r} (found {len(systems)})")
    return systems[0](pipeline_options=options)


def checkpoint_digest(folder: Path, files: tuple[str, ...]) -> str:
    """sha256 over the checkpoint's files (names, sizes and bytes, in the given order)."""
    stats = tuple((f, (folder / f).stat().st_size, (folder / f).stat().st_mtime_ns) for f in files)
    return _digest(str(folder.resolve()), stats)


@functools.lru_cache(maxsize=16)
def _digest(folder: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    # keyed by the files' sizes and mtimes: a batch hashes a pinned folder only once
    h = hashlib.sha256()
    for name, size, _ in stats:
        h.update(f"{name}\0{size}\0".encode())
        with open(Path(folder) / name, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def share_checkpoint(spec: str, staging_url: str, options: PipelineOptions) -> str:
    """What the amortize stage should load for ``spec``: the spec itself, unless staging is
    a URL and ``spec`` a local checkpoint folder; then the folder's URL under
    ``<staging_url>/models/``, uploaded there (with ``options``) unless already complete."""
    local_staging = not is_url(staging_url) or staging_url.startswith("file://")
    if local_staging or is_url(spec) or spec in _NAMED or not Path(spec).is_dir():
        return spec
    # What a MAC checkpoint is, as the registry downloads it (imported here: workers,
    # which import this module too, need no MLflow).
    from knowstream.connectors.mlflow._registry import _CHECKPOINT_FILES

    folder = Path(spec)
    files = tuple(_CHECKPOINT_FILES)
    digest = checkpoint_digest(folder, files)
    url = f"{staging_url.rstrip('/')}/models/{folder.name}-{digest[:16]}"
    fs = _filesystem(url, options)
    marker = fs.join(url, MARKER)
    if fs.exists(marker):
        return url
    for name in files:
        with (
            open(folder / name, "rb") as src,
            fs.create(fs.join(url, name), compression_type=CompressionTypes.UNCOMPRESSED) as dst,
        ):
            shutil.copyfileobj(src, dst, _CHUNK)
    # Last: its presence says every file above is complete.
    text = json.dumps({"files": list(files), "sha256": digest}, indent=2) + "\n"
    with fs.create(marker, compression_type=CompressionTypes.UNCOMPRESSED) as dst:
        dst.write(text.encode())
    return url


def cache_root() -> Path:
    """Where workers keep the checkpoints they copied (one machine's temporary folder)."""
    return Path(tempfile.gettempdir()) / "knowstream-checkpoints"


def local_checkpoint(spec: str, into: Path | None = None) -> str:
    """A local folder for ``spec``: the spec itself unless it is a URL; a URL's files are
    copied (through Beam's filesystems, with this process's pipeline options) into
    ``into`` (default :func:`cache_root`) ``/<its last path part>``, once: a complete copy
    is reused. Raises ``FileNotFoundError`` for a URL without a complete checkpoint, and
    ``ValueError`` when the copied files do not match the marker's sha256."""
    if not is_url(spec):
        return spec
    url = spec.rstrip("/")
    root = into or cache_root()
    folder = root / url.rsplit("/", 1)[-1]
    if (folder / MARKER).is_file():
        return str(folder)
    fs = _filesystem(url, None)
    marker_url = fs.join(url, MARKER)
    if not fs.exists(marker_url):
        raise FileNotFoundError(f"{url}: no complete checkpoint there (no {MARKER})")
    with fs.open(marker_url, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        marker = json.loads(f.read())
    files = tuple(marker["files"])
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
    try:
        for name in files:
            with (
                fs.open(fs.join(url, name), compression_type=CompressionTypes.UNCOMPRESSED) as src,
                open(tmp / name, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst, _CHUNK)
        digest = checkpoint_digest(tmp, files)
        if digest != marker["sha256"]:
            raise ValueError(f"{url}: files have sha256 {digest}, the marker says {marker}")
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / MARKER).is_file():  # another process won the rename: complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)
