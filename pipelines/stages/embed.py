"""Stage "embed": chunks -> chunks with their all-MiniLM-L6-v2 embedding.

    in:  batches of chunk dicts (CHUNK_SCHEMA fields but "embedding")
    out: the same dicts with "embedding": list[float] (384, L2-normalized)

Batched (``BatchElements`` upstream) because one forward pass over 32 chunks
costs little more than over one. The encoder loads once per worker process.
"""

from __future__ import annotations

import apache_beam as beam
import torch
from apache_beam.metrics import Metrics


class Embed(beam.DoFn):
    def __init__(self, torch_threads: int) -> None:
        self.torch_threads = torch_threads
        self.embedded = Metrics.counter("embed", "chunks")

    def setup(self) -> None:
        from knowstream.models.encoder import load_encoder

        torch.set_num_threads(self.torch_threads)
        self.encoder = load_encoder()

    def process(self, chunks: list[dict]):
        vectors = self.encoder.embed([c["text"] for c in chunks])
        self.embedded.inc(len(chunks))
        for chunk, vec in zip(chunks, vectors, strict=True):
            yield {**chunk, "embedding": vec.tolist()}
