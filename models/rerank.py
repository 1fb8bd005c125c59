"""Which banked document answers? The frozen LM's query likelihood, against MiniLM's ranking.

``mac+rag@k`` banks the entries of the top k retrieved documents, and the memory helps only
when the entry of the passage that answers is the one read (EVAL.md, seventh run). MiniLM
similarity picks it for about 70% of the questions, retrieval's ranking and the MAC
selector alike. Here the frozen SmolLM2 scores each banked document instead: the mean
log-probability of the question's tokens after the document and an instruction to write a
question about it (query likelihood, as in UPR, Sachan et al. 2022). One LM pass per
banked document; no training. A checkpoint with ``bank_select`` "lm" (the shipped one)
banks only ``best_documents``' pick, in ``evaluate`` and in serving.

    python -m knowstream.models.rerank --data ../shared/data/squad_v1.1/dev.jsonl \\
        --split validation --retrieval hits-validation.json [--n 150] [--out rerank.json]

Reports, over the split's questions: the gold document banked (top k), retrieval's first
document the gold one, and the LM's best-scored banked document the gold one.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from knowstream.models.inference import load_models
from knowstream.models.objectives import answer_nll
from knowstream.models.qa_data import load_qa, load_split, passages, select
from knowstream.models.retrieve import load_retrieval, top_docs

INSTRUCTION = "Please write a question about this passage."


@torch.no_grad()
def question_likelihood(
    lm, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8
) -> list[float]:
    """For each (document, question): the mean log-probability of the question's tokens
    after ``Passage: <document>``, the instruction and ``Question:``."""
    seqs: list[tuple[list[int], list[int]]] = []
    for doc, question in pairs:
        ctx = tokenizer(f"Passage: {doc}\n{INSTRUCTION}\nQuestion:", add_special_tokens=False)
        q = tokenizer(" " + question.strip(), add_special_tokens=False)
        seqs.append((ctx["input_ids"], q["input_ids"]))
    out: list[float] = []
    for start in range(0, len(seqs), batch_size):
        ctx_ids, q_ids = zip(*seqs[start : start + batch_size], strict=True)
        out += (-answer_nll(lm, list(ctx_ids), list(q_ids), None, 0)).tolist()
    return out


def best_documents(
    lm, tokenizer, questions: list[str], candidates: list[list[str]], texts: dict[str, str]
) -> list[str]:
    """For each question, the one of its candidate documents (ids into ``texts``) after
    which the LM finds the question likeliest."""
    pairs = [(texts[d], q) for q, docs in zip(questions, candidates, strict=True) for d in docs]
    scores = iter(question_likelihood(lm, tokenizer, pairs, batch_size=24))
    best = []
    for docs in candidates:
        s = [next(scores) for _ in docs]
        best.append(docs[max(range(len(docs)), key=s.__getitem__)])
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="SQuAD-format JSONL (.gz ok)")
    p.add_argument("--split-file", default="data/splits/squad_v1.1.json")
    p.add_argument("--split", default="validation", choices=["train", "validation", "eval"])
    p.add_argument("--retrieval", required=True, help="file of models/retrieve.py for the split")
    p.add_argument("--k", type=int, default=3, help="documents banked, as mac+rag@k")
    p.add_argument("--n", type=int, default=0, help="questions (seeded sample; 0 = all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the result JSON here")
    a = p.parse_args()
    for f in (a.data, a.split_file, a.retrieval):
        if not Path(f).exists():
            p.error(f"no such file: {f}")
    every = select(load_qa(a.data), load_split(a.split_file)[a.split])
    texts = passages(every)
    records = list(every)
    random.Random(0).shuffle(records)
    records = records[: a.n or None]
    hits = load_retrieval(a.retrieval)
    missing = [r.question_id for r in records if r.question_id not in hits]
    if missing:
        p.error(f"{a.retrieval} has no hits for {len(missing)} of the questions, e.g. {missing[0]}")
    lm, tokenizer, _ = load_models(a.device, encoder=False)
    banked = first = picked = 0
    t0 = time.time()
    for i, r in enumerate(records, 1):
        docs = top_docs(hits[r.question_id], a.k)
        if r.doc_id in docs:
            banked += 1
            first += docs[0] == r.doc_id
            picked += best_documents(lm, tokenizer, [r.question], [docs], texts)[0] == r.doc_id
        if i % 50 == 0 or i == len(records):
            rate = i / (time.time() - t0)
            eta = (len(records) - i) / rate
            print(f"{i}/{len(records)} questions, {rate:.1f}/s, ETA {eta:.0f} s", flush=True)
    n = len(records)
    result = {
        "split": a.split,
        "n": n,
        "k": a.k,
        "device": torch.cuda.get_device_name(0) if lm.device.type == "cuda" else "cpu",
        "gold_banked": banked / n,
        "retrieval_top1": first / n,
        "lm_top1": picked / n,
    }
    print(f"| {a.split}, n = {n}, k = {a.k} | share of the questions |")
    print("|---|---|")
    print(f"| gold document banked | {banked / n:.1%} |")
    print(f"| retrieval's first document is the gold one | {first / n:.1%} |")
    print(f"| the LM's best-scored banked document is the gold one | {picked / n:.1%} |")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
