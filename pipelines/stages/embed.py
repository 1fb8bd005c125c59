"""Stage "embed": chunks -> chunks with their all-MiniLM-L6-v2 embedding.

    in:  chunk dicts (CHUNK_SCHEMA fields but "embedding")
    out: the same dicts with "embedding": list[float] (384, L2-normalized)

A model for Beam's ``RunInference`` (``Isolated`` in ``pipelines/faults.py``): the
encoder loads once per worker process, and chunks are batched because one forward
pass over 32 chunks costs little more than over one. ``device`` (setting
``embed_device``) places the encoder: "cpu", "cuda", "cuda:1"; on a GPU a larger
``embed_batch`` pays (a RunInference batch is sorted by length and encoded
``forward_batch`` chunks at a time, with one copy of the vectors back at its end).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from apache_beam.metrics import Metrics

from knowstream.pipelines.faults import StageModel, failpoint

FORWARD_MAX = 256  # chunks per encoder forward at most


class Embed(StageModel):
    stage = "embed"

    def __init__(
        self, torch_threads: int, batch_size: int = 32, fail=(), device: str = "cpu"
    ) -> None:
        super().__init__(batch_size, fail=fail)
        self.torch_threads = torch_threads
        self.device = device
        # Chunks per encoder forward, within a RunInference batch sorted by length
        # (``TextEncoder.embed``): the batch itself, between 32 and FORWARD_MAX; on a GPU a
        # larger RunInference batch tokenizes the next forward while the last one computes.
        self.forward_batch = max(32, min(batch_size, FORWARD_MAX))
        self.embedded = Metrics.counter("embed", "chunks")

    @staticmethod
    def doc_id(chunk: dict) -> str:
        return chunk["doc_id"]

    def load_model(self):
        from knowstream.models.encoder import load_encoder

        torch.set_num_threads(self.torch_threads)
        return load_encoder(self.device)

    def run_inference(self, chunks: Sequence[dict], encoder, inference_args=None) -> list[dict]:
        failpoint(self.stage, map(self.doc_id, chunks), self.fail)
        vectors = encoder.embed([c["text"] for c in chunks], self.forward_batch)
        self.embedded.inc(len(chunks))
        # One conversion of the (n, 384) array to Python floats, not one per row.
        rows = vectors.tolist()
        return [{**c, "embedding": v} for c, v in zip(chunks, rows, strict=True)]
