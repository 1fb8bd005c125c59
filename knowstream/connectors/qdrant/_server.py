"""The server backend: qdrant-client against a Qdrant server (``--qdrant-url``).

Its local mode (``path=``) runs the same code without a server; the test suite
uses it to stand in for one. Local mode ignores payload indexes (it scans) and
is not thread-safe, so calls are serialized there; a server gets the indexes
and concurrent calls.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from qdrant_client import QdrantClient
from qdrant_client import models as qm

from knowstream.connectors.qdrant._client import (
    DIM,
    INDEXED,
    VECTOR,
    Filter,
    Record,
    StoreHeld,
    claim,
)

PAGE = 512  # points per scroll page
_SCHEMA = {"keyword": qm.PayloadSchemaType.KEYWORD, "int": qm.PayloadSchemaType.INTEGER}


def _filter(flt: Filter | None) -> qm.Filter | None:
    if flt is None:
        return None

    def conditions(fields: dict[str, list]) -> list:
        return [qm.FieldCondition(key=k, match=qm.MatchAny(any=list(v))) for k, v in fields.items()]

    return qm.Filter(must=conditions(flt.must), must_not=conditions(flt.must_not))


def _record(p, score: float = 0.0) -> Record:
    vector = p.vector.get(VECTOR) if isinstance(p.vector, dict) else None
    return Record(str(p.id), p.payload or {}, vector, score)


class ClientStore:
    def __init__(self, collection: str, *, url: str | None = None, path: Path | None = None):
        self.collection = collection
        self._lock: contextlib.AbstractContextManager
        if url:
            self.where, self._lock = url, contextlib.nullcontext()
            self.client = QdrantClient(url=url)
        else:
            assert path is not None, "a server url or a local path"
            path.mkdir(parents=True, exist_ok=True)
            self.where, self._lock = str(path), threading.Lock()
            try:
                self.client = QdrantClient(path=str(path))
            except RuntimeError as e:
                if "already accessed" not in str(e):
                    raise
                raise StoreHeld(path) from None
            claim(path)
        if not self.client.collection_exists(collection):
            self.client.create_collection(
                collection,
                vectors_config={VECTOR: qm.VectorParams(size=DIM, distance=qm.Distance.COSINE)},
            )
            if url:  # local mode would only warn that it ignores them
                for name, kind in INDEXED.items():
                    self.client.create_payload_index(collection, name, field_schema=_SCHEMA[kind])

    def upsert(self, points: list[Record]) -> None:
        batch = [
            qm.PointStruct(
                id=p.id,
                vector={VECTOR: list(p.vector)} if p.vector is not None else {},
                payload=p.payload,
            )
            for p in points
        ]
        with self._lock:
            self.client.upsert(self.collection, points=batch, wait=True)

    def set_payload(self, ids: list[str], payload: dict) -> None:
        with self._lock:
            self.client.set_payload(self.collection, payload=payload, points=list(ids), wait=True)

    def delete(self, flt: Filter) -> None:
        given = _filter(flt)
        assert given is not None  # flt is not None
        selector = qm.FilterSelector(filter=given)
        with self._lock:
            self.client.delete(self.collection, points_selector=selector, wait=True)

    def scroll(self, flt: Filter | None, *, with_vectors: bool = False) -> Iterator[Record]:
        offset = None
        while True:
            points, offset = self._page(flt, offset, with_vectors)
            yield from points
            if offset is None:
                return

    def _page(self, flt: Filter | None, offset, with_vectors: bool) -> tuple[list[Record], object]:
        with self._lock:
            points, offset = self.client.scroll(
                self.collection,
                scroll_filter=_filter(flt),
                limit=PAGE,
                offset=offset,
                with_payload=True,
                with_vectors=with_vectors,
            )
        return [_record(p) for p in points], offset

    def retrieve(self, ids: list[str]) -> list[Record]:
        with self._lock:
            points = self.client.retrieve(
                self.collection, list(ids), with_payload=True, with_vectors=True
            )
        return [_record(p) for p in points]

    def search(self, vector: Sequence[float], flt: Filter, k: int) -> list[Record]:
        with self._lock:
            res = self.client.query_points(
                self.collection,
                query=list(vector),
                using=VECTOR,
                query_filter=_filter(flt),
                limit=k,
                with_payload=True,
            )
        return [_record(p, p.score) for p in res.points]

    def count(self, flt: Filter | None = None) -> int:
        with self._lock:
            return self.client.count(self.collection, count_filter=_filter(flt), exact=True).count

    def index(self) -> bool:
        """Nothing to do: a server runs its optimizers on its own; local mode has no index."""
        return False

    def close(self) -> None:
        self.client.close()
