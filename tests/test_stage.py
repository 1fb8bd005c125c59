"""Stage "stage": WriteStaged -> Parquet -> read_staged round trips, and doc_row."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from knowstream.pipelines.stages.stage import WriteStaged, doc_row
from knowstream.schemas.chunk import chunk_id
from knowstream.schemas.event import DocumentEvent, dead_letter
from knowstream.schemas.modulation import Modulation
from knowstream.schemas.staged import OUTPUTS, StagedBatch, read_staged

pytestmark = pytest.mark.fast  # needs no service: the `make test-fast` tier

T = datetime(2016, 6, 1, 12, 30, 15, 123456, tzinfo=UTC)
UPSERT = DocumentEvent(
    doc_id="Super_Bowl_50_0",
    op="upsert",
    title="Super_Bowl_50",
    text="Super Bowl 50 was an American football game.",
    source="squad-v1.1-dev",
    url="https://en.wikipedia.org/wiki/Super_Bowl_50",
    published_at=T,
    metadata={"paragraph": 0, "article": "Super Bowl 50 — Levi's"},
)
DELETE = DocumentEvent(doc_id="Black_Death_0", op="delete", published_at=None)
CHASH = UPSERT.content_hash
CID = chunk_id(UPSERT.doc_id, 0, CHASH)


def sourced(event: DocumentEvent, offset: int) -> dict:
    return {"event": event, "topic": "docs", "partition": 2, "offset": offset}


def entry() -> np.ndarray:
    return np.arange(16 * 8, dtype=np.float16).reshape(16, 8) / 7


# One or two rows per output, each with a field the schema drops ("extra").
ROWS: dict[str, list[dict]] = {
    "docs": [
        doc_row(sourced(UPSERT, 7), "model-a", 1),
        doc_row(sourced(DELETE, 8), "model-a", 0),
    ],
    "chunks": [
        {
            "chunk_id": CID,
            "doc_id": UPSERT.doc_id,
            "index": 0,
            "text": UPSERT.text,
            "char_start": 0,
            "char_end": len(UPSERT.text),
            "n_tokens": 10,
            "content_hash": CHASH,
            "embedding": [0.5, -0.25, 0.125, 0.0],
        }
    ],
    "triples": [
        {
            "subject": "Super Bowl 50",
            "relation": "is",
            "object": "American football game",
            "doc_id": UPSERT.doc_id,
            "chunk_id": CID,
            "confidence": 0.75,
            "observed_at": T,
        },
        {
            "subject": "Denver Broncos",
            "relation": "defeat",
            "object": "Carolina Panthers",
            "doc_id": UPSERT.doc_id,
            "chunk_id": CID,
            "confidence": 0.5,
            "observed_at": None,
        },
    ],
    "modulations": [Modulation.from_array(UPSERT.doc_id, CHASH, "mac-0123", entry()).to_row()],
    "dead_letters": [
        dead_letter(
            {"topic": "docs", "partition": 2, "offset": 9},
            stage="parse",
            error="InvalidEvent",
            reason="not_utf8",
            detail="message is not UTF-8",
            key=b"x",
            value=b"\xff not JSON",
        ),
        dead_letter(
            {"topic": "docs", "partition": 2, "offset": 10},
            stage="amortize",
            error="RuntimeError",
            reason="stage_error",
            detail="out of memory",
            doc_id=UPSERT.doc_id,
            key=UPSERT.doc_id.encode(),
        ),
    ],
}


def stage(folder: Path, rows: dict[str, list[dict]]) -> StagedBatch:
    """Write every output through WriteStaged in one pipeline, then read the folder back."""
    folder.mkdir(parents=True, exist_ok=True)
    options = PipelineOptions(["--runner=FnApiRunner"])
    with BeamTestPipeline(options=options) as p:
        outputs = {
            name: p
            | f"create {name}" >> beam.Create([{**r, "extra": "dropped"} for r in rows[name]])
            for name in OUTPUTS
        }
        _ = outputs | "stage" >> WriteStaged(folder)
    return read_staged(folder)


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> StagedBatch:
    return stage(tmp_path_factory.mktemp("staged"), ROWS)


@pytest.fixture(scope="module")
def staged_empty(tmp_path_factory) -> StagedBatch:
    return stage(tmp_path_factory.mktemp("staged-empty"), {name: [] for name in OUTPUTS})


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_round_trip(staged, name):
    assert getattr(staged, name) == ROWS[name]


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_empty_round_trip(staged_empty, name):
    assert getattr(staged_empty, name) == []


def test_files_are_one_parquet_shard_per_output(staged):
    assert sorted(f.name.split("-")[0] for f in staged.files) == sorted(OUTPUTS)
    assert all(f.suffix == ".parquet" for f in staged.files)


def test_batch_summary(staged, staged_empty):
    assert (staged.upserts, staged.deletes, staged.changes) == (1, 1, True)
    assert (staged_empty.upserts, staged_empty.deletes, staged_empty.changes) == (0, 0, False)
    assert staged.doc_metadata(UPSERT.doc_id) == UPSERT.metadata
    assert staged.doc_metadata(DELETE.doc_id) == {}


def test_staged_modulation_is_intact(staged):
    restored = Modulation.from_row(staged.modulations[0]).to_array()
    assert restored.dtype == entry().dtype and (restored == entry()).all()


def test_read_staged_of_missing_folder_is_empty(tmp_path):
    batch = read_staged(tmp_path / "nothing")
    assert not batch.changes and batch.files == []


def test_doc_row_of_upsert():
    row = doc_row(sourced(UPSERT, 7), "model-a", 3)
    assert row == {
        "doc_id": "Super_Bowl_50_0",
        "op": "upsert",
        "title": "Super_Bowl_50",
        "source": "squad-v1.1-dev",
        "url": "https://en.wikipedia.org/wiki/Super_Bowl_50",
        "published_at": T,
        "metadata": '{"article": "Super Bowl 50 — Levi\'s", "paragraph": 0}',
        "content_hash": CHASH,
        "model": "model-a",
        "n_chunks": 3,
        "topic": "docs",
        "partition": 2,
        "offset": 7,
    }
    assert list(row) == OUTPUTS["docs"].names


def test_doc_row_of_delete_has_no_hash_or_model():
    row = doc_row(sourced(DELETE, 8), "model-a", 0)
    assert (row["op"], row["content_hash"], row["model"], row["n_chunks"]) == ("delete", "", "", 0)
    assert json.loads(row["metadata"]) == {} and row["published_at"] is None
