"""Stage "stage": write the batch delta as Parquet, and read it back for publishing.

The staging folder of a batch holds one set of files per output; publishing
reads them, writes Qdrant and logs the same files to MLflow as the version's
artifacts. Staging is per batch and disposable: a failed batch leaves it behind
for inspection, and a retry writes a fresh one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import apache_beam as beam
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


def _to_row(element: dict, schema: pa.Schema) -> dict:
    return {name: element[name] for name in schema.names}


class WriteStaged(beam.PTransform):
    """Write one PCollection of dicts as ``<folder>/<name>-*.parquet``."""

    def __init__(self, folder: Path, name: str) -> None:
        super().__init__()
        self.folder, self.name, self.schema = folder, name, OUTPUTS[name]

    def expand(self, pcoll):
        return (
            pcoll
            | f"{self.name} rows" >> beam.Map(_to_row, self.schema)
            | f"write {self.name}"
            >> beam.io.WriteToParquet(
                str(self.folder / self.name),
                self.schema,
                file_name_suffix=".parquet",
                num_shards=1,
            )
        )


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


def doc_row(sourced: dict, model: str, n_chunks: int) -> dict:
    """The DOC_SCHEMA row of an accepted upsert or delete."""
    e = sourced["event"]
    upsert = e.op == "upsert"
    return {
        "doc_id": e.doc_id,
        "op": e.op,
        "title": e.title,
        "source": e.source,
        "url": e.url,
        "published_at": e.published_at,
        "metadata": json.dumps(e.metadata, sort_keys=True, ensure_ascii=False),
        "content_hash": e.content_hash if upsert else "",
        "model": model if upsert else "",
        "n_chunks": n_chunks,
        "topic": sourced["topic"],
        "partition": sourced["partition"],
        "offset": sourced["offset"],
    }
