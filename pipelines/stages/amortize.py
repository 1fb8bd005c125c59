"""Stage "amortize": a document -> its memory entry, by one forward pass (MAC).

    in:  batches of {"event": DocumentEvent, "topic", "partition", "offset"} (upserts)
    out: MODULATION rows: (T, d_lm) float16 per document, with the amortizer version

The amortizer is the MAC amortization network of ``knowstream.models.mac``:
the frozen MiniLM encoder reads the document and T learned queries distil it
into T vectors of the frozen LM's width. ``spec`` names the weights: a
checkpoint path, or "init" for the seeded untrained network (same weights on
every machine, so its version is stable).

Entries are stored as float16: half the bytes of float32, and well within the
precision the LM's prefix needs.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import apache_beam as beam
import torch
from apache_beam.metrics import Metrics

from knowstream.models.mac import MAC, MACConfig
from knowstream.schemas.modulation import Modulation

STORE_DTYPE = torch.float16  # dtype of stored entries


@lru_cache(maxsize=4)
def load_amortizer(spec: str) -> MAC:
    """The MAC networks named by ``spec``, loaded once per process."""
    mac = MAC.init(MACConfig()) if spec == "init" else MAC.load(Path(spec))
    return mac.eval()


class Amortize(beam.DoFn):
    def __init__(self, spec: str, torch_threads: int) -> None:
        self.spec, self.torch_threads = spec, torch_threads
        self.amortized = Metrics.counter("amortize", "docs")

    def setup(self) -> None:
        from knowstream.models.encoder import load_encoder

        torch.set_num_threads(self.torch_threads)
        self.encoder = load_encoder()
        self.mac = load_amortizer(self.spec)
        self.version = self.mac.version  # a hash over the weights: compute once

    def process(self, batch: list[dict]):
        events = [s["event"] for s in batch]
        with torch.inference_mode():
            entries = self.mac.amortizer.amortize_texts(self.encoder, [e.text for e in events])
        entries = entries.to(STORE_DTYPE).cpu().numpy()
        self.amortized.inc(len(events))
        for event, entry in zip(events, entries, strict=True):
            yield Modulation.from_array(
                event.doc_id, event.content_hash, self.version, entry
            ).to_row()
