"""Write one memory version into the shared collection (see ``_client`` for the model).

Cost is O(batch): the batch's new points are upserted with ``version_from=V``,
and the points of the documents it replaces or deletes get V appended to
``closed_in``. Nothing else in the collection is read or written.
"""

from __future__ import annotations

import base64
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from knowstream.connectors.qdrant._client import Filter, Record, Store, visible
from knowstream.schemas.chunk import ID_NAMESPACE
from knowstream.schemas.staged import StagedBatch

UPSERT_BATCH = 256  # points per upsert request


def point_id(kind: str, doc_id: str, index: int, content_hash: str, version: int) -> str:
    """Deterministic: replaying a batch into the same version rewrites the same points.

    The version is part of the id because the same content can come back after a
    delete (a new point, visible from the new version on) while the old point
    must keep its own history for point-in-time reads.
    """
    key = f"{kind}\x00{doc_id}\x00{index}\x00{content_hash}\x00{version}"
    return str(uuid.uuid5(ID_NAMESPACE, key))


def _doc_vector(embeddings: list[list[float]]) -> list[float]:
    mean = np.asarray(embeddings, dtype=np.float32).mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).tolist()


def build_points(batch: StagedBatch, version: int) -> list[Record]:
    """The batch's new points: chunks, one doc point per upsert, one tombstone per delete."""
    chunks_by_doc: dict[str, list[dict]] = defaultdict(list)
    for c in batch.chunks:
        chunks_by_doc[c["doc_id"]].append(c)
    triples_by_doc: dict[str, list[dict]] = defaultdict(list)
    for t in batch.triples:
        triples_by_doc[t["doc_id"]].append(
            {
                "subject": t["subject"],
                "relation": t["relation"],
                "object": t["object"],
                "chunk_id": t["chunk_id"],
                "confidence": round(float(t["confidence"]), 4),
                "observed_at": t["observed_at"].isoformat() if t["observed_at"] else None,
            }
        )
    mods = {m["doc_id"]: m for m in batch.modulations}

    points: list[Record] = []
    for doc in batch.docs:
        doc_id, chash = doc["doc_id"], doc["content_hash"]
        common = {
            "doc_id": doc_id,
            "content_hash": chash,
            "published_at": doc["published_at"].isoformat() if doc["published_at"] else None,
            "version_from": version,
            "closed_in": [],
        }
        if doc["op"] == "delete":
            points.append(
                Record(
                    id=point_id("tombstone", doc_id, 0, "", version),
                    payload={"kind": "tombstone", **common},
                )
            )
            continue
        chunks = sorted(chunks_by_doc[doc_id], key=lambda c: c["index"])
        for c in chunks:
            points.append(
                Record(
                    id=point_id("chunk", doc_id, c["index"], chash, version),
                    vector=list(c["embedding"]),
                    payload={
                        "kind": "chunk",
                        **common,
                        "chunk_id": c["chunk_id"],
                        "index": c["index"],
                        "text": c["text"],
                        "char_start": c["char_start"],
                        "char_end": c["char_end"],
                        "title": doc["title"],
                    },
                )
            )
        mod = mods[doc_id]
        points.append(
            Record(
                id=point_id("doc", doc_id, 0, chash, version),
                vector=_doc_vector([c["embedding"] for c in chunks]) if chunks else None,
                payload={
                    "kind": "doc",
                    **common,
                    "title": doc["title"],
                    "url": doc["url"],
                    "source": doc["source"],
                    "metadata": doc["metadata"],
                    "model": doc["model"],
                    "n_chunks": len(chunks),
                    "triples": triples_by_doc[doc_id],
                    "modulation": {
                        "amortizer_version": mod["amortizer_version"],
                        "shape": list(mod["shape"]),
                        "dtype": mod["dtype"],
                        "data": base64.b64encode(mod["data"]).decode("ascii"),
                        "checksum": mod["checksum"],
                    },
                },
            )
        )
    return points


def write_version(
    store: Store,
    version: int,
    parent_lineage: Sequence[int],
    batch: StagedBatch,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Upsert the batch's points as version ``version`` and close what they replace.

    Returns what it closed: {"docs", "chunks", "triples"}, for the version's
    counts. Idempotent: running it twice for the same version and batch leaves
    the same state.
    """
    touched = sorted({d["doc_id"] for d in batch.docs})
    closed = {"docs": 0, "chunks": 0, "triples": 0}
    if parent_lineage and touched:
        groups: dict[tuple[int, ...], list] = defaultdict(list)
        for p in store.scroll(visible(parent_lineage, doc_ids=touched)):
            groups[tuple(p.payload.get("closed_in") or [])].append(p.id)
            kind = p.payload["kind"]
            if kind in ("doc", "chunk"):
                closed[kind + "s"] += 1
            closed["triples"] += len(p.payload.get("triples", ()))
        for closed_in, ids in groups.items():
            store.set_payload(ids, {"closed_in": sorted({*closed_in, version})})
    points = build_points(batch, version)
    for i in range(0, len(points), UPSERT_BATCH):
        part = points[i : i + UPSERT_BATCH]
        store.upsert(part)
        if progress:
            progress(len(part))
    return closed


def purge_version(store: Store, version: int) -> None:
    """Undo a version that was never published: drop its points, reopen what it closed."""
    store.delete(Filter(must={"version_from": [version]}))
    groups: dict[tuple[int, ...], list] = defaultdict(list)
    for p in store.scroll(Filter(must={"closed_in": [version]})):
        groups[tuple(v for v in p.payload["closed_in"] if v != version)].append(p.id)
    for closed_in, ids in groups.items():
        store.set_payload(ids, {"closed_in": list(closed_in)})


def fold_version(store: Store, lineage: Sequence[int], version: int) -> int:
    """Copy every point that ``lineage`` sees into ``version``, a new root: the same
    payloads and vectors, ``version_from=version``, nothing closed. Each page of
    copies is read back and compared before the next (payloads exactly, vectors
    to 1e-6: a store may renormalize a unit vector by an ulp). Returns the points
    written. The source is never changed (the copies fall outside its filter)."""
    written = 0
    for page in _pages(store.scroll(visible(lineage), with_vectors=True), UPSERT_BATCH):
        copies = []
        for p in page:
            kind, doc_id = p.payload["kind"], p.payload["doc_id"]
            index = p.payload["index"] if kind == "chunk" else 0
            chash = "" if kind == "tombstone" else p.payload["content_hash"]
            payload = {**p.payload, "version_from": version, "closed_in": []}
            copies.append(Record(point_id(kind, doc_id, index, chash, version), payload, p.vector))
        store.upsert(copies)
        store.index()  # in steps: the copies never pile up unindexed (see _edge)
        got = {r.id: r for r in store.retrieve([c.id for c in copies])}
        for c in copies:
            r = got.get(c.id)
            if r is None or r.payload != c.payload or not _same_vector(r.vector, c.vector):
                raise ValueError(f"fold: point {c.id} of version {version} reads back wrong")
        written += len(copies)
    return written


def _pages(points, size: int):
    page = []
    for p in points:
        page.append(p)
        if len(page) == size:
            yield page
            page = []
    if page:
        yield page


def _same_vector(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and float(np.max(np.abs(np.subtract(a, b)))) < 1e-6


def free_version(store: Store, version: int) -> None:
    """Delete the points a retired version wrote (no kept version sees them)."""
    store.delete(Filter(must={"version_from": [version]}))
