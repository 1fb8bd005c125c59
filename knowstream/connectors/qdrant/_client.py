"""One Qdrant collection holds every memory version; this module says how.

Why not a collection (or a copy) per version: publishing would cost O(memory)
and rollback a bulk copy. Instead every point carries

- ``version_from``: the version that wrote it, and
- ``closed_in``: the versions that replaced or deleted it (usually empty).

A version V sees a point iff ``version_from`` is in V's lineage (V, its parent,
its grandparent, ...) and no entry of ``closed_in`` is. Publishing a batch
writes the batch's points and appends V to the ``closed_in`` of the points it
replaces: O(batch). Rollback moves a pointer (the MLflow alias): O(1). Side
lines (backfills built on an older version) work because visibility follows the
lineage, not a numeric range.

Qdrant local mode allows one client per path and process, so clients are
shared per location.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from qdrant_client import QdrantClient
from qdrant_client import models as qm

from knowstream.settings import Settings

VECTOR = "text"  # named vector: chunk embeddings, and the mean of them on doc points
DIM = 384  # all-MiniLM-L6-v2

_clients: dict[str, QdrantClient] = {}
_lock = threading.Lock()


def open_client(settings: Settings) -> QdrantClient:
    """The process-wide client for the configured Qdrant (server or local path)."""
    where = settings.qdrant_url or str(settings.qdrant_location.resolve())
    with _lock:
        if where not in _clients:
            if settings.qdrant_url:
                _clients[where] = QdrantClient(url=settings.qdrant_url)
            else:
                settings.qdrant_location.mkdir(parents=True, exist_ok=True)
                _clients[where] = QdrantClient(path=where)
        client = _clients[where]
    ensure_collection(client, settings.collection, server=bool(settings.qdrant_url))
    return client


def close_clients() -> None:
    """Release local-mode locks (tests, and CLI commands that hand over to others)."""
    with _lock:
        for client in _clients.values():
            client.close()
        _clients.clear()


def ensure_collection(client: QdrantClient, name: str, *, server: bool) -> None:
    if client.collection_exists(name):
        return
    client.create_collection(
        name, vectors_config={VECTOR: qm.VectorParams(size=DIM, distance=qm.Distance.COSINE)}
    )
    if not server:
        return  # local mode scans instead of using payload indexes, fine at local sizes
    # Payload indexes make the version filter cheap on a server.
    for field, schema in (
        ("kind", qm.PayloadSchemaType.KEYWORD),
        ("doc_id", qm.PayloadSchemaType.KEYWORD),
        ("version_from", qm.PayloadSchemaType.INTEGER),
        ("closed_in", qm.PayloadSchemaType.INTEGER),
    ):
        client.create_payload_index(name, field, field_schema=schema)


def visible(lineage: Sequence[int], *, kind: str | None = None, doc_ids: Sequence[str] = ()):
    """Filter for the points that the version whose lineage is given can see."""
    must: list[qm.Condition] = [
        qm.FieldCondition(key="version_from", match=qm.MatchAny(any=list(lineage)))
    ]
    if kind:
        must.append(qm.FieldCondition(key="kind", match=qm.MatchValue(value=kind)))
    if doc_ids:
        must.append(qm.FieldCondition(key="doc_id", match=qm.MatchAny(any=list(doc_ids))))
    return qm.Filter(
        must=must,
        must_not=[qm.FieldCondition(key="closed_in", match=qm.MatchAny(any=list(lineage)))],
    )


def scroll_all(client: QdrantClient, collection: str, flt: qm.Filter, *, with_vectors=False):
    """Every point matching ``flt``, page by page."""
    offset = None
    while True:
        points, offset = client.scroll(
            collection,
            scroll_filter=flt,
            limit=512,
            offset=offset,
            with_payload=True,
            with_vectors=with_vectors,
        )
        yield from points
        if offset is None:
            return
