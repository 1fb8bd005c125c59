"""A batch delta as staged on disk: one set of Parquet files per output.

The "stage" stage (``pipelines/stages/stage.py``) writes them; publishing
(``knowstream/memory.py``, ``connectors/qdrant``) reads them back here, without
Apache Beam: serving and the store never load the pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from knowstream.schemas.chunk import CHUNK_SCHEMA
from knowstream.schemas.event import DEAD_LETTER_SCHEMA, DOC_SCHEMA
from knowstream.schemas.modulation import MODULATION_SCHEMA
from knowstream.schemas.triple import TRIPLE_SCHEMA

OUTPUTS: dict[str, pa.Schema] = {
    "docs": DOC_SCHEMA,
    "chunks": CHUNK_SCHEMA,
    "triples": TRIPLE_SCHEMA,
    "modulations": MODULATION_SCHEMA,
    "dead_letters": DEAD_LETTER_SCHEMA,
}


@dataclass
class StagedBatch:
    """A batch delta read back from its staging folder, as lists of row dicts."""

    docs: list[dict] = field(default_factory=list)
    chunks: list[dict] = field(default_factory=list)
    triples: list[dict] = field(default_factory=list)
    modulations: list[dict] = field(default_factory=list)
    dead_letters: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def upserts(self) -> int:
        return sum(d["op"] == "upsert" for d in self.docs)

    @property
    def deletes(self) -> int:
        return sum(d["op"] == "delete" for d in self.docs)

    @property
    def changes(self) -> bool:
        return bool(self.docs)

    def doc_metadata(self, doc_id: str) -> dict:
        row = next(d for d in self.docs if d["doc_id"] == doc_id)
        return json.loads(row["metadata"] or "{}")


def read_staged(folder: Path) -> StagedBatch:
    batch = StagedBatch()
    for name, schema in OUTPUTS.items():
        files = sorted(folder.glob(f"{name}-*.parquet"))
        batch.files.extend(files)
        rows: list[dict] = []
        for f in files:
            rows.extend(pq.read_table(f, schema=schema).to_pylist())
        setattr(batch, name, rows)
    return batch
