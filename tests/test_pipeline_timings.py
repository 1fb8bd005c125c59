"""``run_batch`` on FnApiRunner: the encoder placement of the embed stage (``embed_device``)
and the per-stage timings a batch reports (``BatchResult.stage_ms``, ``inference_ms``)."""

from __future__ import annotations

import json

import pytest

from knowstream.connectors import staging as staging_store
from knowstream.pipelines.pipeline import run_batch
from knowstream.pipelines.stages.embed import Embed
from knowstream.settings import Settings

pytestmark = pytest.mark.fast  # no broker, no flow, no LM: Beam in-process and the stage models

DOCS = [
    {"doc_id": "a", "text": "Super Bowl 50 was an American football game. Denver won it."},
    {"doc_id": "b", "text": "Oxygen is a chemical element with symbol O and atomic number 8."},
    {"doc_id": "c", "text": "The Normans were the people who gave their name to Normandy."},
]


def test_embed_stage_places_its_encoder_on_the_configured_device():
    assert Settings().embed_device == "cpu"
    assert Settings(embed_device="cuda").embed_device == "cuda"
    stage = Embed(1, batch_size=1024, device="cpu")
    assert stage.forward_batch == 256 and Embed(1, batch_size=8).forward_batch == 32
    assert str(stage.load_model().device) == "cpu"


def test_a_batch_reports_its_stages_times(tmp_path):
    settings = Settings(home=tmp_path, embed_batch=64, amortize_batch=64, amortizer="init")
    records = [
        {
            "topic": "t",
            "partition": 0,
            "offset": i,
            "key": d["doc_id"].encode(),
            "value": json.dumps({**d, "op": "upsert"}).encode(),
            "timestamp_ms": 0,
        }
        for i, d in enumerate(DOCS)
    ]
    url = staging_store.batch_url(settings)
    result = run_batch(settings, records, known={}, model="m", staging=url)
    assert result.staged.upserts == 3 and len(result.staged.modulations) == 3
    assert all(len(c["embedding"]) == 384 for c in result.staged.chunks)
    # Every named stage ran and was timed by the runner (milliseconds, maybe 0 for the fast).
    for stage in ("parse", "dedup", "chunk", "embed", "triples", "amortize", "stage"):
        assert stage in result.stage_ms and result.stage_ms[stage] >= 0
    # The models' own time, from RunInference's metrics: the forward passes take some.
    assert set(result.inference_ms) == {"embed", "triples", "amortize"}
    assert all(ms > 0 for ms in result.inference_ms.values())
