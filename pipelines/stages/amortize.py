"""Stage "amortize": a document -> its memory entry, by one forward pass (MAC).

    in:  {"event": DocumentEvent, "topic", "partition", "offset"} (upserts)
    out: MODULATION rows: one float16 entry (entry_shape) per document, with the amortizer version

The amortizer is the MAC amortization network of ``knowstream.models.mac``:
the frozen MiniLM encoder reads the document and T learned queries distil it
into T vectors of the frozen LM's width. ``spec`` names the weights: a
checkpoint path, "bundled", or "init" for the seeded untrained network (same
weights on every machine, so its version is stable). A registry spec
(``models:/NAME@ALIAS``) is resolved to a local checkpoint folder by the batch
before the pipeline is built (``flows/batch.py``), so workers never read the
registry and one batch never mixes two amortizers; the stage refuses one. With
staging on a URL, ``run_batch`` hands the stage that folder's copy under the staging
URL instead (``pipelines/checkpoints.py``), which ``load_model`` copies to the
worker's disk once and loads from there: workers need not share the driver's disk.

Entries are stored as float16: half the bytes of float32, and well within the
precision the LM's prefix needs. ``device`` and ``dtype`` (settings
``amortize_device``, ``amortize_dtype``) place the compute; ``window_batch``
(``amortize_window_batch``) is the number of length-sorted windows per encoder
forward. The per-batch work is ``amortize_compute.amortize_batch``, which has no
Beam in it. ``Amortize`` is a model for Beam's ``RunInference`` (``Isolated`` in
``pipelines/faults.py``): the encoder and the networks load once per worker process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from apache_beam.metrics import Metrics

from knowstream.models.inference import (
    amortizer_version,
    is_registry_spec,
    load_amortizer,
    torch_dtype,
)
from knowstream.pipelines.checkpoints import local_checkpoint
from knowstream.pipelines.faults import StageModel, failpoint
from knowstream.pipelines.stages.amortize_compute import (
    WINDOW_BATCH,
    amortize_batch,
    load_stage_encoder,
)
from knowstream.settings import Settings


class Amortize(StageModel):
    stage = "amortize"

    def __init__(
        self,
        spec: str,
        torch_threads: int,
        device: str = "cpu",
        dtype: str = "float32",
        window_batch: int = WINDOW_BATCH,
        batch_size: int = 16,
        fail=(),
        shared: bool = False,
    ) -> None:
        torch_dtype(dtype)  # a wrong name fails when the pipeline is built, not in a worker
        if is_registry_spec(spec):
            raise ValueError(f"resolve the registry spec {spec!r} before building the pipeline")
        super().__init__(batch_size, fail=fail)
        self.spec, self.torch_threads = spec, torch_threads
        self.device, self.dtype, self.window_batch = device, dtype, window_batch
        self.shared = shared
        self.amortized = Metrics.counter("amortize", "docs")

    @classmethod
    def from_settings(cls, settings: Settings) -> Amortize:
        """The stage as ``settings`` configure it (amortizer spec, threads, device, dtype,
        window batch, batch size, failpoints): what the pipeline and the benchmarks build."""
        return cls(
            settings.amortizer,
            settings.torch_threads,
            settings.amortize_device,
            settings.amortize_dtype,
            settings.amortize_window_batch,
            settings.amortize_batch,
            settings.failpoints.get("amortize", ()),
            settings.amortize_shared,
        )

    @staticmethod
    def doc_id(sourced: dict) -> str:
        return sourced["event"].doc_id

    def share_model_across_processes(self) -> bool:
        # One copy per machine, served to the SDK worker processes from a process of its own
        # (Beam's multi_process_shared): one GPU's memory holds one amortizer, not one per worker.
        return self.shared

    def load_model(self) -> LoadedAmortizer:
        torch.set_num_threads(self.torch_threads)
        spec = local_checkpoint(self.spec)  # a checkpoint URL: copied to this machine once
        return LoadedAmortizer(spec, self.device, self.dtype, self.window_batch)

    def run_inference(self, batch: Sequence[dict], model, inference_args=None) -> list[dict]:
        failpoint(self.stage, map(self.doc_id, batch), self.fail)
        rows = model.rows([s["event"] for s in batch])
        self.amortized.inc(len(batch))
        return rows


class LoadedAmortizer:
    """The encoder and MAC networks of a spec, as RunInference holds its model: one object
    (Beam's model cache keeps a weak reference, which a tuple cannot take) whose one method
    is the work (a shared model is reached through a proxy: events in, rows out)."""

    def __init__(self, spec: str, device: str, dtype: str, window_batch: int) -> None:
        self.encoder = load_stage_encoder(device, dtype)
        self.mac = load_amortizer(spec, device, dtype)
        self.version = amortizer_version(spec)  # a hash over the weights: compute once
        self.window_batch = window_batch

    def rows(self, events: list) -> list[dict]:
        return amortize_batch(self.mac, self.encoder, events, self.version, self.window_batch)
