"""Evaluate the frozen LM with and without MAC on held-out SQuAD articles.

Official SQuAD v1.1 EM/F1 (normalization of the official evaluate-v1.1.py:
lower case, drop punctuation, drop the articles a/an/the, collapse white space;
max over the reference answers). Greedy decoding, ``max_new_tokens`` tokens.

Modes (each a row with n and a 95% bootstrap interval); ``@k`` modes read the
top-k retrieval hits of ``models/retrieve.py`` (pipeline chunker + embedder):

* ``closed_book``: the question alone in the chat template.
* ``gold_passage``: the gold passage and the question in the prompt (upper bound).
* ``rag@k``: the top-k retrieved chunks and the question in the prompt.
* ``mac_gold``: the question alone, prefix from MAC with the gold passage's entry only.
* ``mac@k``: the question alone, prefix aggregated over the entries of the top-k
  retrieved documents (k distinct documents).
* ``mac+rag@k``: both: retrieved chunks in the prompt and the MAC prefix.
* ``mac+rag_gold@k``: a diagnostic: the retrieved chunks of ``rag@k``, the gold passage's
  entry alone (what a selector that always picks the right entry would give).
* ``task_closed_book`` / ``task_gold_passage`` / ``task_rag@k``: the same as the
  modes without ``task_``, after the checkpoint's shared task prompt (its
  ``task_len`` learned prefix tokens; the MAC modes always include it). These are
  the fair baselines: the same format help as the MAC modes, no memory.
* Controls: ``mac_wrong`` / ``mac_wrong@k`` / ``mac+rag_wrong@k`` are the same
  with the entries of 1 / k random *other* passages (seeded; other articles'
  whenever there are enough). Every MAC mode minus its control, and MAC+RAG
  minus RAG, is reported as a paired bootstrap interval (``paired_f1``).
* ``--bank-select lm``: the @k modes' banks (and their controls') hold one entry, of the
  document after which the frozen LM finds the question likeliest (``models/rerank.py``),
  instead of every top-k document's.
* Retention (``--retention-modes``): F1 on the questions about the first 10% of
  the documents streamed (file order), with 10%, 50% and 100% of them in memory.

Command (as used for EVAL.md):

    python -m knowstream.models.retrieve --data DATA/dev.jsonl --split eval --out hits.json
    python -m knowstream.models.evaluate --data DATA/dev.jsonl \
        --split-file data/splits/squad_v1.1.json --split eval --retrieval hits.json \
        --retention-modes rag@5,mac@5,mac_wrong@5 \
        --checkpoint models/checkpoints/mac-lm-squad --out results.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from knowstream.models.inference import (
    chat_prompts,
    generate,
    load_models,
    memory_mask,
    passage_prompt,
    prefix_cache,
    task_cache,
)
from knowstream.models.mac import MAC
from knowstream.models.qa_data import QA, load_qa, load_split, passages, select
from knowstream.models.rerank import best_documents
from knowstream.models.retrieve import coverage, load_retrieval, ranked_hits, retrieve, top_docs

BASE_MODES = (
    "closed_book",
    "gold_passage",
    "mac_gold",
    "mac_wrong",
    "rag",
    "mac",
    "mac+rag",
    "mac+rag_wrong",
    "mac+rag_gold",
    "task_closed_book",
    "task_gold_passage",
    "task_rag",
)
RETRIEVAL_MODES = (
    "rag",
    "mac",
    "mac+rag",
    "mac+rag_wrong",
    "mac+rag_gold",
    "task_rag",
)  # need @k; mac_wrong takes it too
RETENTION_FRACTIONS = (0.1, 0.5, 1.0)  # of the stream in memory
# mode -> its wrong-passage control (at the same k)
CONTROL = {
    "mac_gold": "mac_wrong",
    "mac": "mac_wrong",
    "mac+rag": "mac+rag_wrong",
    "mac+rag_gold": "mac+rag_wrong",
}
MODES = (  # the rows of EVAL.md, each MAC row next to its control
    "closed_book",
    "gold_passage",
    "task_closed_book",
    "task_gold_passage",
    "mac_gold",
    "mac_wrong",
    *(f"rag@{k}" for k in (1, 3, 5)),
    *(f"task_rag@{k}" for k in (1, 3, 5)),
    *(m for k in (1, 3, 5, 10) for m in (f"mac@{k}", f"mac_wrong@{k}")),
    *(m for k in (1, 3, 5) for m in (f"mac+rag@{k}", f"mac+rag_wrong@{k}")),
)
RETENTION_MODES = ("rag@5", "mac@5", "mac_wrong@5")


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


def wrong_passages(records: list[QA], seed: int, k: int = 1, pool: list[str] | None = None):
    """For each question, ``k`` distinct random other passages (doc ids), from other
    articles whenever there are enough, drawn from ``pool`` (default: the records')."""
    rng = random.Random(seed)
    title = {r.doc_id: r.title for r in records}
    ids = pool if pool is not None else list(title)
    out = []
    for r in records:
        others = [d for d in ids if title.get(d) != r.title]
        if len(others) < k:
            others = [d for d in ids if d != r.doc_id]
        out.append(rng.sample(others, min(k, len(others))))
    return out


def parse_mode(mode: str) -> tuple[str, int]:
    """``"mac@5"`` -> ("mac", 5); ``"closed_book"`` -> ("closed_book", 0)."""
    name, _, k = mode.partition("@")
    ok = (
        name in BASE_MODES
        and (name == "mac_wrong" or bool(k) == (name in RETRIEVAL_MODES))
        and (not k or (k.isdigit() and int(k) > 0))
    )
    if not ok:
        raise ValueError(f"unknown mode {mode!r}: one of {BASE_MODES}, @k for {RETRIEVAL_MODES}")
    return name, int(k or 0)


class Context:
    """Everything the modes share: models, the amortized entries of every passage
    of the split (computed once), and the retrieval hits of every question."""

    def __init__(self, records, lm, tokenizer, encoder, mac, retrieval, batch_size, seed):
        self.lm, self.tokenizer, self.encoder, self.mac = lm, tokenizer, encoder, mac
        self.retrieval, self.batch_size, self.seed = retrieval, batch_size, seed
        self.bank_select = "all"  # or "lm": bank the LM's best-scored document only
        self.on_batch: Callable[[str, int, int], None] | None = None  # (mode, done, total)
        self.texts = passages(records)
        self.entries: dict[str, torch.Tensor] = {}
        if mac is not None:
            mac.bind_lm(lm, tokenizer)
            ids = list(self.texts)
            with torch.no_grad(), self.autocast():
                for i in range(0, len(ids), 64):
                    chunk = ids[i : i + 64]
                    e = mac.amortizer.amortize_texts(encoder, [self.texts[d] for d in chunk])
                    self.entries.update(zip(chunk, e.float(), strict=True))

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.lm.device.type == "cuda")

    def hits(self, r: QA, allowed: set[str] | None) -> list[tuple[str, str]]:
        if self.retrieval is None:
            raise ValueError("retrieval modes need --retrieval FILE (models/retrieve.py)")
        return [h for h in self.retrieval[r.question_id] if allowed is None or h[0] in allowed]

    def bank(self, doc_ids: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries (B, N, T, d) of each question's docs, padded to the longest list, + mask."""
        T, d = self.mac.config.entry_shape
        N = max(1, max(len(x) for x in doc_ids))
        bank = torch.zeros(len(doc_ids), N, T, d, device=self.lm.device)
        mask = torch.zeros(len(doc_ids), N, dtype=torch.bool, device=self.lm.device)
        for i, docs in enumerate(doc_ids):
            for j, doc in enumerate(docs):
                bank[i, j], mask[i, j] = self.entries[doc], True
        return bank, mask


@torch.no_grad()
def run_mode(
    mode: str, records: list[QA], ctx: Context, max_new_tokens: int, allowed: set[str] | None = None
) -> list[str]:
    """Predictions of ``mode`` for ``records``; ``allowed`` limits retrieval and the
    control's passages to the documents in memory (retention runs)."""
    name, k = parse_mode(mode)
    task = name.startswith("task_")
    name = name.removeprefix("task_")
    wrong: list[list[str]] = []
    if name in ("mac_wrong", "mac+rag_wrong"):
        pool = sorted(allowed) if allowed is not None else None
        wrong = wrong_passages(records, ctx.seed, max(k, 1), pool)
    preds: list[str] = []
    if ctx.on_batch:
        ctx.on_batch(mode, 0, len(records))
    for start in range(0, len(records), ctx.batch_size):
        batch = records[start : start + ctx.batch_size]
        if name == "gold_passage":
            contents = [passage_prompt(r.text, r.question) for r in batch]
        elif name in ("rag", "mac+rag", "mac+rag_wrong", "mac+rag_gold"):
            contents = [
                passage_prompt("\n\n".join(t for _, t in ctx.hits(r, allowed)[:k]), r.question)
                for r in batch
            ]
        else:
            contents = [r.question for r in batch]
        prompts = chat_prompts(ctx.tokenizer, contents)
        cache, P, real = None, 0, None
        if task:
            cache, P = task_cache(ctx.mac, len(batch), ctx.lm.dtype)
        if name.startswith("mac"):
            if name in ("mac_gold", "mac+rag_gold"):
                docs = [[r.doc_id] for r in batch]
            elif name in ("mac", "mac+rag"):
                docs = [top_docs(ctx.hits(r, allowed), k) for r in batch]
            else:
                docs = wrong[start : start + len(batch)]
            if ctx.bank_select == "lm" and name not in ("mac_gold", "mac+rag_gold"):
                questions = [r.question for r in batch]
                docs = [
                    [d] for d in best_documents(ctx.lm, ctx.tokenizer, questions, docs, ctx.texts)
                ]
            with ctx.autocast():
                bank, mask = ctx.bank(docs)
                q_states, q_mask = ctx.encoder.encode([r.question for r in batch])
                summary = ctx.mac.aggregator(q_states, q_mask, bank, mask)
                cache = prefix_cache(ctx.mac, summary, ctx.lm.dtype)
            P, real = ctx.mac.config.prefix_len, memory_mask(ctx.mac, mask)
        preds += generate(
            ctx.lm, ctx.tokenizer, prompts, cache, P, max_new_tokens, prefix_mask=real
        )
        if ctx.on_batch:
            ctx.on_batch(mode, len(preds), len(records))
    return preds


def score(preds: list[str], records: list[QA], seed: int) -> tuple[dict, np.ndarray]:
    """The row of one mode (n, EM and F1 in percent with intervals) and per-question F1."""
    scores = np.array([squad_scores(p, r.answers) for p, r in zip(preds, records, strict=True)])
    em, f1 = scores[:, 0] * 100, scores[:, 1] * 100
    row = {
        "n": len(records),
        "em": float(em.mean()),
        "em_ci": bootstrap_ci(em, seed=seed),
        "f1": float(f1.mean()),
        "f1_ci": bootstrap_ci(f1, seed=seed),
    }
    return row, f1


def paired(a: np.ndarray, b: np.ndarray, seed: int) -> dict:
    d = a - b
    return {"mean": float(d.mean()), "ci": bootstrap_ci(d, seed=seed)}


def comparisons(per_q: dict[str, np.ndarray], seed: int) -> dict[str, dict]:
    """Paired F1 differences: every MAC mode minus its control, MAC+RAG minus RAG."""
    out = {}
    for mode in per_q:
        name, k = parse_mode(mode)
        at = f"@{k}" if k else ""
        if name in CONTROL and (ref := CONTROL[name] + at) in per_q:
            out[f"{mode} - {ref}"] = paired(per_q[mode], per_q[ref], seed)
        for base in ("rag", "task_rag"):
            if name == "mac+rag" and f"{base}{at}" in per_q:
                out[f"{mode} - {base}{at}"] = paired(per_q[mode], per_q[f"{base}{at}"], seed)
    return out


def retention(
    stream: list[str], records: list[QA], ctx: Context, modes: list[str], max_new_tokens: int
) -> dict:
    """F1 on the questions about the first 10% of the documents streamed, with 10%,
    50% and 100% of the stream in memory (retrieval and controls see only those)."""
    first = set(stream[: max(1, round(0.1 * len(stream)))])
    qs = [r for r in records if r.doc_id in first]
    out: dict = {"n": len(qs), "n_docs_first": len(first), "rows": {}}
    for mode in modes:
        f1_by = {}
        for frac in RETENTION_FRACTIONS:
            allowed = set(stream[: max(1, round(frac * len(stream)))])
            row, _ = score(run_mode(mode, qs, ctx, max_new_tokens, allowed), qs, ctx.seed)
            f1_by[f"{frac:.0%}"] = row
        base = f1_by[f"{RETENTION_FRACTIONS[0]:.0%}"]["f1"]
        out["rows"][mode] = {
            "f1": f1_by,
            "retention": {p: (r["f1"] / base if base else None) for p, r in f1_by.items()},
        }
    return out


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
    retrieval: str | Path | None = None,
    retention_modes: tuple[str, ...] | list[str] = (),
    on_batch: Callable[[str, int, int], None] | None = None,
    keep_predictions: bool = False,
    select_top: int | None = None,
    bank_mode: str | None = None,
    bank_select: str | None = None,
) -> dict:
    """EM/F1 (percent) with 95% bootstrap intervals for each mode on the questions
    of ``split``'s articles (the first ``n`` after a seeded shuffle, all if None).
    ``models`` may pass preloaded ``(lm, tokenizer, encoder)``; ``retrieval`` is a
    file of ``models/retrieve.py`` for the @k modes (computed here when not given).
    ``keep_predictions`` adds every answer: ``predictions[mode][question_id]``;
    ``select_top``, ``bank_mode`` and ``bank_select`` override the checkpoint's
    ``MACConfig`` fields (``bank_select`` "lm": bank only the LM's best-scored document)."""
    for mode in [*modes, *retention_modes]:
        parse_mode(mode)  # fail before loading anything
    if bank_select not in (None, "all", "lm"):
        raise ValueError(f"bank_select must be all or lm, not {bank_select!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    records = select(load_qa(data_path), load_split(split_path)[split])
    stream = list(passages(records))  # file order: the order documents are streamed in
    everything = list(records)  # every passage of the split is in memory and retrievable
    random.Random(seed).shuffle(records)
    if n:
        records = records[:n]
    lm, tokenizer, encoder = models or load_models(device, lm_cache)
    needs_mac = any(m.startswith(("mac", "task_")) for m in [*modes, *retention_modes])
    if needs_mac and checkpoint is None:
        raise ValueError("MAC modes need a checkpoint")
    mac = MAC.load(checkpoint, device) if needs_mac and checkpoint is not None else None
    if mac is not None and (select_top is not None or bank_mode is not None):
        if mac.config.amortizer != "lm":
            raise ValueError("--select-top and --bank-mode are options of the 'lm' amortizer")
        if bank_mode not in (None, "mean", "concat"):
            raise ValueError(f"--bank-mode must be mean or concat, not {bank_mode!r}")
        mac.config.select_top = mac.config.select_top if select_top is None else select_top
        mac.config.bank_mode = bank_mode or mac.config.bank_mode
    if mac is not None and bank_select is not None:
        mac.config.bank_select = bank_select
    if mac is not None and not mac.config.task_len:  # no task prompt: no task_ rows
        modes = [m for m in modes if not m.startswith("task_")]
    hits = None
    if retrieval:
        hits = load_retrieval(retrieval)
    elif any("@" in m for m in [*modes, *retention_modes]):
        hits = ranked_hits(retrieve(everything, encoder))
    ctx = Context(everything, lm, tokenizer, encoder, mac, hits, batch_size, seed)
    ctx.on_batch = on_batch  # progress: (mode, questions answered, questions)
    ctx.bank_select = mac.config.bank_select if mac else "all"
    result: dict = {
        "split": split,
        "n": len(records),
        "n_articles": len({r.title for r in records}),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "mac_version": mac.version if mac else None,
        "select_top": mac.config.select_top if mac else None,
        "bank_mode": mac.config.bank_mode if mac else None,
        "bank_select": ctx.bank_select,
        "device": torch.cuda.get_device_name(0) if lm.device.type == "cuda" else "cpu",
        "rows": {},
        "examples": {},
    }
    if hits is not None:
        result["retrieval_hit"] = {
            f"@{k}": float(np.mean([r.doc_id in top_docs(hits[r.question_id], k) for r in records]))
            for k in (1, 3, 5, 10)
        }
        result["retrieval_coverage"] = {f"@{k}": coverage(records, hits, k) for k in (1, 3, 5)}
    per_q = {}
    for mode in modes:
        t0 = time.time()
        preds = run_mode(mode, records, ctx, max_new_tokens)
        result["rows"][mode], per_q[mode] = score(preds, records, seed)
        result["rows"][mode]["seconds"] = round(time.time() - t0, 1)
        result["examples"][mode] = [
            {"q": r.question, "gold": r.answers[0], "pred": p}
            for p, r in zip(preds[:5], records[:5], strict=True)
        ]
        if keep_predictions:
            preds_by_id = {r.question_id: p for p, r in zip(preds, records, strict=True)}
            result.setdefault("predictions", {})[mode] = preds_by_id
        _log(f"{mode:18s} F1 {result['rows'][mode]['f1']:6.2f}  ({time.time() - t0:.0f} s)")
    result["paired_f1"] = comparisons(per_q, seed)
    if retention_modes:
        result["retention"] = retention(stream, records, ctx, list(retention_modes), max_new_tokens)
    return result


def _log(msg: str) -> None:
    print(msg, flush=True)


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
    p.add_argument("--retrieval", default=None, help="file of models/retrieve.py (@k modes)")
    p.add_argument("--retention-modes", default="", help=f"e.g. {','.join(RETENTION_MODES)}")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--predictions", action="store_true", help="keep every answer in --out")
    p.add_argument("--select-top", type=int, default=None, help="entries the selector weighs")
    p.add_argument("--bank-mode", default=None, choices=["mean", "concat"])
    p.add_argument(
        "--bank-select", default=None, choices=["all", "lm"], help="default: the checkpoint's"
    )
    a = p.parse_args()
    for mode in [*a.modes.split(","), *filter(None, a.retention_modes.split(","))]:
        try:
            parse_mode(mode)
        except ValueError as e:
            p.error(str(e))
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
        retrieval=a.retrieval,
        retention_modes=[m for m in a.retention_modes.split(",") if m],
        keep_predictions=a.predictions,
        select_top=a.select_top,
        bank_mode=a.bank_mode,
        bank_select=a.bank_select,
    )
    text = json.dumps(res, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(
        json.dumps({k: v for k, v in res.items() if k not in ("examples", "predictions")}, indent=1)
    )


if __name__ == "__main__":
    main()
