"""The amortize stage's per-batch compute, without Beam: events -> MODULATION rows.

The ``Amortize`` DoFn (``pipelines/stages/amortize.py``) calls ``amortize_batch``
for each batch, and ``bench/amortize.py`` calls the same function, so the
benchmark measures the stage's code path on machines without apache_beam (a GPU
box). Nothing here imports apache_beam.

``device`` and ``dtype`` (settings ``amortize_device``, ``amortize_dtype``) say
where the encoder and the amortizer run and in which float type. Entries are
stored as float16 whatever the compute dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from knowstream.models.inference import torch_dtype
from knowstream.models.mac import MAC

if TYPE_CHECKING:
    from knowstream.models.encoder import TextEncoder

STORE_DTYPE = torch.float16  # dtype of stored entries
# Windows per encoder forward. The stage's default is small: with windows sorted by length
# (``amortize_texts``), a small encoder batch pads to about its own windows' length; on CPU,
# 8 took a third less encoder time than 32 (bench/amortize.py, BENCHMARKS.md). On a GPU a
# larger batch may pay: settings ``amortize_window_batch``.
WINDOW_BATCH = 8


class AmortizeEvent(Protocol):
    """What ``amortize_batch`` reads of an event (a ``DocumentEvent`` has it)."""

    doc_id: str
    text: str

    @property
    def content_hash(self) -> str: ...


@functools.cache
def load_stage_encoder(device: str = "cpu", dtype: str = "float32") -> TextEncoder:
    """The frozen encoder on ``device`` in ``dtype``, once per process.

    float32 is the process-wide ``load_encoder(device)``; another dtype is a
    separate instance, so embed and serving keep their float32 encoder.
    """
    from knowstream.models.encoder import TextEncoder, load_encoder

    if dtype == "float32":
        return load_encoder(device)
    encoder = TextEncoder(device)
    encoder.model.to(torch_dtype(dtype))
    return encoder


def amortize_batch(
    mac: MAC,
    encoder: TextEncoder,
    events: Sequence[AmortizeEvent],
    version: str,
    window_batch: int = WINDOW_BATCH,
    sort_by_length: bool = True,
) -> list[dict]:
    """One MODULATION row per event: float16 entry, doc id, content hash, ``version``.

    Tokenization and windowing, the encoder and amortizer forward pass
    (``Amortizer.amortize_texts``), the float16 conversion and the rows: all the
    work the amortize stage does for a batch. ``sort_by_length=False`` encodes the windows in
    input order, as before length bucketing (``bench/amortize.py --unsorted`` compares).
    """
    from knowstream.schemas.modulation import Modulation

    if not events:
        return []
    with torch.inference_mode():
        texts = [e.text for e in events]
        entries = mac.amortizer.amortize_texts(encoder, texts, window_batch, sort_by_length)
    stored = entries.to(STORE_DTYPE).cpu().numpy()
    return [
        Modulation.from_array(event.doc_id, event.content_hash, version, entry).to_row()
        for event, entry in zip(events, stored, strict=True)
    ]
