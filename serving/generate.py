"""Answers from the frozen LM: from retrieved text (RAG), from the memory (MAC), or both.

    mode "rag":     question + top-k retrieved chunks in the prompt
    mode "mac":     question only; the retrieved documents' memory entries,
                    aggregated for the question, enter as prefix key/values
    mode "mac+rag": both

Prompts and decoding are the ones training and evaluation use
(``models/train.py``, ``models/evaluate.py``), so served answers behave like the
measured ones. Models load once per process (``Generator.get``).
"""

from __future__ import annotations

import threading
from functools import cache

import numpy as np
import torch

MODES = ("rag", "mac", "mac+rag")
MAX_NEW_TOKENS = 24  # answers are short spans


class Generator:
    def __init__(self, amortizer: str) -> None:
        from knowstream.models.encoder import load_encoder
        from knowstream.models.lm import load_lm
        from knowstream.pipelines.stages.amortize import load_amortizer

        self.lm, self.tokenizer = load_lm()
        self.encoder = load_encoder()
        self.mac = load_amortizer(amortizer)
        self._lock = threading.Lock()  # one generation at a time per process (CPU-bound)

    @staticmethod
    @cache
    def get(amortizer: str) -> Generator:
        return Generator(amortizer)

    @torch.no_grad()
    def answer(self, question: str, mode: str, passages: list[str], bank: np.ndarray | None) -> str:
        from knowstream.models.evaluate import generate, passage_prompt
        from knowstream.models.train import chat_prompts, prefix_cache

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        content = question.strip()
        if mode != "mac" and passages:
            content = passage_prompt("\n\n".join(passages), content)
        prefix, P = None, 0
        if mode != "rag" and bank is not None and len(bank):
            q_states, q_mask = self.encoder.encode([question])
            entries = torch.from_numpy(np.asarray(bank, dtype=np.float32))[None]
            prefix = prefix_cache(
                self.mac, self.mac.aggregator(q_states, q_mask, entries), self.lm.dtype
            )
            P = self.mac.config.prefix_len
        with self._lock:
            prompts = chat_prompts(self.tokenizer, [content])
            return generate(self.lm, self.tokenizer, prompts, prefix, P, MAX_NEW_TOKENS)[0]
