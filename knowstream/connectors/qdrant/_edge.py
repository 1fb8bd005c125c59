"""The embedded backend: a qdrant-edge shard per collection under ``<home>/qdrant``.

Why qdrant-edge and not qdrant-client's local mode: local mode ignores payload
indexes, so every version filter scans the whole collection (a 50k-point
filtered search took ~950 ms there, 0.8 ms here). A second process is kept out
by a lock file taken before the shard is opened (:class:`StoreHeld`); the
shard's write-ahead log stays on and locks it as well.

One lock serializes the calls of a process's threads (the API and the ingest
worker of ``serve --ingest``): each call is short, a publish is many calls.

A write flushes the shard when the last flush is over ``FLUSH_S`` seconds old (a
Qdrant server flushes every 5 s): the write-ahead log drops its closed parts only
after a flush, so without it the log grows with every write (2.9 GB partway
through growing a memory to 100k documents here).

Vector index: qdrant-edge has no background optimizer; it builds HNSW only inside
``optimize()``, which blocks the calling thread *and holds the GIL* for the whole
build (measured: no other thread of the process ran meanwhile), so it cannot run
behind the API in a thread. Without it a search whose filter matches most points
(any search at ``live``) scores every point: 342 ms at 100k documents. So the
index is built in bounded steps (:meth:`EdgeStore.index`, run by
``Memory.maintain`` after each publish and by compaction between its pages):

- the optimizer indexes a segment only once its vectors pass ``index_kb``
  (``indexing_threshold``), so a step indexes at most that much new data (10 MB,
  ~6.7k vectors; 2-10 s on this 2-core machine, BENCHMARKS.md 6.1) and most steps do nothing;
  points written since stay in the small appendable segment, scanned exactly;
- up to ``SEGMENTS`` indexed segments are kept before the merge optimizer joins
  the smallest ones (~200k documents at the default threshold; a merge step
  rebuilds the merged segments, so it is longer: not measured yet). Each segment
  adds a fixed cost to every read (33 segments at 100k documents: search at live
  15 ms against 1 ms at 1k);
- HNSW is used for a filtered search where the filter keeps more than a quarter of
  ``index_kb`` of a segment's vectors (``full_scan_threshold``; at ``index_kb`` itself
  a search for chunks, two thirds of a segment, stayed an exact scan everywhere);
  a selective filter (an old version, a few documents) is a payload-index lookup
  plus exact scoring, as before. No payload subgraphs (``payload_m=0``); instead
  ACORN for filters that keep few of a segment's points (below).

Reads stay exact in what they may return: the filter (lineage, ``closed_in``) is
applied inside the graph search, and a point replaced or closed after indexing is
deleted from its indexed segment and rewritten in the appendable one.
"""

from __future__ import annotations

import fcntl
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import qdrant_edge as qe

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
FLUSH_S = 5.0  # the most seconds between a write and the next flush
INDEX_KB = 10_000  # default indexing threshold (Settings.qdrant_index_kb)
SEGMENTS = 64  # indexed segments kept before the merge optimizer joins the smallest
# ACORN: where a filter keeps few of an indexed segment's points, the graph search also
# walks neighbours of neighbours, so points the filter keeps are not cut off by those it
# drops (without it a rolled-back version missed its own exact match in a test).
_SEARCH = qe.SearchParams(acorn=qe.AcornSearchParams(enable=True))
_SCHEMA = {"keyword": qe.PayloadSchemaType.Keyword, "int": qe.PayloadSchemaType.Integer}


def _filter(flt: Filter | None) -> qe.Filter | None:
    if flt is None:
        return None

    def conditions(fields: dict[str, list]) -> list:
        return [qe.FieldCondition(k, match=qe.MatchAny(list(v))) for k, v in fields.items()]

    return qe.Filter(must=conditions(flt.must), must_not=conditions(flt.must_not))


def _record(p, score: float = 0.0) -> Record:
    vector = p.vector.get(VECTOR) if isinstance(p.vector, dict) else None
    return Record(str(p.id), p.payload or {}, vector, score)


