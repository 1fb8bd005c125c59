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
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from knowstream.models.mac import MAC, MACConfig

if TYPE_CHECKING:
    from knowstream.models.encoder import TextEncoder

STORE_DTYPE = torch.float16  # dtype of stored entries
# Windows per encoder forward. The stage's default is small: with windows sorted by length
# (``amortize_texts``), a small encoder batch pads to about its own windows' length; on CPU,
# 8 took a third less encoder time than 32 (bench/amortize.py, BENCHMARKS.md). On a GPU a
# larger batch may pay: settings ``amortize_window_batch``.
WINDOW_BATCH = 8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bundled_checkpoint() -> Path:
    """The folder of the checkpoint that ships inside the ``knowstream.models`` package
    (models/checkpoints/mac-squad, trained on SQuAD v1.1 dev train articles + SQuADShifts,
    EVAL.md), so a fresh machine amortizes with trained weights and no training step."""
    import knowstream.models

    return Path(knowstream.models.__path__[0]) / "checkpoints" / "mac-squad"


class AmortizeEvent(Protocol):
    """What ``amortize_batch`` reads of an event (a ``DocumentEvent`` has it)."""

    doc_id: str
    text: str

    @property
    def content_hash(self) -> str: ...


def is_registry_spec(spec: str) -> bool:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or "registry": an MLflow registry
    version, which the batch resolves to a local folder before the pipeline runs."""
    return spec == "registry" or spec.startswith("models:/")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {name!r}") from None


@functools.lru_cache(maxsize=8)
def load_amortizer(spec: str, device: str = "cpu", dtype: str = "float32") -> MAC:
    """The MAC networks named by ``spec`` on ``device`` in ``dtype``, loaded once per process.

    ``spec`` is a checkpoint folder, "bundled" for the checkpoint that ships with
    knowstream, or "init" for the seeded untrained network. A registry spec
    (``models:/...``, "registry") is resolved to a folder first, once per batch, by
    ``connectors.mlflow._registry.resolve_amortizer``: workers never read the registry.
    """
    if is_registry_spec(spec):
        raise ValueError(
            f"amortizer spec {spec!r} names a registry version: resolve it to a checkpoint "
            "folder first (knowstream.connectors.mlflow._registry.resolve_amortizer)"
        )
    if spec == "init":
        mac = MAC.init(MACConfig())
    else:
        mac = MAC.load(bundled_checkpoint() if spec == "bundled" else Path(spec))
    if device != "cpu" or dtype != "float32":
        # Its own cache entry: the float32 CPU model stays as it is for its other users
        # (model versions, serving).
        mac = mac.to(device=device, dtype=torch_dtype(dtype))
    return mac.eval()


@functools.lru_cache(maxsize=8)
def amortizer_version(spec: str) -> str:
    """The version of ``spec``'s weights: a hash of the float32 weights, whatever the
    compute placement, so it equals the one ``flows.batch.model_versions`` records.
    Computed once per spec and process, like ``load_amortizer``'s weights it hashes
    (sha256 over 19 MB: not for every batch or request)."""
    return load_amortizer(spec).version


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
    """One MODULATION row per event: (T, d_lm) float16 entry, doc id, content hash, ``version``.

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
    entries = entries.to(STORE_DTYPE).cpu().numpy()
    return [
        Modulation.from_array(event.doc_id, event.content_hash, version, entry).to_row()
        for event, entry in zip(events, entries, strict=True)
    ]
