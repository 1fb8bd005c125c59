"""Stage "amortize": the Amortize DoFn in a real Beam pipeline (FnApiRunner, real MAC "init")."""

from __future__ import annotations

import pickle
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that

from knowstream.models.mac import MACConfig
from knowstream.pipelines.stages.amortize import Amortize, load_amortizer
from knowstream.schemas.event import DocumentEvent
from knowstream.schemas.modulation import MODULATION_SCHEMA, Modulation

TEXTS = {
    "Super_Bowl_50_0": "Super Bowl 50 was an American football game played in 2016.",
    "Oxygen_0": "Oxygen is a chemical element with symbol O and atomic number 8.",
    "Black_Death_0": "The Black Death was a devastating global epidemic of bubonic plague.",
}
SOURCED = [
    {
        "event": DocumentEvent(doc_id=doc_id, op="upsert", text=text),
        "topic": "docs",
        "partition": 0,
        "offset": offset,
    }
    for offset, (doc_id, text) in enumerate(TEXTS.items())
]


def run_amortize(out: Path) -> list[dict]:
    """Amortize SOURCED in a pipeline; its rows, collected through a file, sorted by doc."""

    def collect(actual: list[dict]) -> None:
        out.write_bytes(pickle.dumps(sorted(actual, key=lambda r: r["doc_id"])))

    options = PipelineOptions(["--runner=FnApiRunner"])
    with BeamTestPipeline(options=options) as p:
        rows = (
            p
            | beam.Create(SOURCED)
            | beam.BatchElements(min_batch_size=2, max_batch_size=2)  # two batches
            | beam.ParDo(Amortize("init", torch_threads=1))
        )
        assert_that(rows, collect)
    return pickle.loads(out.read_bytes())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    tmp = tmp_path_factory.mktemp("amortize")
    return run_amortize(tmp / "first.pkl"), run_amortize(tmp / "second.pkl")


def test_one_modulation_row_per_doc(runs):
    first, _ = runs
    assert [r["doc_id"] for r in first] == sorted(TEXTS)
    hashes = {s["event"].doc_id: s["event"].content_hash for s in SOURCED}
    assert all(r["content_hash"] == hashes[r["doc_id"]] for r in first)
    pa.Table.from_pylist(first, schema=MODULATION_SCHEMA)  # the rows fit the staged schema


def test_entries_are_t_by_d_lm_float16(runs):
    first, _ = runs
    config = MACConfig()
    for row in first:
        entry = Modulation.from_row(row).to_array()  # checks the checksum too
        assert entry.shape == (config.n_tokens, config.d_lm) == (16, 576)
        assert entry.dtype == np.float16
        assert np.isfinite(entry).all() and np.abs(entry).max() > 0
    a, b = (Modulation.from_row(r).to_array() for r in first[:2])
    assert not np.array_equal(a, b)  # different documents, different entries


def test_version_is_the_amortizers(runs):
    first, _ = runs
    version = load_amortizer("init").version
    assert version.startswith("mac-")
    assert {r["amortizer_version"] for r in first} == {version}


def test_deterministic_across_runs(runs):
    first, second = runs
    assert [(r["data"], r["checksum"]) for r in first] == [
        (r["data"], r["checksum"]) for r in second
    ]
