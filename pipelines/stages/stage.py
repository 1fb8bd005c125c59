"""Stage "stage": write the batch delta as Parquet (read back by ``schemas/staged.py``).

The staging folder of a batch holds one set of files per output; publishing
reads them, writes Qdrant and logs the same files to MLflow as the version's
artifacts. Staging is per batch and disposable: a failed batch leaves it behind
for inspection, and a retry writes a fresh one.
"""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import pyarrow as pa

from knowstream.schemas.staged import OUTPUTS


def _to_row(element: dict, schema: pa.Schema) -> dict:
    return {name: element[name] for name in schema.names}


class WriteStaged(beam.PTransform):
    """Write one PCollection of dicts as ``<folder>/<name>-*.parquet``; ``folder`` is a
    path or a URL of any Beam filesystem (``s3://bucket/prefix``)."""

    def __init__(self, folder: str | Path, name: str) -> None:
        super().__init__()
        self.folder, self.name, self.schema = folder, name, OUTPUTS[name]

    def expand(self, pcoll):
        return (
            pcoll
            | f"{self.name} rows" >> beam.Map(_to_row, self.schema)
            | f"write {self.name}"
            >> beam.io.WriteToParquet(
                f"{str(self.folder).rstrip('/')}/{self.name}",
                self.schema,
                file_name_suffix=".parquet",
                num_shards=1,
            )
        )


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
