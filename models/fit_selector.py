"""Fit the "lm" amortizer's aggregator (``EntrySelector``) to pick the entry that answers.

``mac+rag@k`` banks the entries of the k documents retrieval returns, most of them passages
of one article. With the right entry alone, the prefix beats a wrong entry by about 3 F1;
blended with its neighbours, or with a neighbour picked in its place, much less (EVAL.md).
The selector weighs entries by a bilinear similarity of the question's and each document's
MiniLM embedding, which context distillation trains only through the answers. Here it is
trained on its own task: for every training question, cross-entropy over all passages of
its article (the hard negatives retrieval returns) toward its own passage, on frozen MiniLM
embeddings (the ones the entries' key rows hold). Nothing else of the checkpoint changes;
the result is a new checkpoint (a new version) with ``select_top`` set.

Validation is the task as served: over the banks of the validation split's retrieval file
(top ``k`` documents), how often the selector's top entry is the gold one, and the mean
weight it gives the gold entry. The epoch with the best top-entry accuracy is kept.

    python -m knowstream.models.fit_selector --checkpoint models/checkpoints/mac-lm-squad \\
        --data ../shared/data/squad_v1.1/train.jsonl.gz \\
        --val-data ../shared/data/squad_v1.1/dev.jsonl --val-split validation \\
        --val-retrieval hits-validation.json --select-top 1 --out DIR

Embedding the SQuAD train split took 8.5 minutes on this 2-core CPU; ``--cache FILE.npz``
keeps the embeddings for the next run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from knowstream.models.encoder import load_encoder
from knowstream.models.mac import MAC, EntrySelector
from knowstream.models.qa_data import QA, load_qa, load_split, passages, select
from knowstream.models.retrieve import load_retrieval, top_docs


def embeddings(records: list[QA], cache: str = "") -> tuple[list[str], np.ndarray, np.ndarray]:
    """The records' passage ids, passage embeddings (n_docs, 384) and question embeddings
    (n_records, 384), read from ``cache`` when it holds them for these records."""
    texts = passages(records)
    ids = list(texts)
    if cache and Path(cache).exists():
        z = np.load(cache)
        if list(z["doc_ids"]) == ids and len(z["Q"]) == len(records):
            return ids, z["D"], z["Q"]
    enc = load_encoder()
    t0 = time.time()
    D = enc.embed([texts[d] for d in ids], batch_size=64)
    _log(f"embedded {len(ids)} passages in {time.time() - t0:.0f} s")
    Q = enc.embed([r.question for r in records], batch_size=128)
    _log(f"embedded {len(records)} questions in {time.time() - t0:.0f} s")
    if cache:
        np.savez(cache, D=D, Q=Q, doc_ids=np.array(ids))
    return ids, D, Q


class ArticleBanks:
    """Each question's candidates: every passage of its article, own passage's index."""

    def __init__(self, records: list[QA], ids: list[str]) -> None:
        pos = {d: i for i, d in enumerate(ids)}
        by_title: dict[str, list[int]] = defaultdict(list)
        title_of = {r.doc_id: r.title for r in records}
        for d in ids:
            by_title[title_of[d]].append(pos[d])
        width = max(len(v) for v in by_title.values())
        self.cand = torch.zeros(len(records), width, dtype=torch.long)
        self.mask = torch.zeros(len(records), width, dtype=torch.bool)
        self.target = torch.zeros(len(records), dtype=torch.long)
        for i, r in enumerate(records):
            docs = by_title[r.title]
            self.cand[i, : len(docs)] = torch.tensor(docs)
            self.mask[i, : len(docs)] = True
            self.target[i] = docs.index(pos[r.doc_id])


@torch.no_grad()
def served_accuracy(
    sel: EntrySelector,
    records: list[QA],
    hits: dict,
    D: dict[str, np.ndarray],
    Q: np.ndarray,
    k: int,
) -> dict:
    """Over the served banks (top ``k`` retrieved documents), shares of all questions: the
    gold entry banked, the selector's top entry the gold one, retrieval's first document
    the gold one; and the mean weight the selector gives a banked gold entry."""
    picked = first = 0
    weights = []
    for r, q in zip(records, Q, strict=True):
        bank = top_docs(hits[r.question_id], k)
        if r.doc_id not in bank:
            continue
        keys = torch.from_numpy(np.stack([D[d] for d in bank]))[None]
        w = sel.scores(torch.from_numpy(q)[None], keys).softmax(-1)[0]
        gold = bank.index(r.doc_id)
        picked += int(w.argmax()) == gold
        first += gold == 0
        weights.append(float(w[gold]))
    n = len(records)
    return {
        "gold_banked": len(weights) / n,
        "selector_top1": picked / n,
        "retrieval_top1": first / n,
        "gold_weight": float(np.mean(weights)),
        "scale": float(sel.log_scale.exp()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help='MAC checkpoint of the "lm" amortizer')
    p.add_argument("--data", required=True, help="training questions (SQuAD-format JSONL)")
    p.add_argument("--val-data", required=True, help="SQuAD-format JSONL of the validation split")
    p.add_argument("--split-file", default="data/splits/squad_v1.1.json")
    p.add_argument("--val-split", default="validation", choices=["train", "validation"])
    p.add_argument("--val-retrieval", required=True, help="models/retrieve.py file of it")
    p.add_argument("--k", type=int, default=3, help="documents banked, as mac+rag@k")
    p.add_argument("--select-top", type=int, default=1, help="select_top of the new checkpoint")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--cache", default="", help="npz of the training embeddings (read/written)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder of the new checkpoint")
    a = p.parse_args()
    for f in (a.checkpoint, a.data, a.val_data, a.val_retrieval):
        if not Path(f).exists():
            p.error(f"no such file or folder: {f}")
    mac = MAC.load(a.checkpoint)
    if not isinstance(mac.aggregator, EntrySelector):
        p.error(f"{a.checkpoint}: not a checkpoint of the 'lm' amortizer (no EntrySelector)")
    sel, loaded = mac.aggregator, mac.version
    torch.manual_seed(a.seed)

    records = load_qa(a.data)
    ids, D, Q = embeddings(records, a.cache)
    banks = ArticleBanks(records, ids)
    val = select(load_qa(a.val_data), load_split(a.split_file)[a.val_split])
    val_ids, val_D, val_Q = embeddings(val)
    val_keys = dict(zip(val_ids, val_D, strict=True))
    hits = load_retrieval(a.val_retrieval)

    def check() -> dict:
        return served_accuracy(sel, val, hits, val_keys, val_Q, a.k)

    curve = [{"epoch": 0, **check()}]
    _log(f"epoch 0 (as loaded): {curve[0]}")
    best = curve[0]["selector_top1"]
    best_state = {k: v.clone() for k, v in sel.state_dict().items()}
    Dt, Qt = torch.from_numpy(D), torch.from_numpy(Q)
    opt = torch.optim.AdamW(sel.parameters(), lr=a.lr, weight_decay=0.0)
    sel.train()
    for epoch in range(1, a.epochs + 1):
        order = torch.randperm(len(records))
        total = 0.0
        for start in range(0, len(order), a.batch):
            b = order[start : start + a.batch]
            scores = sel.scores(Qt[b], Dt[banks.cand[b]])
            scores = scores.masked_fill(~banks.mask[b], float("-inf"))
            loss = F.cross_entropy(scores, banks.target[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        sel.eval()
        curve.append({"epoch": epoch, "train_ce": total / len(records), **check()})
        sel.train()
        _log(f"epoch {epoch}: {curve[-1]}")
        if curve[-1]["selector_top1"] > best:
            best = curve[-1]["selector_top1"]
            best_state = {k: v.clone() for k, v in sel.state_dict().items()}
    sel.load_state_dict(best_state)
    mac.config.select_top = a.select_top
    mac.eval().save(a.out)
    summary = {"from": loaded, "version": mac.version, "curve": curve}
    (Path(a.out) / "fit_selector.json").write_text(json.dumps({**vars(a), **summary}, indent=1))
    _log(f"wrote {a.out} ({mac.version}; best validation top-entry accuracy {best:.3f})")


def _log(msg: str) -> None:
    print(msg, flush=True)


if __name__ == "__main__":
    main()
