"""Stage "embed": chunks -> chunks with their all-MiniLM-L6-v2 embedding.

    in:  chunk dicts (CHUNK_SCHEMA fields but "embedding")
    out: the same dicts with "embedding": list[float] (384, L2-normalized)

A model for Beam's ``RunInference`` (``Isolated`` in ``pipelines/faults.py``): the
encoder loads once per worker process, and chunks are batched because one forward
pass over 32 chunks costs little more than over one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from apache_beam.metrics import Metrics

from knowstream.pipelines.faults import StageModel, failpoint


class Embed(StageModel):
    stage = "embed"

    def __init__(self, torch_threads: int, batch_size: int = 32, fail=()) -> None:
        super().__init__(batch_size, fail=fail)
        self.torch_threads = torch_threads
        self.embedded = Metrics.counter("embed", "chunks")

    @staticmethod
    def doc_id(chunk: dict) -> str:
        return chunk["doc_id"]

    def load_model(self):
        from knowstream.models.encoder import load_encoder

        torch.set_num_threads(self.torch_threads)
        return load_encoder()

    def run_inference(self, chunks: Sequence[dict], encoder, inference_args=None) -> list[dict]:
        failpoint(self.stage, map(self.doc_id, chunks), self.fail)
        vectors = encoder.embed([c["text"] for c in chunks])
        self.embedded.inc(len(chunks))
        return [{**c, "embedding": v.tolist()} for c, v in zip(chunks, vectors, strict=True)]
