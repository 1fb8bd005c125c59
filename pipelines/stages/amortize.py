"""Stage "amortize": a document -> its memory entry, by one forward pass (MAC).

    in:  batches of {"event": DocumentEvent, "topic", "partition", "offset"} (upserts)
    out: MODULATION rows: (T, d_lm) float16 per document, with the amortizer version

The amortizer is the MAC amortization network of ``knowstream.models.mac``:
the frozen MiniLM encoder reads the document and T learned queries distil it
into T vectors of the frozen LM's width. ``spec`` names the weights: a
checkpoint path, "bundled", or "init" for the seeded untrained network (same
weights on every machine, so its version is stable). A registry spec
(``models:/NAME@ALIAS``) is resolved to a local checkpoint folder by the batch
before the pipeline is built (``flows/batch.py``), so workers never read the
registry and one batch never mixes two amortizers; the stage refuses one.

Entries are stored as float16: half the bytes of float32, and well within the
precision the LM's prefix needs. ``device`` and ``dtype`` (settings
``amortize_device``, ``amortize_dtype``) place the compute; ``window_batch``
(``amortize_window_batch``) is the number of length-sorted windows per encoder
forward. The per-batch work is ``amortize_compute.amortize_batch``, which has no
Beam in it.
"""

from __future__ import annotations

import apache_beam as beam
import torch
from apache_beam.metrics import Metrics

from knowstream.models.inference import (
    amortizer_version,
    is_registry_spec,
    load_amortizer,
    torch_dtype,
)
from knowstream.pipelines.stages.amortize_compute import (
    WINDOW_BATCH,
    amortize_batch,
    load_stage_encoder,
)
from knowstream.settings import Settings


class Amortize(beam.DoFn):
    def __init__(
        self,
        spec: str,
        torch_threads: int,
        device: str = "cpu",
        dtype: str = "float32",
        window_batch: int = WINDOW_BATCH,
    ) -> None:
        torch_dtype(dtype)  # a wrong name fails when the pipeline is built, not in a worker
        if is_registry_spec(spec):
            raise ValueError(f"resolve the registry spec {spec!r} before building the pipeline")
        self.spec, self.torch_threads = spec, torch_threads
        self.device, self.dtype, self.window_batch = device, dtype, window_batch
        self.amortized = Metrics.counter("amortize", "docs")

    @classmethod
    def from_settings(cls, settings: Settings) -> Amortize:
        """The stage as ``settings`` configure it (amortizer spec, threads, device, dtype,
        window batch): what the pipeline and the benchmarks build."""
        return cls(
            settings.amortizer,
            settings.torch_threads,
            settings.amortize_device,
            settings.amortize_dtype,
            settings.amortize_window_batch,
        )

    def setup(self) -> None:
        torch.set_num_threads(self.torch_threads)
        self.encoder = load_stage_encoder(self.device, self.dtype)
        self.mac = load_amortizer(self.spec, self.device, self.dtype)
        self.version = amortizer_version(self.spec)  # a hash over the weights: compute once

    def process(self, batch: list[dict]):
        events = [s["event"] for s in batch]
        rows = amortize_batch(self.mac, self.encoder, events, self.version, self.window_batch)
        self.amortized.inc(len(events))
        yield from rows
