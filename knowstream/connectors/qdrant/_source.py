"""Read one memory version: point-in-time search, documents, triples, modulations."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from knowstream.connectors.qdrant._client import Store, visible
from knowstream.schemas.modulation import Modulation


@dataclass(frozen=True)
class Hit:
    score: float
    doc_id: str
    chunk_id: str
    title: str
    text: str


class VersionView:
    """What one version sees. Cheap to build; holds no data."""

    def __init__(self, store: Store, lineage: Sequence[int]) -> None:
        self.store, self.lineage = store, list(lineage)

    def search(self, vector: Sequence[float], k: int = 5) -> list[Hit]:
        points = self.store.search(vector, visible(self.lineage, kind="chunk"), k)
        return [
            Hit(
                p.score,
                p.payload["doc_id"],
                p.payload["chunk_id"],
                p.payload["title"],
                p.payload["text"],
            )
            for p in points
        ]

    def docs(self, doc_ids: Sequence[str] = (), *, kind: str = "doc") -> dict[str, dict]:
        """Payloads of visible doc (or tombstone) points, by doc id; all when no ids."""
        flt = visible(self.lineage, kind=kind, doc_ids=doc_ids)
        return {p.payload["doc_id"]: p.payload for p in self.store.scroll(flt)}

    def chunks(self, doc_id: str) -> list[dict]:
        flt = visible(self.lineage, kind="chunk", doc_ids=[doc_id])
        return sorted(
            (p.payload for p in self.store.scroll(flt)),
            key=lambda c: c["index"],
        )

    def modulations(self, doc_ids: Sequence[str]) -> dict[str, Modulation]:
        return self.modulations_of(self.docs(doc_ids))

    @staticmethod
    def modulations_of(docs: dict[str, dict]) -> dict[str, Modulation]:
        """Decode (and checksum) the entries of doc payloads already read."""
        out = {}
        for doc_id, doc in docs.items():
            m = doc["modulation"]
            out[doc_id] = Modulation.from_row(
                {
                    "doc_id": doc_id,
                    "content_hash": doc["content_hash"],
                    "amortizer_version": m["amortizer_version"],
                    "shape": m["shape"],
                    "dtype": m["dtype"],
                    "data": base64.b64decode(m["data"]),
                    "checksum": m["checksum"],
                }
            )
        return out

    def modulation_bank(self, doc_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """The given docs that have an entry, in the given order, and their (N, T, d) entries."""
        mods = self.modulations(doc_ids)
        kept = [d for d in doc_ids if d in mods]
        return kept, np.stack([mods[d].to_array() for d in kept])

    def texts(self, doc_ids: Sequence[str]) -> dict[str, str]:
        """The text of each given doc, stitched from its chunks by their character offsets
        (chunks overlap; between chunks that do not, the document had only whitespace)."""
        parts: dict[str, list[str]] = {}
        ends: dict[str, int] = {}
        flt = visible(self.lineage, kind="chunk", doc_ids=doc_ids)
        for c in sorted((p.payload for p in self.store.scroll(flt)), key=lambda c: c["index"]):
            doc, end = c["doc_id"], ends.get(c["doc_id"], c["char_start"])
            if c["char_end"] <= end:
                continue
            if c["char_start"] > end:
                parts[doc].append(" ")
            parts.setdefault(doc, []).append(c["text"][max(end - c["char_start"], 0) :])
            ends[doc] = c["char_end"]
        return {doc: "".join(p) for doc, p in parts.items()}

    def digest(self) -> str:
        """sha256 over everything this version serves, independent of point ids and
        of which version wrote each point: equal digests mean equal memories."""
        rows = []
        for p in self.store.scroll(visible(self.lineage), with_vectors=True):
            payload = {k: v for k, v in p.payload.items() if k not in ("version_from", "closed_in")}
            if p.vector:
                payload["_vector"] = [round(x, 5) for x in p.vector]
            rows.append(json.dumps(payload, sort_keys=True, ensure_ascii=False))
        h = hashlib.sha256()
        for row in sorted(rows):
            h.update(row.encode("utf-8"))
        return h.hexdigest()

    def counts(self) -> dict[str, int]:
        out = {}
        for kind in ("doc", "chunk"):
            out[kind + "s"] = self.store.count(visible(self.lineage, kind=kind))
        return out
