"""Stage "amortize": the Amortize model in a real Beam pipeline (RunInference on FnApiRunner,
real MAC "init")."""

from __future__ import annotations

import pickle
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from knowstream.models.inference import amortizer_version, load_amortizer, torch_dtype
from knowstream.models.mac import MACConfig
from knowstream.pipelines.faults import Isolated
from knowstream.pipelines.stages.amortize import Amortize
from knowstream.schemas.event import DocumentEvent
from knowstream.schemas.modulation import MODULATION_SCHEMA, Modulation

pytestmark = pytest.mark.fast  # needs no service: the `make test-fast` tier

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


def run_amortize(out: Path, shared: bool = False) -> list[dict]:
    """Amortize SOURCED in a pipeline; its rows, collected through a file, sorted by doc."""

    def collect(actual: list[dict]) -> None:
        out.write_bytes(pickle.dumps(sorted(actual, key=lambda r: r["doc_id"])))

    options = PipelineOptions(["--runner=FnApiRunner"])
    with BeamTestPipeline(options=options) as p:
        rows = (
            p
            | beam.Create(SOURCED)
            | RunInference(Amortize("init", 1, batch_size=2, shared=shared))  # two batches
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
    # the version is hashed from the very model the stage computes with on CPU: one load
    assert load_amortizer("init") is load_amortizer("init", "cpu", "float32")


def test_deterministic_across_runs(runs):
    first, second = runs
    assert [(r["data"], r["checksum"]) for r in first] == [
        (r["data"], r["checksum"]) for r in second
    ]


# --- the per-batch compute, without Beam (amortize_compute) -------------------------------------
LONG = " ".join(
    f"Paragraph {i} of a long report on the history of the river and its trade." for i in range(60)
)


def test_length_bucketing_equals_input_order():
    """Windows sorted by length before batching give the entries of the unsorted order."""
    import torch

    from knowstream.models.encoder import load_encoder

    mac = load_amortizer("init")
    encoder = load_encoder()
    # Texts of very different lengths, one of them several windows long, in an order that
    # sorting changes; window_batch=2 makes the batches (and their padding) differ.
    texts = [LONG, TEXTS["Oxygen_0"], LONG[:700], "Short.", TEXTS["Super_Bowl_50_0"]]
    assert len(encoder.tokenizer(LONG, add_special_tokens=False)["input_ids"]) > 2 * 254
    with torch.inference_mode():
        unsorted = mac.amortizer.amortize_texts(encoder, texts, 2, sort_by_length=False)
        bucketed = mac.amortizer.amortize_texts(encoder, texts, 2)
        one_by_one = torch.cat([mac.amortizer.amortize_texts(encoder, [t]) for t in texts])
    assert bucketed.shape == (len(texts), 16, 576)
    torch.testing.assert_close(bucketed, unsorted, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bucketed, one_by_one, rtol=1e-4, atol=1e-5)


def test_amortize_batch_makes_the_stage_rows(runs):
    """The plain function the DoFn calls, on one batch of all docs: the pipeline's rows."""
    from knowstream.models.encoder import load_encoder
    from knowstream.pipelines.stages.amortize_compute import amortize_batch

    first, _ = runs
    events = [s["event"] for s in SOURCED]
    rows = amortize_batch(load_amortizer("init"), load_encoder(), events, amortizer_version("init"))
    rows = sorted(rows, key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in rows] == [r["doc_id"] for r in first]
    for got, want in zip(rows, first, strict=True):
        assert {k: got[k] for k in got if k not in ("data", "checksum")} == {
            k: want[k] for k in want if k not in ("data", "checksum")
        }
        a, b = (Modulation.from_row(r).to_array().astype(np.float32) for r in (got, want))
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3)  # float16, other batch padding
    assert amortize_batch(load_amortizer("init"), load_encoder(), [], "v") == []


def test_bfloat16_compute_stores_float16_entries_close_to_float32():
    from knowstream.pipelines.stages.amortize_compute import amortize_batch, load_stage_encoder

    events = [s["event"] for s in SOURCED]
    version = amortizer_version("init")
    fp32 = amortize_batch(load_amortizer("init"), load_stage_encoder(), events, version)
    mac16 = load_amortizer("init", "cpu", "bfloat16")
    bf16 = amortize_batch(mac16, load_stage_encoder("cpu", "bfloat16"), events, version)
    assert next(mac16.parameters()).dtype.is_floating_point and str(
        next(mac16.parameters()).dtype
    ).endswith("bfloat16")
    # The float32 model others use is untouched by the bfloat16 copy.
    assert str(next(load_amortizer("init").parameters()).dtype).endswith("float32")
    assert load_stage_encoder().model.dtype != load_stage_encoder("cpu", "bfloat16").model.dtype
    for a, b in zip(fp32, bf16, strict=True):
        assert b["dtype"] == "float16" and b["amortizer_version"] == version
        x, y = (Modulation.from_row(r).to_array().astype(np.float32) for r in (a, b))
        # bfloat16 keeps 8 bits of mantissa: compare relative to the entry's scale.
        assert np.abs(x - y).max() < 0.05 * np.abs(x).max()


def test_dtype_and_settings_fields():
    from knowstream.settings import Settings

    with pytest.raises(ValueError, match="dtype must be one of"):
        Amortize("init", torch_threads=1, dtype="fp8")
    assert str(torch_dtype("bfloat16")) == "torch.bfloat16"
    s = Settings(amortize_device="cuda", amortize_dtype="bfloat16")
    assert (s.amortize_device, s.amortize_dtype) == ("cuda", "bfloat16")
    assert (Settings().amortize_device, Settings().amortize_dtype) == ("cpu", "float32")
    with pytest.raises(ValueError):
        Settings(amortize_dtype="float64")


def test_a_model_shared_across_processes_gives_the_same_rows(runs, tmp_path):
    # amortize_shared: the networks load in a process of their own (Beam's
    # multi_process_shared) and the stage reaches them through a proxy.
    shared = run_amortize(tmp_path / "shared.pkl", shared=True)
    assert [r["checksum"] for r in shared] == [r["checksum"] for r in runs[0]]


def test_a_failing_doc_is_reported_alone_and_its_batch_neighbours_amortized(tmp_path):
    def amortized(actual: list[dict]) -> None:
        (tmp_path / "ok.pkl").write_bytes(pickle.dumps(sorted(r["doc_id"] for r in actual)))

    stage = Amortize("init", torch_threads=1, batch_size=3, fail={"Oxygen_0"})
    with BeamTestPipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        ok, failures = p | beam.Create(SOURCED) | Isolated(stage)  # one batch of three
        assert_that(ok, amortized)
        assert_that(
            failures | beam.Map(lambda f: (f[0], f[1]["stage"], f[1]["error"])),
            equal_to([("Oxygen_0", "amortize", "InjectedFault")]),
            label="failures",
        )
    assert pickle.loads((tmp_path / "ok.pkl").read_bytes()) == ["Black_Death_0", "Super_Bowl_50_0"]
