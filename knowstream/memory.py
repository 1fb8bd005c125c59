"""The versioned memory: publish a batch as a new snapshot, read any version, move `live`.

Qdrant holds the data of every version (see ``connectors/qdrant/_client.py``
for the visibility model); MLflow holds the version records, their artifacts
and lineage, and the ``live`` alias (see ``connectors/mlflow/_registry.py``).

Publishing is atomic for readers: a version is written while ``pending``,
verified, then marked ``published``, and only then may ``live`` point at it. A
publish that fails part-way purges what it wrote and marks the version
``abandoned``; one whose process died is cleaned up by the next writer's
:meth:`Memory.recover`. Old versions are never modified: a new version only
appends its own number to ``closed_in`` of the points it replaces, which no
existing version's lineage contains.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from functools import cached_property

from knowstream.connectors.mlflow import Registry, VersionInfo
from knowstream.connectors.qdrant import (
    Store,
    VersionView,
    fold_version,
    free_version,
    open_store,
    purge_version,
    visible,
    write_version,
)
from knowstream.errors import VersionNotServable
from knowstream.schemas.manifest import OffsetRange, SnapshotManifest
from knowstream.schemas.staged import StagedBatch
from knowstream.settings import Settings


class PublishError(RuntimeError):
    """The batch could not be published; nothing of it is visible."""


class StaleParent(RuntimeError):
    """``live`` moved while the batch was being processed; rerun it on the new live."""


def delta_checksum(batch: StagedBatch) -> str:
    """sha256 over the batch's rows in a canonical order (independent of file encoding)."""
    h = hashlib.sha256()
    for name in ("docs", "chunks", "triples", "modulations"):
        rows = []
        for row in getattr(batch, name):
            row = dict(row)
            if "data" in row:  # modulation bytes: their checksum stands for them
                row.pop("data")
            if "embedding" in row:
                row["embedding"] = [round(x, 5) for x in row["embedding"]]
            rows.append(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False))
        for r in sorted(rows):
            h.update(name.encode() + b"\x00" + r.encode("utf-8"))
    return h.hexdigest()


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Memory:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry(settings)

    @cached_property
    def store(self) -> Store:
        """Opened on first use: reading the registry (history, live) never takes
        the embedded store's lock."""
        return open_store(self.settings)

    def open_store(self) -> None:
        """Take the store now, so that a held store fails before any other work."""
        _ = self.store

    # --- reading ------------------------------------------------------------------
    def resolve(self, version: int | None = None) -> int:
        """The given version if published, else the live one."""
        if version is None:
            live = self.registry.live()
            if live is None:
                raise VersionNotServable(
                    "no live memory version yet: ingest something first (`knowstream ingest`)"
                )
            return live
        info = self.registry.get(version)
        if info.state != "published":
            raise VersionNotServable(
                f"memory version {version} is {info.state}, not published: "
                "`knowstream snapshots` lists the published ones"
            )
        return version

    def view(self, version: int | None = None) -> VersionView:
        v = self.resolve(version)
        return VersionView(self.store, self.registry.lineage(v))

    def known(self, version: int | None, doc_ids: list[str]) -> dict[str, dict]:
        """What ``version`` holds for these docs (doc or tombstone), for dedup."""
        if version is None or not doc_ids:
            return {}
        flt = visible(self.registry.lineage(version), doc_ids=doc_ids)
        out = {}
        for p in self.store.scroll(flt):
            if p.payload["kind"] in ("doc", "tombstone"):
                out[p.payload["doc_id"]] = {
                    "kind": p.payload["kind"],
                    "content_hash": p.payload["content_hash"],
                    "published_at": p.payload["published_at"],
                    "model": p.payload.get("model", ""),
                }
        return out

    def history(self) -> list[dict]:
        """One row per version, oldest first, for the `snapshots` table."""
        live = self.registry.live()
        rows = []
        for v in self.registry.versions():
            counts = json.loads(v.tags.get("counts", "{}"))
            offsets = json.loads(v.tags.get("offsets", "[]"))
            rows.append(
                {
                    "version": v.version,
                    "parent": v.parent,
                    "kind": v.kind,
                    "state": v.state,
                    "created": v.created_at.replace("T", " ")[:16],
                    "docs": counts.get("docs"),
                    "chunks": counts.get("chunks"),
                    "triples": counts.get("triples"),
                    "offsets": ", ".join(
                        f"{o['topic']}[{o['partition']}] {o['start']}-{o['end'] - 1}"
                        for o in offsets
                    ),
                    "live": v.version == live,
                }
            )
        return rows

    # --- writing ------------------------------------------------------------------
    def recover(self, *, stale_after_s: float = 3600.0) -> list[int]:
        """Purge versions left ``pending`` by writers that died; returns them.

        A pending version is dead when its owner process on this host is gone,
        or, for owners elsewhere, when it has been pending longer than
        ``stale_after_s``.
        """
        # Under the publish lock: a worker thread of this process that is
        # publishing right now also looks "dead" by pid, and must not be purged.
        with self._publish_lock():
            return self._recover(stale_after_s)

    def _recover(self, stale_after_s: float) -> list[int]:
        purged = []
        host = socket.gethostname()
        now = datetime.now(UTC)
        for v in self.registry.versions():
            if v.state != "pending":
                continue
            owner_host, _, pid = v.owner.rpartition(":")
            if owner_host == host and pid.isdigit():
                dead = not _pid_alive(int(pid)) or int(pid) == os.getpid()
            else:
                age = (now - datetime.fromisoformat(v.created_at)).total_seconds()
                dead = age > stale_after_s
            if dead:
                purge_version(self.store, v.version)
                self.registry.abandon(v.version)
                purged.append(v.version)
        return purged

    def publish(
        self,
        batch: StagedBatch,
        *,
        parent: int | None,
        kind: str,
        offsets: list[OffsetRange],
        model_versions: dict[str, str],
        make_live: bool,
        require_live_parent: bool = False,
        progress: Callable[[int], None] | None = None,
        source_digest: str = "",
    ) -> VersionInfo:
        """Write ``batch`` as a new version on top of ``parent``; returns it, published.

        With ``require_live_parent`` (ingest), ``parent`` must still be live when
        the publish starts (compare-and-set): two workers that processed batches against the same
        live version cannot both publish on it, or the second would silently drop
        the first one's changes. The loser gets :class:`StaleParent` and reruns its
        batch against the new live. Publishes of one home are serialized by a
        file lock; across hosts, run one publishing worker per memory.
        ``source_digest`` identifies the source records (see ``flows.batch``).
        """
        with self._publish_lock():
            if require_live_parent and self.registry.live() != parent:
                raise StaleParent(f"live is {self.registry.live()}, batch was built on {parent}")
            return self._publish(
                batch, parent, kind, offsets, model_versions, make_live, progress, source_digest
            )

    @contextmanager
    def _publish_lock(self) -> Iterator[None]:
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.settings.run_dir / "publish.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextmanager
    def _abandoned_on_failure(self, version: int, what: str) -> Iterator[None]:
        """If the block fails, purge ``version``'s points and mark it abandoned, then
        raise a ``PublishError`` saying ``what`` failed (one already is, as it is). The
        cleanup is best effort: if it fails too, ``recover()`` finishes it."""
        try:
            yield
        except BaseException as e:
            with suppress(Exception):
                purge_version(self.store, version)
                self.registry.abandon(version)
            if isinstance(e, Exception) and not isinstance(e, PublishError):
                raise PublishError(f"{what} failed: {e}") from e
            raise

    def _publish(
        self, batch, parent, kind, offsets, model_versions, make_live, progress, source_digest
    ):
        version, run_id = self.registry.reserve(parent, kind)
        with self._abandoned_on_failure(version, f"publishing version {version}"):
            parent_lineage = self.registry.lineage(parent) if parent is not None else []
            closed = write_version(self.store, version, parent_lineage, batch, progress)
            parent_counts = (
                json.loads(self.registry.get(parent).tags.get("counts", "{}")) if parent else {}
            )
            upserted = {d["doc_id"] for d in batch.docs if d["op"] == "upsert"}
            counts = {
                "docs": parent_counts.get("docs", 0) - closed["docs"] + len(upserted),
                "chunks": parent_counts.get("chunks", 0) - closed["chunks"] + len(batch.chunks),
                "triples": parent_counts.get("triples", 0) - closed["triples"] + len(batch.triples),
                "batch_upserts": batch.upserts,
                "batch_deletes": batch.deletes,
                "batch_dead_letters": len(batch.dead_letters),
            }
            self._verify(version, parent_lineage, batch)
            manifest = SnapshotManifest(
                version=version,
                parent=parent,
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                kind=kind,
                offsets=offsets,
                counts=counts,
                model_versions=model_versions,
                checksums={
                    "delta": delta_checksum(batch),
                    **{f.name: _file_sha256(f) for f in batch.files},
                },
                source_digest=source_digest,
            )
            self.registry.log_artifacts(run_id, batch.files, manifest)
            self.registry.publish(version, run_id, manifest)
        if make_live:
            self.registry.set_live(version)
        return self.registry.get(version)

    def _verify(self, version: int, parent_lineage: list[int], batch: StagedBatch) -> None:
        """Read the new version back before it may be published."""
        view = VersionView(self.store, [version, *parent_lineage])
        doc_ids = sorted({d["doc_id"] for d in batch.docs})
        held = view.docs(doc_ids)
        for d in batch.docs:
            got = held.get(d["doc_id"])
            if d["op"] == "upsert" and (got is None or got["content_hash"] != d["content_hash"]):
                raise PublishError(f"verify: {d['doc_id']} not readable at version {version}")
            if d["op"] == "delete" and got is not None:
                raise PublishError(f"verify: deleted {d['doc_id']} still visible at {version}")
        # Modulation.from_row checks every stored entry against its checksum.
        view.modulations_of(held)

    # --- costs that follow the batch ------------------------------------------------
    def compact(self, version: int | None = None) -> VersionInfo:
        """Fold ``version`` (default: live) into a new root version with the same
        content (the same digest, up to a store's renormalization of vectors by an
        ulp); live moves to it if it pointed at ``version``.

        Why: a version's filter lists its whole lineage, so reads and publishes
        slow down as a line grows. Versions built on the root list only it and
        theirs. Costs O(memory), once; the old line stays readable until retired.
        """
        with self._publish_lock():
            source = self.resolve(version)
            info = self.registry.get(source)
            root, run_id = self.registry.reserve(None, "compact")
            with self._abandoned_on_failure(root, f"compacting version {source}"):
                written = fold_version(self.store, self.registry.lineage(source), root)
                if written != self.store.count(visible(self.registry.lineage(source))):
                    raise PublishError(f"compact: version {root} lacks points of {source}")
                manifest = SnapshotManifest(
                    version=root,
                    parent=None,
                    created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                    kind="compact",
                    offsets=[OffsetRange(**o) for o in json.loads(info.tags.get("offsets", "[]"))],
                    counts=json.loads(info.tags.get("counts", "{}")),
                    model_versions=json.loads(info.tags.get("model_versions", "{}")),
                    checksums={"content": VersionView(self.store, [root]).digest()},
                )
                self.registry.log_artifacts(run_id, [], manifest)
                self.registry.publish(root, run_id, manifest)
            if self.registry.live() == source:
                self.registry.set_live(root)
            return self.registry.get(root)

    def retain(self, keep_last: int, live_days: float) -> list[int]:
        """Retire the published versions that neither the last ``keep_last`` nor any
        version ``live`` pointed to in the last ``live_days`` days needs (as itself
        or as an ancestor), and free their points. Returns the retired versions."""
        if keep_last < 1:
            raise ValueError("keep at least the last version")
        with self._publish_lock():
            versions = self.registry.versions()
            published = [v.version for v in versions if v.state == "published"]
            cutoff = datetime.now(UTC) - timedelta(days=live_days)
            keep = {*published[-keep_last:], *self.registry.live_since(cutoff)}
            keep |= {v.version for v in versions if v.state == "pending"}  # their parents
            needed = {a for v in keep for a in self.registry.lineage(v)}
            retired = [v for v in published if v not in needed]
            for v in retired:
                free_version(self.store, v)
                self.registry.retire(v)
            return retired

    def maintain(self) -> dict[str, object]:
        """What ingest runs after a publish (after its offsets are committed): compaction
        and retention, as configured, then one step of the store's vector index (the
        embedded store indexes what passed its threshold, see ``connectors/qdrant/_edge``;
        a server indexes on its own)."""
        done: dict[str, object] = {}
        s, live = self.settings, self.registry.live()
        if s.compact_after and live is not None:
            if len(self.registry.lineage(live)) > s.compact_after:
                done["compacted"] = self.compact(live).version
        if s.retain_last:
            done["retired"] = self.retain(s.retain_last, s.retain_live_days)
        if self.store.index():
            done["indexed"] = True
        return done

    def set_live(self, version: int) -> None:
        self.registry.set_live(version)

    def rollback(self, version: int) -> None:
        self.registry.rollback(version)

    def finish_live(self, version: int, parent: int | None) -> bool:
        """Whether published ``version`` is on the live line, after making it live if
        ``parent`` still is (its publish failed just before moving ``live``)."""
        with self._publish_lock():
            live = self.registry.live()
            if live is not None and version in self.registry.lineage(live):
                return True
            if live == parent:
                self.registry.set_live(version)
                return True
            return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
