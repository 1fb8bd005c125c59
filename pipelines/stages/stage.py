"""Stage "stage": write the batch delta as Parquet (read back by ``schemas/staged.py``).

The staging folder of a batch holds one set of files per output; publishing
reads them, writes Qdrant and logs the same files to MLflow as the version's
artifacts. Staging is per batch and disposable: a failed batch leaves it behind
for inspection, and a retry writes a fresh one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from knowstream.schemas.staged import OUTPUTS


def _to_row(element: dict, schema: pa.Schema) -> dict:
    return {name: element[name] for name in schema.names}


class WriteStaged(beam.PTransform):
    """Write PCollections of dicts, ``{output name: PCollection}``, each as
    ``<folder>/<name>-00000-of-00001.parquet``; ``folder`` is a path or a URL of any
    Beam filesystem (``s3://bucket/prefix``). An empty PCollection writes no file
    (``read_staged`` reads it as no rows).

    All rows go through one GroupByKey keyed by output, and each output is one write of
    a name fixed in advance: a retried bundle rewrites the same file, never adds one.
    Lighter than a ``WriteToParquet`` per output (temporary files, then a finalize step:
    about 20 transforms each), which was 40-50 % of the Beam cost of a small
    micro-batch (BENCHMARKS.md 6.3)."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        self.folder = str(folder).rstrip("/")

    def expand(self, outputs: dict):
        keyed = [
            pcoll
            | f"{name} rows" >> beam.Map(lambda e, n, s: (n, _to_row(e, s)), name, OUTPUTS[name])
            for name, pcoll in outputs.items()
        ]
        return (
            keyed
            | "all rows" >> beam.Flatten()
            | "by output" >> beam.GroupByKey()
            | "write" >> beam.Map(_write_parquet, self.folder)
        )


def _write_parquet(keyed: tuple[str, Iterable[dict]], folder: str) -> str:
    name, rows = keyed
    path = f"{folder}/{name}-00000-of-00001.parquet"
    table = pa.Table.from_pylist(list(rows), OUTPUTS[name])
    with FileSystems.create(path) as f:
        pq.write_table(table, f)
    return path


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
