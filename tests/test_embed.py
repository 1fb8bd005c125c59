"""Stage "embed": the Embed model in a real Beam pipeline (RunInference on FnApiRunner, real
MiniLM encoder)."""

from __future__ import annotations

import pickle
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from knowstream.models.encoder import TextEncoder
from knowstream.pipelines.faults import Isolated
from knowstream.pipelines.stages.embed import Embed
from knowstream.schemas.chunk import CHUNK_SCHEMA, chunk_id

pytestmark = pytest.mark.fast  # needs no service: the `make test-fast` tier

TEXTS = [
    "Super Bowl 50 was an American football game.",
    "The Denver Broncos defeated the Carolina Panthers 24–10.",
    "Oxygen is a chemical element with symbol O and atomic number 8.",
]
CHUNKS = [
    {
        "chunk_id": chunk_id(f"doc{i}", 0, f"hash{i}"),
        "doc_id": f"doc{i}",
        "index": 0,
        "text": text,
        "char_start": 0,
        "char_end": len(text),
        "n_tokens": len(text.split()),
        "content_hash": f"hash{i}",
    }
    for i, text in enumerate(TEXTS)
]


def run_embed(out: Path) -> list[dict]:
    """Embed CHUNKS in a pipeline; its output, collected through a file, sorted by doc."""

    def collect(actual: list[dict]) -> None:
        out.write_bytes(pickle.dumps(sorted(actual, key=lambda c: c["doc_id"])))

    options = PipelineOptions(["--runner=FnApiRunner"])
    with BeamTestPipeline(options=options) as p:
        embedded = p | beam.Create(CHUNKS) | RunInference(Embed(1, batch_size=2))  # two batches
        assert_that(embedded, collect)
    return pickle.loads(out.read_bytes())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    tmp = tmp_path_factory.mktemp("embed")
    return run_embed(tmp / "first.pkl"), run_embed(tmp / "second.pkl")


def test_one_output_per_chunk_with_fields_kept(runs):
    first, _ = runs
    assert [{k: v for k, v in c.items() if k != "embedding"} for c in first] == CHUNKS
    assert all(set(c) == set(CHUNK_SCHEMA.names) for c in first)


def test_embeddings_are_384d_and_normalized(runs):
    first, _ = runs
    vectors = np.array([c["embedding"] for c in first], dtype=np.float32)
    assert vectors.shape == (3, TextEncoder.dim) == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(vectors).all()
    # Distinct texts, distinct vectors; the two football sentences are the closest pair.
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] and sims[0, 1] > sims[1, 2] and sims[0, 1] < 0.999


def test_deterministic_across_runs(runs):
    first, second = runs
    as_bytes = [np.array(c["embedding"], dtype=np.float32).tobytes() for c in first]
    assert as_bytes == [np.array(c["embedding"], dtype=np.float32).tobytes() for c in second]


def test_a_failing_chunk_fails_its_doc_alone_and_its_batch_goes_on(tmp_path):
    # doc1's chunk raises inside the batched forward pass; the batch is rerun one chunk at a
    # time, so only doc1 fails and the chunks batched with it are embedded.
    def embedded(actual: list[dict]) -> None:
        (tmp_path / "ok.pkl").write_bytes(pickle.dumps(sorted(c["doc_id"] for c in actual)))

    p = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    ok, failures = p | beam.Create(CHUNKS) | Isolated(Embed(1, batch_size=3, fail={"doc1"}))
    assert_that(ok, embedded)
    assert_that(
        failures | beam.Map(lambda f: (f[0], f[1]["stage"], f[1]["error"], f[1]["message"])),
        equal_to([("doc1", "embed", "InjectedFault", "failpoint: embed fails for doc1")]),
        label="failures",
    )
    result = p.run()
    result.wait_until_finish()
    counters: dict[str, int] = {}  # summed over the batched and the one-at-a-time step
    for c in result.metrics().query()["counters"]:
        if c.key.metric.namespace == "embed":
            counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + c.committed
    assert pickle.loads((tmp_path / "ok.pkl").read_bytes()) == ["doc0", "doc2"]
    # The batch of three failed whole, then doc1 alone; two chunks were embedded on the rerun.
    assert counters["failed_batches_counter"] == 2 and counters["chunks"] == 2
