"""Answers from the frozen LM: from retrieved text (RAG), from the memory (MAC), or both.

    mode "rag":     question + top-k retrieved chunks in the prompt
    mode "mac":     question only; the retrieved documents' memory entries,
                    aggregated for the question, enter as prefix key/values
    mode "mac+rag": both

An amortizer with ``bank_select`` "lm" (the shipped one) banks one entry only: that of the
retrieved document after which the frozen LM finds the question likeliest
(``models/rerank.py``), as its evaluation did.

Prompts and decoding are the ones training and evaluation use
(``models/inference.py``), so served answers behave like the measured ones.
Models load once per process (``Generator.get``).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from knowstream.errors import AmortizerMismatch

if TYPE_CHECKING:
    from knowstream.memory import Memory
    from knowstream.query import QueryResult

MODES = ("rag", "mac", "mac+rag")
MAX_NEW_TOKENS = 24  # answers are short spans


@dataclass(frozen=True)
class Bank:
    """The memory entries of the documents behind the evidence, in rank order."""

    doc_ids: list[str]
    entries: np.ndarray  # (N, T, d)


class Generator:
    """The frozen LM and encoder, loaded once per process; MAC networks per amortizer."""

    def __init__(self) -> None:
        from knowstream.models.encoder import load_encoder
        from knowstream.models.lm import load_lm

        self.lm, self.tokenizer = load_lm()
        self.encoder = load_encoder()
        self._lock = threading.Lock()  # one generation at a time per process (CPU-bound)

    @staticmethod
    @cache
    def get() -> Generator:
        return Generator()

    @torch.no_grad()
    def answer(
        self,
        question: str,
        mode: str,
        passages: list[str],
        bank: Bank | None,
        amortizer: str | None = None,
        documents: dict[str, str] | None = None,
    ) -> str:
        """``amortizer``: checkpoint folder of the MAC networks (modes mac, mac+rag);
        ``documents``: the banked documents' texts, by id, when it has ``bank_select`` "lm"."""
        from knowstream.models.inference import (
            chat_prompts,
            generate,
            load_amortizer,
            passage_prompt,
            prefix_cache,
        )
        from knowstream.models.rerank import best_documents

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        content = question.strip()
        if mode != "mac" and passages:
            content = passage_prompt("\n\n".join(passages), content)
        prefix, P = None, 0
        if mode != "rag" and bank is not None and len(bank.doc_ids):
            if amortizer is None:
                raise ValueError(f"mode {mode} needs the amortizer that built the entries")
            mac = load_amortizer(amortizer)
            rows = bank.entries
            if mac.config.bank_select == "lm" and len(bank.doc_ids) > 1:
                if documents is None:
                    raise ValueError("an amortizer with bank_select 'lm' needs the documents")
                with self._lock:
                    best = best_documents(
                        self.lm, self.tokenizer, [question], [bank.doc_ids], documents
                    )[0]
                rows = rows[[bank.doc_ids.index(best)]]
            q_states, q_mask = self.encoder.encode([question])
            entries = torch.from_numpy(np.asarray(rows, dtype=np.float32))[None]
            prefix = prefix_cache(mac, mac.aggregator(q_states, q_mask, entries), self.lm.dtype)
            P = mac.config.prefix_len
        with self._lock:
            prompts = chat_prompts(self.tokenizer, [content])
            return generate(self.lm, self.tokenizer, prompts, prefix, P, MAX_NEW_TOKENS)[0]


def retrieve(
    memory: Memory, question: str, *, version: int | None, k: int, mode: str
) -> tuple[QueryResult, Bank | None]:
    """Evidence for ``question`` from one memory version, and for the MAC modes the
    memory entries of the documents behind that evidence (the bank to aggregate)."""
    from knowstream.query import query

    result = query(memory, question, version=version, k=k)
    bank = None
    if mode in ("mac", "mac+rag"):
        doc_ids = list(dict.fromkeys(h.doc_id for h in result.hits))
        if doc_ids:
            bank = Bank(*memory.view(result.version).modulation_bank(doc_ids))
    return result, bank


@lru_cache(maxsize=256)
def amortizer_for(memory: Memory, version: int) -> str:
    """The checkpoint folder of the amortizer that built memory ``version``'s entries.

    MAC's aggregator and expansion only understand entries of the amortizer they were
    trained with, so a served version must be answered with *its* amortizer, not
    whatever ``Settings.amortizer`` says today (a backfill with a new amortizer,
    promoted, then rolled back, flips between two). The manifest's registry version
    is used when the entries came from the registry; otherwise the configured spec,
    checked against the weights hash the manifest recorded. A published version's
    manifest never changes, so the answer is cached: a request reads no registry.
    """
    from knowstream.connectors.mlflow._registry import resolve_amortizer
    from knowstream.models.inference import amortizer_version

    settings = memory.settings
    built = json.loads(memory.registry.get(version).tags.get("model_versions", "{}"))
    spec = settings.amortizer
    if "amortizer_model_version" in built:
        spec = f"models:/{built['amortizer_model']}/{built['amortizer_model_version']}"
    path = resolve_amortizer(settings, spec).path
    want, have = built.get("amortizer"), amortizer_version(path)
    if want and have != want:
        raise AmortizerMismatch(
            f"memory version {version} was amortized by {want}, but the configured amortizer "
            f"{spec!r} is {have}: set KNOWSTREAM_AMORTIZER to the checkpoint that built it"
        )
    return path


def answer(memory: Memory, result: QueryResult, bank: Bank | None, mode: str) -> str | None:
    """The LM's answer for ``mode`` (None for "evidence": retrieval only), with the
    amortizer that built the served version."""
    from knowstream.models.inference import load_amortizer

    if mode == "evidence":
        return None
    amortizer = amortizer_for(memory, result.version) if bank is not None else None
    documents = None  # read only when the LM has more than one document to pick from
    if bank is not None and amortizer is not None and len(bank.doc_ids) > 1:
        if load_amortizer(amortizer).config.bank_select == "lm":
            documents = memory.view(result.version).texts(bank.doc_ids)
    passages = [h.text for h in result.hits]
    return Generator.get().answer(result.question, mode, passages, bank, amortizer, documents)
