"""SnapshotManifest: everything needed to trust, reproduce and roll back a version.

A manifest is written once, when its version is published, and never changed.
It is stored as ``manifest.json`` in the version's MLflow run and mirrored as
tags on the registered-model version, so the registry UI shows lineage too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

MANIFEST_FORMAT = 1  # bump when fields change meaning


@dataclass(frozen=True)
class OffsetRange:
    topic: str
    partition: int
    start: int  # first offset in the batch
    end: int  # one past the last offset in the batch


@dataclass(frozen=True)
class SnapshotManifest:
    version: int
    parent: int | None  # the version this one was built on; None for a root
    created_at: str  # ISO-8601 UTC
    kind: str  # "ingest" | "backfill"
    offsets: list[OffsetRange] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # docs, chunks, triples, ...
    model_versions: dict[str, str] = field(default_factory=dict)  # embedder, amortizer, triples
    checksums: dict[str, str] = field(default_factory=dict)  # artifact -> sha256; "content"
    # sha256 over the batch's source records (coordinates, timestamps, keys, values):
    # tells a redelivery of this very batch from new records at the same offsets.
    source_digest: str = ""
    format: int = MANIFEST_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SnapshotManifest:
        raw = json.loads(text)
        if raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"manifest format {raw.get('format')} != {MANIFEST_FORMAT}")
        raw["offsets"] = [OffsetRange(**o) for o in raw.get("offsets", [])]
        return cls(**raw)
