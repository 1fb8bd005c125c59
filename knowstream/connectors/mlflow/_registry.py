"""MLflow as the registry of memory versions.

A snapshot is a version of the registered model ``knowstream-memory``; MLflow
assigns version numbers (monotonic, never reused). Each version points at a run
that holds its artifacts: the batch delta as Parquet, and ``manifest.json``.
The alias ``live`` is the pointer that serving follows; rollback moves it.

A version goes through two states, kept in its ``state`` tag:

- ``pending``: reserved, data being written. Invisible: nothing serves it, and
  no published version has it in its lineage.
- ``published``: all data written and the manifest's checksums verified; from
  now on immutable. Only published versions can be made live.
- ``retired``: dropped by the retention policy (``Memory.retain``); its points
  are freed and it can no longer be read.

A version still ``pending`` whose writer died is ``abandoned`` by the next
writer, after its data is purged (see ``knowstream.memory.recover``).

The same registry holds the trained amortizers (``knowstream-amortizer``,
registered by ``flows/train.py``): ``resolve_amortizer`` pins an amortizer spec
(``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``registry``) to one
version and a local copy of its checkpoint, once per batch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from knowstream.connectors.mlflow._alias import LIVE, live_at, not_backwards, not_servable
from knowstream.errors import AmortizerNotFound, VersionNotFound
from knowstream.schemas.manifest import SnapshotManifest
from knowstream.settings import Settings

EXPERIMENT = "knowstream-memory"
# What MLflow answers for a missing alias or version (SQLite and server stores differ).
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


@dataclass(frozen=True)
class VersionInfo:
    version: int
    parent: int | None
    state: str  # pending | published | abandoned
    kind: str  # ingest | backfill
    created_at: str
    owner: str  # host:pid of the writer, for pending versions
    run_id: str
    tags: dict[str, str]


def _info(mv) -> VersionInfo:
    t = mv.tags or {}
    parent = t.get("parent", "")
    return VersionInfo(
        version=int(mv.version),
        parent=int(parent) if parent else None,
        state=t.get("state", "pending"),
        kind=t.get("kind", ""),
        created_at=t.get("created_at", ""),
        owner=t.get("owner", ""),
        run_id=mv.run_id or "",
        tags=dict(t),
    )


def describe(manifest: SnapshotManifest) -> str:
    """What a version changed, for its description in MLflow's model registry UI."""
    c = manifest.counts
    on = f"on version {manifest.parent}" if manifest.parent else "from empty memory"
    offsets = ", ".join(f"{o.topic}[{o.partition}] {o.start}-{o.end - 1}" for o in manifest.offsets)
    return (
        f"{manifest.kind} {on}: {c.get('batch_upserts', 0)} documents added or updated, "
        f"{c.get('batch_deletes', 0)} deleted, {c.get('batch_dead_letters', 0)} dead letters. "
        f"Now {c.get('docs', 0)} documents, {c.get('chunks', 0)} chunks, "
        f"{c.get('triples', 0)} triples. Records: {offsets or 'none'}. "
        f"Amortizer {manifest.model_versions.get('amortizer', '?')}."
    )


