"""Rung 0 of the diagnostic ladder: the ceiling for a memory prefix of MAC's shape.

One *free* key/value prefix per passage (``--prefix-len`` tokens per LM layer, no
amortizer), trained by context distillation on the LM's own questions about the
passage (``models/selfqa.py``): KL(LM with the passage in its prompt || LM with
the prefix and the question alone) at the teacher's answer tokens. The passages'
real SQuAD questions are never seen in training. Evaluation on those questions:
F1 with the own prefix, with another passage's prefix (control), with none, and
with the passage in the prompt; all after the checkpoint's shared task prompt
when ``--checkpoint`` has one, as in the MAC modes.

    python -m knowstream.models.rung0 --data dev.jsonl --split-file data/splits/squad_v1.1.json \
        --split eval --selfqa selfqa-eval.jsonl.gz --n-docs 64 [--checkpoint CKPT] --out rung0.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import DynamicCache

from knowstream.models.evaluate import paired, score
from knowstream.models.inference import (
    chat_prompts,
    generate,
    load_models,
    passage_prompt,
    task_cache,
)
from knowstream.models.mac import MAC
from knowstream.models.objectives import answer_ids, answer_logits, kl_per_token
from knowstream.models.qa_data import load_qa, load_split, select


def cache_of(task, prefixes: torch.Tensor, dtype) -> DynamicCache:
    """Task prompt pairs (or None) + per-question prefixes (B, L, 2, heads, P, hd)."""
    pairs = []
    for layer in range(prefixes.shape[1]):
        k, v = prefixes[:, layer, 0].to(dtype), prefixes[:, layer, 1].to(dtype)
        if task is not None:
            tk, tv = task.layers[layer].keys, task.layers[layer].values
            k, v = torch.cat([tk, k], 2), torch.cat([tv, v], 2)
        pairs.append((k, v))
    return DynamicCache(pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split-file", default="data/splits/squad_v1.1.json")
    p.add_argument("--split", default="eval")
    p.add_argument("--selfqa", required=True, help="self-QA records of the split's passages")
    p.add_argument("--n-docs", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=2)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--checkpoint", default=None, help="MAC checkpoint: its task prompt is used")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(a.seed)
    lm, tok, _ = load_models(device, encoder=False)
    mac = MAC.load(a.checkpoint, device) if a.checkpoint else None
    selfqa = defaultdict(list)
    for r in load_qa(a.selfqa):
        selfqa[r.doc_id].append(r)
    records = select(load_qa(a.data), load_split(a.split_file)[a.split])
    docs = sorted({r.doc_id for r in records} & set(selfqa))
    docs = random.Random(a.seed).sample(docs, min(a.n_docs, len(docs)))
    index = {d: i for i, d in enumerate(docs)}
    train = [r for d in docs for r in selfqa[d]]
    evalq = [r for r in records if r.doc_id in index]
    cfg = lm.config
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or hd
    prefixes = torch.nn.Parameter(
        torch.randn(len(docs), cfg.num_hidden_layers, 2, kv, a.prefix_len, hd, device=device) * 0.02
    )
    opt = torch.optim.Adam([prefixes], lr=a.lr)
    s_prompts = chat_prompts(tok, [r.question for r in train])
    t_prompts = chat_prompts(tok, [passage_prompt(r.text, r.question) for r in train])
    answers = answer_ids(tok, [r.answers[0] for r in train], 24)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=lm.device.type == "cuda")
    P_task = mac.config.task_len if mac is not None else 0
    rng = random.Random(a.seed)
    curve = []
    t0 = time.time()
    for step in range(a.steps):
        idx = rng.sample(range(len(train)), min(a.batch, len(train)))
        with amp:
            with torch.no_grad():
                task, _ = task_cache(mac, len(idx), lm.dtype)
                t_logits, _, _ = answer_logits(
                    lm, [t_prompts[i] for i in idx], [answers[i] for i in idx], task, P_task
                )
            task, _ = task_cache(mac, len(idx), lm.dtype)
            own = prefixes[torch.tensor([index[train[i].doc_id] for i in idx], device=device)]
            cache = cache_of(task, own, lm.dtype)
            s_logits, _, _ = answer_logits(
                lm, [s_prompts[i] for i in idx], [answers[i] for i in idx], cache,
                P_task + a.prefix_len,
            )  # fmt: skip
            loss = kl_per_token(t_logits, s_logits).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == a.steps - 1:
            curve.append({"step": step, "kd": float(loss), "elapsed_s": round(time.time() - t0, 1)})
            print(json.dumps(curve[-1]), flush=True)
    # Evaluation on the passages' real questions.
    n = len(docs)
    preds: dict[str, list[str]] = {m: [] for m in ("none", "own", "wrong", "passage")}
    with torch.no_grad(), amp:
        for start in range(0, len(evalq), 128):
            batch = evalq[start : start + 128]
            q_prompts = chat_prompts(tok, [r.question for r in batch])
            p_prompts = chat_prompts(tok, [passage_prompt(r.text, r.question) for r in batch])
            for mode in preds:
                task, _ = task_cache(mac, len(batch), lm.dtype)
                if mode in ("none", "passage"):
                    prompts = p_prompts if mode == "passage" else q_prompts
                    preds[mode] += generate(lm, tok, prompts, task, P_task)
                    continue
                shift = 0 if mode == "own" else n // 2
                rows = [(index[r.doc_id] + shift) % n for r in batch]
                cache = cache_of(task, prefixes[torch.tensor(rows, device=device)], lm.dtype)
                preds[mode] += generate(lm, tok, q_prompts, cache, P_task + a.prefix_len)
    result = {
        "n_docs": n,
        "n_train_selfqa": len(train),
        "n_eval_questions": len(evalq),
        "prefix_len": a.prefix_len,
        "task_prompt": bool(P_task),
        "device": torch.cuda.get_device_name(0) if lm.device.type == "cuda" else "cpu",
        "train_seconds": round(time.time() - t0, 1),
        "curve": curve,
        "rows": {},
    }
    per_q = {}
    for mode, ps in preds.items():
        result["rows"][mode], per_q[mode] = score(ps, evalq, a.seed)
    result["paired_f1"] = {
        "own - wrong": paired(per_q["own"], per_q["wrong"], a.seed),
        "own - none": paired(per_q["own"], per_q["none"], a.seed),
    }
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=1))


if __name__ == "__main__":
    main()
