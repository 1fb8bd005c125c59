"""Evaluate the frozen LM with and without MAC on held-out SQuAD articles.

Official SQuAD v1.1 EM/F1 (normalization of the official evaluate-v1.1.py:
lower case, drop punctuation, drop the articles a/an/the, collapse white space;
max over the reference answers). Greedy decoding, ``max_new_tokens`` tokens.

Modes (each a row with n and a 95% bootstrap interval):

* ``closed_book``: the question alone in the chat template.
* ``gold_passage``: the gold passage and the question in the prompt.
* ``mac_gold``: the question alone, prefix from MAC with the gold passage's entry only.
* ``mac_wrong``: the control: the same, with the entry of a random *other* passage
  (seeded; another article's whenever there is one). ``mac_gold - mac_wrong`` is
  reported with a paired bootstrap interval.

Command (as used for EVAL.md):

    python -m knowstream.models.evaluate --data DATA/squad_v1.1_dev.jsonl.gz \
        --split-file data/splits/squad_v1.1.json --split eval \
        --checkpoint models/checkpoints/mac-squad --out results.json
"""

from __future__ import annotations

import knowstream.settings  # noqa: F401  sets HF_HUB_OFFLINE before transformers is imported

# isort: split
import argparse
import json
import random
import re
import string
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from knowstream.models.qa_data import QA, load_qa, load_split, select
from knowstream.models.train import chat_prompts, load_models, prefix_cache

MODES = ("closed_book", "gold_passage", "mac_gold", "mac_wrong")


# ----------------------------------------------------------------------------- SQuAD metrics


def normalize_answer(s: str) -> str:
    """Official SQuAD v1.1 normalization."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, ground_truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def squad_scores(prediction: str, answers: list[str] | tuple[str, ...]) -> tuple[float, float]:
    """(EM, F1) in [0, 1], max over the reference answers."""
    return (
        max(exact_match(prediction, a) for a in answers),
        max(f1_score(prediction, a) for a in answers),
    )


def bootstrap_ci(x: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``x`` (paired: pass differences)."""
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# ----------------------------------------------------------------------------- generation


def passage_prompt(passage: str, question: str) -> str:
    return (
        "Answer the question with a short span copied from the passage.\n\n"
        f"Passage: {passage}\n\nQuestion: {question}"
    )


@torch.no_grad()
def generate(
    lm, tokenizer, prompts: list[list[int]], cache=None, P: int = 0, max_new_tokens: int = 24
) -> list[str]:
    """Greedy continuations of left-padded prompts after an optional prefix cache of
    length P (the prompt at positions P, P+1, ... as in training)."""
    dev = lm.device
    B, L = len(prompts), max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((B, L), pad, dtype=torch.long)
    mask = torch.zeros(B, P + L, dtype=torch.long)
    mask[:, :P] = 1
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p)
        mask[i, P + L - len(p) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(1) - 1).clamp(min=0)[:, P:]
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache()
    out = []
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(max_new_tokens):
        logits = lm(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache
        ).logits[:, -1]
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, tokenizer.eos_token_id), nxt)
        out.append(nxt)
        done |= nxt == tokenizer.eos_token_id
        if bool(done.all()):
            break
        ids = nxt[:, None]
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], 1)
    toks = torch.stack(out, 1).tolist()
    texts = []
    for t in toks:
        if tokenizer.eos_token_id in t:
            t = t[: t.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(t, skip_special_tokens=True).strip())
    return texts


def wrong_passages(records: list[QA], seed: int) -> list[str]:
    """For each question, the doc_id of a random other passage, from another
    article when the set has more than one."""
    rng = random.Random(seed)
    docs: dict[str, str] = {}
    for r in records:
        docs.setdefault(r.doc_id, r.title)
    ids = list(docs)
    out = []
    for r in records:
        others = [d for d in ids if docs[d] != r.title] or [d for d in ids if d != r.doc_id]
        out.append(rng.choice(others))
    return out