class Registry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.memory_model
        self._lineages: dict[int, list[int]] = {}
        if not settings.mlflow_uri:
            settings.home.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(settings.tracking_uri)
        self.client = MlflowClient(settings.tracking_uri)
        # The writes of a publish (version tags, description, the live alias) go to the
        # registry client under MlflowClient. Why: MlflowClient first checks, on every
        # such call, that the model is not a prompt, by loading the registered model with
        # *all* its versions: 9 loads per publish, O(versions) each (CPU of publish plus
        # set_live: 77 ms at 5 versions, 122 ms at 400, profiled). The calls below are
        # the same operations without that check (our model is never a prompt).
        self._versions = self.client._get_registry_client()
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            # A local artifact root only for the embedded store; a server decides its own.
            location = None if settings.mlflow_uri else settings.artifact_root.as_uri()
            self.experiment_id = self.client.create_experiment(EXPERIMENT, location)
        else:
            self.experiment_id = exp.experiment_id
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(self.name)
            except MlflowException:
                pass  # another writer created it meanwhile

    # --- writing ------------------------------------------------------------------
    def reserve(self, parent: int | None, kind: str) -> tuple[int, str]:
        """Take the next version number (pending) and a run for its artifacts."""
        run = self.client.create_run(self.experiment_id, tags={"knowstream.kind": kind})
        mv = self.client.create_model_version(
            self.name,
            source=f"{run.info.artifact_uri}/snapshot",
            run_id=run.info.run_id,
            tags={
                "state": "pending",
                "kind": kind,
                "parent": "" if parent is None else str(parent),
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "owner": f"{socket.gethostname()}:{os.getpid()}",
            },
        )
        return int(mv.version), run.info.run_id

    def log_artifacts(self, run_id: str, files: list[Path], manifest: SnapshotManifest) -> None:
        for f in files:
            self.client.log_artifact(run_id, str(f), "snapshot")
        self.client.log_text(run_id, manifest.to_json(), "snapshot/manifest.json")
        now = int(datetime.now(UTC).timestamp() * 1000)
        self.client.log_batch(
            run_id,
            params=[Param("version", str(manifest.version)), Param("parent", str(manifest.parent))],
            metrics=[Metric(k, float(v), now, 0) for k, v in manifest.counts.items()],
        )

    def publish(self, version: int, run_id: str, manifest: SnapshotManifest) -> None:
        """Mark a version published: from here on it is immutable and may go live."""
        tags = {
            "offsets": json.dumps([o.__dict__ for o in manifest.offsets]),
            "counts": json.dumps(manifest.counts, sort_keys=True),
            "model_versions": json.dumps(manifest.model_versions, sort_keys=True),
            "content_checksum": manifest.checksums.get("delta", ""),
            "source_digest": manifest.source_digest,
        }
        for k, v in tags.items():
            self._versions.set_model_version_tag(self.name, str(version), k, v)
        self._versions.update_model_version(self.name, str(version), describe(manifest))
        # The state tag goes last: a reader that sees "published" sees all the rest.
        self._versions.set_model_version_tag(self.name, str(version), "state", "published")
        self.client.set_terminated(run_id, "FINISHED")

    def abandon(self, version: int) -> None:
        self._versions.set_model_version_tag(self.name, str(version), "state", "abandoned")
        info = self.get(version)
        if info.run_id:
            self.client.set_terminated(info.run_id, "FAILED")

    def published(self, version: int) -> VersionInfo:
        """The version's record; it must exist and be published (the only ones that may
        go live)."""
        info = self.get(version)
        if info.state != "published":
            raise not_servable(version, info.state)
        return info

    def set_live(self, version: int) -> None:
        info = self.published(version)
        self._versions.set_registered_model_alias(self.name, LIVE, str(version))
        # When it went live, kept on the version: the report draws live's moves and rollbacks.
        stamp = live_at(info.tags.get("live_at", ""))
        self._versions.set_model_version_tag(self.name, str(version), "live_at", stamp)

    def rollback(self, version: int) -> None:
        """Point live back at an older published version; the newer ones stay readable."""
        live = self.live()
        if live is not None and version >= live:
            raise not_backwards(version, live)
        self.set_live(version)

    # --- reading ------------------------------------------------------------------
    def versions(self) -> list[VersionInfo]:
        mvs = self.client.search_model_versions(f"name='{self.name}'", max_results=100_000)
        return sorted((_info(mv) for mv in mvs), key=lambda v: v.version)

    def get(self, version: int) -> VersionInfo:
        try:
            return _info(self.client.get_model_version(self.name, str(version)))
        except MlflowException as e:
            if e.error_code in _NOT_FOUND:
                raise VersionNotFound(version) from None
            raise

    def live(self) -> int | None:
        """The live version; None only when no version was ever made live.

        An unreachable registry raises: taking it for "no live version" would let
        ingest publish a parentless version over everything.
        """
        try:
            return int(self.client.get_model_version_by_alias(self.name, LIVE).version)
        except MlflowException as e:
            if e.error_code in _NOT_FOUND:
                return None
            raise

    def lineage(self, version: int) -> list[int]:
        """The version and all its ancestors, newest first.

        A version's parent is set when it is reserved and never changes, so lineages
        are cached: a new version costs one lookup, whatever the history's length.
        """
        chain: list[int] = []
        current: int | None = version
        while current is not None and current not in self._lineages:
            chain.append(current)
            current = self.get(current).parent  # VersionNotFound for a missing one
        if current is not None:
            chain += self._lineages[current]
        self._lineages[version] = chain
        return list(chain)

    def live_since(self, cutoff: datetime) -> set[int]:
        """Versions that ``live`` pointed to at some time after ``cutoff`` (and live now)."""
        moves = sorted(
            (datetime.fromisoformat(stamp), v.version)
            for v in self.versions()
            for stamp in v.tags.get("live_at", "").split(",")
            if stamp
        )
        kept = {v for (_, v), (until, _) in zip(moves, moves[1:], strict=False) if until > cutoff}
        live = self.live()
        return kept | ({live} if live is not None else set())

    def retire(self, version: int) -> None:
        """Mark a version retired: its points are gone, it can no longer be read."""
        self._versions.set_model_version_tag(self.name, str(version), "state", "retired")

    def download_snapshot_files(self, version: int, prefix: str, dest: Path) -> list[Path]:
        """The version's snapshot artifacts whose names start with ``prefix``, downloaded
        under ``dest``."""
        run_id = self.get(version).run_id
        return [
            Path(self.client.download_artifacts(run_id, f.path, str(dest)))
            for f in self.client.list_artifacts(run_id, "snapshot")
            if not f.is_dir and f.path.rpartition("/")[2].startswith(prefix)
        ]

    def manifest(self, version: int) -> SnapshotManifest:
        info = self.get(version)
        text = mlflow.artifacts.load_text(f"runs:/{info.run_id}/snapshot/manifest.json")
        return SnapshotManifest.from_json(text)


