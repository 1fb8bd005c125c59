"""Zero-training probe: how much passage information can a compressed context carry
for the frozen LM? F1 with the gold passage vs a wrong one, no trained part at all.

    .venv/bin/python -m knowstream.models.probe_context DATA.jsonl 64 \
        closed,prompt,kvsel:32,inj:0:32:last,inj:12:32:last,inj:12:32:mean

Configs: ``closed`` (question only), ``prompt`` (passage in the prompt), ``kvsel:T``
(the LM's real key/values of T evenly spaced passage tokens, all layers, as prefix),
``inj:L:T:last|mean`` (the layer-L hidden states of T positions, the last token of
each of T segments or the segment mean, run through layers L..29 as a T-token
prefix; zero input embeddings give exactly-zero keys/values below layer L).
Questions: the first N of the validation articles (seeded shuffle). Results in EVAL.md.
"""

import random
import sys
import time

import numpy as np
import torch
from transformers import DynamicCache

from knowstream.models.evaluate import generate, squad_scores
from knowstream.models.lm import load_lm
from knowstream.models.qa_data import load_qa, load_split, select
from knowstream.models.train import chat_prompts, passage_prompt

torch.set_num_threads(2)
lm, tok = load_lm()
recs = select(load_qa(sys.argv[1]), load_split("data/splits/squad_v1.1.json")["validation"])
random.seed(0)
random.shuffle(recs)
recs = recs[: int(sys.argv[2])]
configs = sys.argv[3].split(",")
docs = sorted({r.doc_id: r.text for r in recs}.items())
doc_ids = [d for d, _ in docs]
wrong = {d: doc_ids[(i + len(doc_ids) // 2) % len(doc_ids)] for i, d in enumerate(doc_ids)}
text = dict(docs)


@torch.no_grad()
def states(t):
    ids = tok("Passage: " + t, return_tensors="pt").input_ids
    out = lm(ids, output_hidden_states=True, use_cache=True)
    return out.hidden_states, out.past_key_values


cache = {d: states(text[d]) for d in doc_ids}


def positions(N, T):
    return [max(0, round((t + 1) * N / T) - 1) for t in range(T)]


def entry(d, layer, T, how):
    h = cache[d][0][layer][0]  # (N, 576)
    N = h.shape[0]
    if how == "last":
        return h[positions(N, T)]
    bounds = [round(t * N / T) for t in range(T + 1)]
    return torch.stack([h[bounds[t] : max(bounds[t + 1], bounds[t] + 1)].mean(0) for t in range(T)])


@torch.no_grad()
def inject(entries, layer):
    B, T, D = entries.shape

    def hook(mod, args, kwargs):
        return (entries.to(args[0].dtype),) + args[1:], kwargs

    hd = lm.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = lm(inputs_embeds=torch.zeros(B, T, D), use_cache=True)
    finally:
        hd.remove()
    return out.past_key_values


def kv_select(ds, T):
    layers = []
    kvs = [cache[d][1] for d in ds]
    for li in range(len(lm.model.layers)):
        ks, vs = [], []
        for kv in kvs:
            k, v = kv.layers[li].keys, kv.layers[li].values
            idx = positions(k.shape[2], T)
            ks.append(k[:, :, idx])
            vs.append(v[:, :, idx])
        layers.append((torch.cat(ks), torch.cat(vs)))
    return DynamicCache(layers)


def run(cfg, control):
    scores = []
    bs = 16
    for s in range(0, len(recs), bs):
        rs = recs[s : s + bs]
        ds = [wrong[r.doc_id] if control else r.doc_id for r in rs]
        kind, *arg = cfg.split(":")
        if kind == "closed":
            pr, c, P = chat_prompts(tok, [r.question for r in rs]), None, 0
        elif kind == "prompt":
            contents = [passage_prompt(text[d], r.question) for d, r in zip(ds, rs, strict=True)]
            pr, c, P = chat_prompts(tok, contents), None, 0
        elif kind == "kvsel":
            T = int(arg[0])
            pr = chat_prompts(tok, [r.question for r in rs])
            c, P = kv_select(ds, T), T
        else:  # inj:layer:T:how
            layer, T, how = int(arg[0]), int(arg[1]), arg[2]
            e = torch.stack([entry(d, layer, T, how) for d in ds])
            pr = chat_prompts(tok, [r.question for r in rs])
            c, P = inject(e, layer), T
        preds = generate(lm, tok, pr, c, P, 24)
        scores += [squad_scores(p, r.answers)[1] for p, r in zip(preds, rs, strict=True)]
    return 100 * np.mean(scores), np.array(scores)


for cfg in configs:
    t = time.time()
    g, gs = run(cfg, False)
    if cfg.startswith("closed"):
        print(f"{cfg:22s} F1 {g:5.1f}  ({time.time() - t:.0f}s)", flush=True)
        continue
    w, ws = run(cfg, True)
    print(
        f"{cfg:22s} gold {g:5.1f} wrong {w:5.1f} diff {g - w:+5.1f}  ({time.time() - t:.0f}s)",
        flush=True,
    )
