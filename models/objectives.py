"""The objective pieces shared by training (models/train.py) and rung 0
(models/rung0.py): answer tokens, the LM's logits where each answer token is
predicted (after an optional prefix cache), per-question means, answer NLL, and
the token-level KL of context distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from knowstream.models.lm import with_cache


def answer_ids(tokenizer, answers: list[str], max_tokens: int) -> list[list[int]]:
    """Answer tokens + EOS (``<|im_end|>`` for SmolLM2-Instruct), cut to ``max_tokens``."""
    ids = tokenizer([" ".join(a.split()) for a in answers], add_special_tokens=False)["input_ids"]
    return [(x + [tokenizer.eos_token_id])[:max_tokens] for x in ids]


def answer_logits(
    lm,
    prompts: list[list[int]],
    answers: list[list[int]],
    cache: DynamicCache | None,
    P: int,
    prefix_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Logits (n_tok, V) where each answer token is predicted, their targets (n_tok,) and
    the question each belongs to (n_tok,), in batch-then-position order: equal answers
    give aligned rows whatever the prompts. Right-padded; the prompt sits at positions
    P, P+1, ... after a prefix of length P, as in ``answer``; the cache may hold more
    tokens than P (concatenated entries), ``prefix_mask`` (B, cache length) its real ones."""
    dev = lm.device
    seqs = [p + a for p, a in zip(prompts, answers, strict=True)]
    B, L = len(seqs), max(len(s) for s in seqs)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    target = torch.full((B, L), -100, dtype=torch.long)  # target[i, t]: token predicted at t
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        s = p + a
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        target[i, len(p) - 1 : len(s) - 1] = torch.tensor(a)
    ids, mask, target = ids.to(dev), mask.to(dev), target.to(dev)
    C = cache.get_seq_length() if cache is not None else 0
    real = torch.ones(B, C, dtype=torch.long, device=dev) if prefix_mask is None else prefix_mask
    full_mask = torch.cat([real.long().to(dev), mask], 1)
    pos = (P + torch.arange(L, device=dev)).expand(B, L)
    h = lm.model(
        input_ids=ids, attention_mask=full_mask, position_ids=pos, **with_cache(lm.model, cache)
    ).last_hidden_state
    sel = target != -100
    return lm.lm_head(h[sel]).float(), target[sel], sel.nonzero()[:, 0]


def per_question(tok_values: Tensor, rows: Tensor, B: int) -> Tensor:
    """Mean over each question's answer tokens: (n_tok,) -> (B,)."""
    total = torch.zeros(B, device=tok_values.device).index_add_(0, rows, tok_values)
    count = torch.zeros(B, device=tok_values.device).index_add_(
        0, rows, torch.ones_like(tok_values)
    )
    return total / count.clamp(min=1)


def answer_nll(
    lm,
    prompts: list[list[int]],
    answers: list[list[int]],
    cache: DynamicCache | None,
    P: int,
    prefix_mask: Tensor | None = None,
) -> Tensor:
    """Per-question mean NLL of the answer tokens after prompt (and prefix of length P)."""
    logits, target, rows = answer_logits(lm, prompts, answers, cache, P, prefix_mask)
    return per_question(F.cross_entropy(logits, target, reduction="none"), rows, len(prompts))


def kl_per_token(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(teacher || student) over the vocabulary at each position: (n_tok, V) -> (n_tok,)."""
    t = F.log_softmax(teacher_logits, -1)
    s = F.log_softmax(student_logits, -1)
    return (t.exp() * (t - s)).sum(-1)