# --- the amortizer's registry: specs "models:/NAME@ALIAS", "models:/NAME/VERSION", "registry"
REGISTRY_SPEC = "registry"  # short for models:/<Settings.amortizer_model>@live
_MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))")
_CHECKPOINT_FILES = ("config.json", "model.safetensors")


class AmortizerRegistryError(RuntimeError):
    """The amortizer's registry could not be read: the batch builds nothing (retried)."""


@dataclass(frozen=True)
class ResolvedAmortizer:
    """An amortizer spec pinned for one batch: ``path`` is what the Beam stage loads
    (a local checkpoint folder, "bundled" or "init"; with staging on a URL, the batch's
    ``run_batch`` shares a folder there first, ``pipelines/checkpoints.py``); ``name``
    and ``version`` say which registry version it is, when the spec came from the
    registry."""

    spec: str
    path: str
    name: str | None = None
    version: int | None = None


def is_registry_spec(spec: str) -> bool:
    return spec == REGISTRY_SPEC or spec.startswith("models:/")


def parse_registry_spec(spec: str, default_model: str) -> tuple[str, str | None, int | None]:
    """(name, alias, version) of a registry spec; exactly one of alias and version is set."""
    if spec == REGISTRY_SPEC:
        return default_model, LIVE, None
    m = _MODELS_URI.fullmatch(spec)
    if m is None:
        raise ValueError(
            f"amortizer spec {spec!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    version = m["version"]
    return m["name"], m["alias"], int(version) if version else None


def amortizer_cache_dir(settings: Settings, name: str, version: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return settings.home / "cache" / "amortizer" / f"{safe}-v{version}"


def resolve_amortizer(settings: Settings, spec: str | None = None) -> ResolvedAmortizer:
    """Pin ``spec`` (default ``settings.amortizer``) to a local checkpoint folder.

    A registry spec is resolved to a concrete version once (an alias may move
    later: the caller keeps this answer for the whole batch), and that version's
    checkpoint is downloaded once into ``<home>/cache/amortizer/<name>-v<version>``
    (a temporary folder renamed into place, so the folder is complete or absent).
    A pinned version already in the cache needs no registry. Other specs pass
    through. Raises ``AmortizerRegistryError`` when the registry cannot be read,
    ``AmortizerNotFound`` (a ``LookupError``) when the model, alias or version does not exist.
    """
    spec = settings.amortizer if spec is None else spec
    if not is_registry_spec(spec):
        return ResolvedAmortizer(spec, spec)
    name, alias, version = parse_registry_spec(spec, settings.amortizer_model)
    if version is not None and _complete(folder := amortizer_cache_dir(settings, name, version)):
        return ResolvedAmortizer(spec, str(folder), name, version)
    if not settings.mlflow_uri:
        settings.home.mkdir(parents=True, exist_ok=True)
    where = f"{spec} at {settings.tracking_uri}"
    try:
        client = MlflowClient(settings.tracking_uri)
        if alias is not None:
            version = int(client.get_model_version_by_alias(name, alias).version)
        else:
            client.get_model_version(name, str(version))  # exists?
        assert version is not None  # parse_registry_spec sets an alias or a version
        folder = amortizer_cache_dir(settings, name, version)
        if not _complete(folder):
            _download(settings, client.get_model_version_download_uri(name, str(version)), folder)
    except MlflowException as e:
        if e.error_code in _NOT_FOUND:
            raise AmortizerNotFound(
                f"amortizer {where}: {e.message}: register a checkpoint there "
                "(`python -m knowstream.flows.train`) or set KNOWSTREAM_AMORTIZER=bundled"
            ) from e
        raise AmortizerRegistryError(f"amortizer registry unreadable ({where}): {e}") from e
    except OSError as e:
        raise AmortizerRegistryError(f"amortizer registry unreadable ({where}): {e!r}") from e
    return ResolvedAmortizer(spec, str(folder), name, version)


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _CHECKPOINT_FILES)


def _download(settings: Settings, uri: str, folder: Path) -> None:
    """The checkpoint artifacts at ``uri`` into ``folder``, atomically (temp dir + rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(tmp), tracking_uri=settings.tracking_uri
            )
        )
        if not _complete(local):
            raise LookupError(f"{uri}: not a MAC checkpoint (needs {_CHECKPOINT_FILES})")
        try:
            local.rename(folder)
        except OSError:
            if not _complete(folder):  # another process won the rename: theirs is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
