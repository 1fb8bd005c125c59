"""Answers from the frozen LM: from retrieved text (RAG), from the memory (MAC), or both.

    mode "rag":     question + top-k retrieved chunks in the prompt
    mode "mac":     question only; the retrieved documents' memory entries,
                    aggregated for the question, enter as prefix key/values
    mode "mac+rag": both

Models load once per process (``Generator.get``). Generation is greedy with a
short budget: SQuAD-style answers are a few words.
"""

from __future__ import annotations

import threading
from functools import cache

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

MODES = ("rag", "mac", "mac+rag")
MAX_NEW_TOKENS = 24  # answers are short spans
SYSTEM = "Answer the question with a short phrase taken from the context when there is one."


class Generator:
    def __init__(self, amortizer: str) -> None:
        from knowstream.models.encoder import load_encoder
        from knowstream.models.lm import load_lm
        from knowstream.pipelines.stages.amortize import load_amortizer

        self.lm, self.tokenizer = load_lm()
        self.encoder = load_encoder()
        self.mac = load_amortizer(amortizer)
        self.mac_version = self.mac.version
        self._lock = threading.Lock()  # one generation at a time per process (CPU-bound)

    @staticmethod
    @cache
    def get(amortizer: str) -> Generator:
        return Generator(amortizer)

    def _prompt(self, question: str, passages: list[str]) -> torch.Tensor:
        content = question.strip()
        if passages:
            context = "\n\n".join(passages)
            content = f"Context:\n{context}\n\nQuestion: {content}"
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]
        out = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt"
        )
        return out["input_ids"] if hasattr(out, "keys") else out

    @torch.no_grad()
    def answer(self, question: str, mode: str, passages: list[str], bank: np.ndarray | None) -> str:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        input_ids = self._prompt(question, passages if mode != "mac" else [])
        kwargs: dict = {}
        prefix = 0
        if mode in ("mac", "mac+rag") and bank is not None and len(bank):
            q_states, q_mask = self.encoder.encode([question])
            entries = torch.from_numpy(np.asarray(bank, dtype=np.float32))[None]
            summary = self.mac.aggregator(q_states, q_mask, entries)
            pairs = self.mac.expansion.key_values(summary)
            kwargs["cache"] = DynamicCache(
                [(k.to(self.lm.dtype), v.to(self.lm.dtype)) for k, v in pairs]
            )
            prefix = self.mac.config.prefix_len
        mask = torch.ones(1, prefix + input_ids.shape[1], dtype=torch.long)
        with self._lock:
            out = self.lm.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                **kwargs,
            )
        return self.tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
