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

Two backends sit behind one small :class:`Store` interface:

- ``edge`` (the default without ``--qdrant-url``): qdrant-edge, Qdrant's
  embedded engine, under ``<home>/qdrant``. It uses payload indexes, so the
  version filters are index lookups, not scans; its write-ahead log locks the
  folder to one process (:class:`StoreHeld` names the holder).
- ``client``: qdrant-client, for a Qdrant server (``--qdrant-url``); its local
  mode (``qdrant_embedded="local"``) stands in for a server in tests.

Both see the same filters (:class:`Filter`: any-of matches, the only kind the
model needs) and return the same :class:`Record` rows. One store per location
and process, shared by its threads.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from knowstream.errors import KnowstreamError
from knowstream.settings import Settings

VECTOR = "text"  # named vector: chunk embeddings, and the mean of them on doc points
DIM = 384  # all-MiniLM-L6-v2
# Every payload field that publish, verify, purge and queries filter by: indexed.
INDEXED = {"kind": "keyword", "doc_id": "keyword", "version_from": "int", "closed_in": "int"}
HOLDER = "holder.json"  # beside the embedded store: who holds it, for the held-store error


@dataclass(frozen=True)
class Filter:
    """Points whose field matches any of the values, for every ``must`` field and
    no ``must_not`` field."""

    must: dict[str, list] = field(default_factory=dict)
    must_not: dict[str, list] = field(default_factory=dict)


@dataclass
class Record:
    id: str
    payload: dict
    vector: list[float] | None = None  # the VECTOR of the point, when asked for
    score: float = 0.0  # search results only


class Store(Protocol):
    where: str

    def upsert(self, points: list[Record]) -> None: ...
    def set_payload(self, ids: list[str], payload: dict) -> None: ...
    def delete(self, flt: Filter) -> None: ...
    def scroll(self, flt: Filter | None, *, with_vectors: bool = False) -> Iterator[Record]: ...
    def retrieve(self, ids: list[str]) -> list[Record]: ...  # with payloads and vectors
    def search(self, vector: Sequence[float], flt: Filter, k: int) -> list[Record]: ...
    def count(self, flt: Filter | None = None) -> int: ...
    def index(self) -> bool: ...  # one indexing step; True if it indexed anything
    def close(self) -> None: ...


class StoreHeld(KnowstreamError, RuntimeError):
    """Another process holds the embedded store. Not transient: retrying cannot help."""

    def __init__(self, where: Path) -> None:
        try:
            holder = json.loads((where / HOLDER).read_text())
            os.kill(int(holder["pid"]), 0)
            who = f"process {holder['pid']} ({holder['command']})"
        except (OSError, ValueError, KeyError):
            who = "another process"
        super().__init__(
            f"the store at {where} is held by {who}; use --qdrant-url, or stop it, or run "
            "the command while `knowstream serve` is up so it goes through its API"
        )


def claim(where: Path) -> None:
    """Record this process as the store's holder (read by :class:`StoreHeld`)."""
    command = " ".join(["knowstream" if i == 0 else a for i, a in enumerate(sys.argv)])
    tmp = where / f".{HOLDER}.{os.getpid()}"
    tmp.write_text(json.dumps({"pid": os.getpid(), "command": command[:120]}))
    tmp.replace(where / HOLDER)


_stores: dict[str, Store] = {}
_lock = threading.Lock()


def open_store(settings: Settings) -> Store:
    """The process-wide store for the configured Qdrant (server, edge or local mode)."""
    from knowstream.connectors.qdrant._edge import EdgeStore
    from knowstream.connectors.qdrant._server import ClientStore

    local = settings.qdrant_location.resolve()
    key = settings.qdrant_url or f"{settings.qdrant_embedded}:{local}:{settings.collection}"
    with _lock:
        if key not in _stores:
            if settings.qdrant_url:
                _stores[key] = ClientStore(settings.collection, url=settings.qdrant_url)
            elif settings.qdrant_embedded == "edge":
                _stores[key] = EdgeStore(local, settings.collection, settings.qdrant_index_kb)
            else:
                _stores[key] = ClientStore(settings.collection, path=local)
        return _stores[key]


def close_clients() -> None:
    """Release the embedded stores' locks (tests, and CLI commands that hand over)."""
    with _lock:
        for store in _stores.values():
            store.close()
        _stores.clear()


def visible(lineage: Sequence[int], *, kind: str | None = None, doc_ids: Sequence[str] = ()):
    """Filter for the points that the version whose lineage is given can see."""
    must: dict[str, list] = {"version_from": list(lineage)}
    if kind:
        must["kind"] = [kind]
    if doc_ids:
        must["doc_id"] = list(doc_ids)
    return Filter(must=must, must_not={"closed_in": list(lineage)})