def _config(index_kb: int) -> qe.EdgeConfig:
    return qe.EdgeConfig(
        vectors={VECTOR: qe.EdgeVectorParams(DIM, qe.Distance.Cosine)},
        hnsw_config=qe.HnswIndexConfig(
            m=16, ef_construct=100, full_scan_threshold=max(1, index_kb // 4), payload_m=0
        ),
        optimizers=qe.EdgeOptimizersConfig(
            indexing_threshold=index_kb, default_segment_number=SEGMENTS
        ),
        wal_enabled=True,
    )


class EdgeStore:
    def __init__(self, location: Path, collection: str, index_kb: int = INDEX_KB) -> None:
        location.mkdir(parents=True, exist_ok=True)
        self.where = str(location)
        path = location / collection
        config = _config(index_kb)
        # Our own lock first: a second process whose EdgeShard.load fails on the WAL lock
        # has already opened the segments, and the holder's next flush then fails
        # ("tracker_journal.dat is shorter than expected", reproduced with 0.9.0).
        self._held = open(location / f"{collection}.lock", "a")  # held open: the lock lasts as long
        try:
            fcntl.flock(self._held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._held.close()
            raise StoreHeld(location) from None
        try:
            if (path / "edge_config.json").exists():
                self._shard = qe.EdgeShard.load(str(path), config)  # the config is updated
            else:
                self._shard = qe.EdgeShard.create(str(path), config)
        except Exception as e:  # the binding raises a bare Exception
            self._held.close()
            if "WouldBlock" in str(e):
                raise StoreHeld(location) from None
            raise
        claim(location)
        self._lock = threading.Lock()
        self._flushed = time.monotonic()
        self._dirty = True  # written since the last index step (unknown at open: check once)
        have = self._shard.info().payload_schema
        for name, kind in INDEXED.items():
            if name not in have:
                self._shard.update(qe.UpdateOperation.create_field_index(name, _SCHEMA[kind]))

    def upsert(self, points: list[Record]) -> None:
        batch = [
            qe.Point(p.id, {VECTOR: list(p.vector)} if p.vector is not None else {}, p.payload)
            for p in points
        ]
        self._update(qe.UpdateOperation.upsert_points(batch))

    def set_payload(self, ids: list[str], payload: dict) -> None:
        self._update(qe.UpdateOperation.set_payload(list(ids), payload))

    def delete(self, flt: Filter) -> None:
        given = _filter(flt)
        assert given is not None  # flt is not None
        self._update(qe.UpdateOperation.delete_points_by_filter(given))

    def _update(self, operation) -> None:
        with self._lock:
            self._shard.update(operation)
            self._dirty = True
            if time.monotonic() - self._flushed > FLUSH_S:
                self._shard.flush()
                self._flushed = time.monotonic()

    def scroll(self, flt: Filter | None, *, with_vectors: bool = False) -> Iterator[Record]:
        offset = None
        while True:
            points, offset = self._page(flt, offset, with_vectors)
            yield from points
            if offset is None:
                return

    def _page(self, flt: Filter | None, offset, with_vectors: bool) -> tuple[list[Record], object]:
        request = qe.ScrollRequest(
            offset=offset,
            limit=PAGE,
            filter=_filter(flt),
            with_payload=True,
            with_vector=with_vectors,
        )
        with self._lock:
            points, offset = self._shard.scroll(request)
        return [_record(p) for p in points], offset

    def retrieve(self, ids: list[str]) -> list[Record]:
        with self._lock:
            points = self._shard.retrieve(list(ids), with_payload=True, with_vector=True)
        return [_record(p) for p in points]

    def search(self, vector: Sequence[float], flt: Filter, k: int) -> list[Record]:
        request = qe.QueryRequest(
            limit=k,
            query=qe.Query.Nearest(list(vector), using=VECTOR),
            filter=_filter(flt),
            params=_SEARCH,
            with_payload=True,
        )
        with self._lock:
            return [_record(p, p.score) for p in self._shard.query(request)]

    def count(self, flt: Filter | None = None) -> int:
        with self._lock:
            return self._shard.count(qe.CountRequest(exact=True, filter=_filter(flt)))

    def index(self) -> bool:
        """One indexing step: let the optimizer index the segments that passed the
        threshold (and merge or vacuum what its config asks for). Does nothing without
        writes since the last step. Blocks the process for its duration (see above).
        True if anything was rebuilt."""
        with self._lock:
            if not self._dirty:
                return False
            rebuilt = self._shard.optimize()
            self._dirty = False
            if rebuilt:
                self._shard.flush()
                self._flushed = time.monotonic()
            return rebuilt

    def indexed(self) -> int:
        """Vectors in indexed (HNSW) segments, deleted copies included (tests, bench)."""
        with self._lock:
            return self._shard.info().indexed_vectors_count

    def close(self) -> None:
        with self._lock:
            self._shard.flush()
            self._shard.close()
            self._held.close()  # releases the lock