@torch.no_grad()
def run_mode(
    mode, records, lm, tokenizer, encoder, mac, batch_size, max_new_tokens, seed
) -> list[str]:
    texts = {r.doc_id: r.text for r in records}
    wrong = wrong_passages(records, seed) if mode == "mac_wrong" else None
    preds: list[str] = []
    use_amp = lm.device.type == "cuda"
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        if mode == "gold_passage":
            prompts = chat_prompts(tokenizer, [passage_prompt(r.text, r.question) for r in batch])
        else:
            prompts = chat_prompts(tokenizer, [r.question for r in batch])
        cache, P = None, 0
        if mode in ("mac_gold", "mac_wrong"):
            doc_ids = (
                [r.doc_id for r in batch]
                if mode == "mac_gold"
                else wrong[start : start + len(batch)]
            )
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                entries = mac.amortizer.amortize_texts(encoder, [texts[d] for d in doc_ids])
                q_states, q_mask = encoder.encode([r.question for r in batch])
                summary = mac.aggregator(q_states, q_mask, entries[:, None])
                cache = prefix_cache(mac, summary, lm.dtype)
            P = mac.config.prefix_len
        preds += generate(lm, tokenizer, prompts, cache, P, max_new_tokens)
    return preds


def evaluate(
    data_path: str | Path,
    checkpoint: str | Path | None,
    modes: tuple[str, ...] | list[str] = MODES,
    n: int | None = None,
    split_path: str | Path = "data/splits/squad_v1.1.json",
    split: str = "eval",
    device: str | None = None,
    lm_cache: str = "",
    batch_size: int = 128,
    max_new_tokens: int = 24,
    seed: int = 0,
    models=None,
) -> dict:
    """EM/F1 (percent) with 95% bootstrap intervals for each mode on the questions
    of ``split``'s articles (the first ``n`` after a seeded shuffle, all if None).
    ``models`` may pass preloaded ``(lm, tokenizer, encoder)``."""
    from knowstream.models.mac import MAC

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    records = select(load_qa(data_path), load_split(split_path)[split])
    random.Random(seed).shuffle(records)
    if n:
        records = records[:n]
    lm, tokenizer, encoder = models or load_models(device, lm_cache)
    needs_mac = any(m.startswith("mac") for m in modes)
    if needs_mac and checkpoint is None:
        raise ValueError("MAC modes need a checkpoint")
    mac = MAC.load(checkpoint, device) if needs_mac else None
    result: dict = {
        "split": split,
        "n": len(records),
        "n_articles": len({r.title for r in records}),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "mac_version": mac.version if mac else None,
        "device": torch.cuda.get_device_name(0) if lm.device.type == "cuda" else "cpu",
        "rows": {},
        "examples": {},
    }
    per_q = {}
    for mode in modes:
        t0 = time.time()
        preds = run_mode(
            mode, records, lm, tokenizer, encoder, mac, batch_size, max_new_tokens, seed
        )
        scores = np.array([squad_scores(p, r.answers) for p, r in zip(preds, records, strict=True)])
        em, f1 = scores[:, 0] * 100, scores[:, 1] * 100
        per_q[mode] = f1
        result["rows"][mode] = {
            "n": len(records),
            "em": float(em.mean()),
            "em_ci": bootstrap_ci(em, seed=seed),
            "f1": float(f1.mean()),
            "f1_ci": bootstrap_ci(f1, seed=seed),
            "seconds": round(time.time() - t0, 1),
        }
        result["examples"][mode] = [
            {"q": r.question, "gold": r.answers[0], "pred": p}
            for p, r in zip(preds[:5], records[:5], strict=True)
        ]
    if "mac_gold" in per_q and "mac_wrong" in per_q:
        d = per_q["mac_gold"] - per_q["mac_wrong"]
        result["mac_gold_minus_wrong_f1"] = {
            "mean": float(d.mean()),
            "ci": bootstrap_ci(d, seed=seed),
        }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description="SQuAD EM/F1 of the frozen LM with and without MAC")
    p.add_argument("--data", required=True, help="SQuAD-format JSONL (.gz ok)")
    p.add_argument("--checkpoint", default=None, help="MAC checkpoint folder (for mac_* modes)")
    p.add_argument("--split-file", default="data/splits/squad_v1.1.json")
    p.add_argument("--split", default="eval", choices=["train", "validation", "eval"])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--n", type=int, default=0, help="questions (0 = all of the split)")
    p.add_argument("--device", default=None)
    p.add_argument("--lm-cache", default="")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default=None, help="write the result JSON here")
    a = p.parse_args()
    res = evaluate(
        a.data,
        a.checkpoint,
        a.modes.split(","),
        a.n or None,
        a.split_file,
        a.split,
        a.device,
        a.lm_cache,
        a.batch_size,
    )
    text = json.dumps(res, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}, indent=1))


if __name__ == "__main__":
    main()
