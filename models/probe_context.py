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

from knowstream.models.evaluate import squad_scores
from knowstream.models.inference import chat_prompts, generate, passage_prompt
from knowstream.models.lm import load_lm, output_cache
from knowstream.models.qa_data import load_qa, load_split, select


def positions(N: int, T: int) -> list[int]:
    """The last position of each of T equal segments of N."""
    return [max(0, round((t + 1) * N / T) - 1) for t in range(T)]


class Probe:
    """The LM, the questions, and each passage's hidden states and key/values (one
    forward pass per passage, kept for every config)."""

    def __init__(self, data: str, n: int) -> None:
        self.lm, self.tok = load_lm()
        split = load_split("data/splits/squad_v1.1.json")["validation"]
        recs = select(load_qa(data), split)
        random.seed(0)
        random.shuffle(recs)
        self.recs = recs[:n]
        docs = sorted({r.doc_id: r.text for r in self.recs}.items())
        ids = [d for d, _ in docs]
        # the control: for each passage, the one half-way round the sorted list
        self.wrong = {d: ids[(i + len(ids) // 2) % len(ids)] for i, d in enumerate(ids)}
        self.text = dict(docs)
        self.cache = {d: self.states(self.text[d]) for d in ids}

    @torch.no_grad()
    def states(self, t: str):
        ids = self.tok("Passage: " + t, return_tensors="pt").input_ids
        out = self.lm(ids, output_hidden_states=True, use_cache=True)
        return out.hidden_states, output_cache(out)

    def entry(self, d: str, layer: int, T: int, how: str) -> torch.Tensor:
        h = self.cache[d][0][layer][0]  # (N, 576)
        N = h.shape[0]
        if how == "last":
            return h[positions(N, T)]
        b = [round(t * N / T) for t in range(T + 1)]
        return torch.stack([h[b[t] : max(b[t + 1], b[t] + 1)].mean(0) for t in range(T)])

    @torch.no_grad()
    def inject(self, entries: torch.Tensor, layer: int):
        B, T, D = entries.shape

        def hook(mod, args, kwargs):
            return (entries.to(args[0].dtype),) + args[1:], kwargs

        hd = self.lm.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            out = self.lm(inputs_embeds=torch.zeros(B, T, D), use_cache=True)
        finally:
            hd.remove()
        return output_cache(out)

    def kv_select(self, ds: list[str], T: int) -> DynamicCache:
        layers = []
        kvs = [self.cache[d][1] for d in ds]
        for li in range(len(self.lm.model.layers)):
            ks, vs = [], []
            for kv in kvs:
                k, v = kv.layers[li].keys, kv.layers[li].values
                idx = positions(k.shape[2], T)
                ks.append(k[:, :, idx])
                vs.append(v[:, :, idx])
            layers.append((torch.cat(ks), torch.cat(vs)))
        return DynamicCache(layers)

    def run(self, cfg: str, control: bool) -> float:
        """Mean F1 (percent) of ``cfg`` with the gold passages, or the control's."""
        tok, scores = self.tok, []
        for s in range(0, len(self.recs), 16):
            rs = self.recs[s : s + 16]
            ds = [self.wrong[r.doc_id] if control else r.doc_id for r in rs]
            kind, *arg = cfg.split(":")
            questions = chat_prompts(tok, [r.question for r in rs])
            if kind == "closed":
                pr, c, P = questions, None, 0
            elif kind == "prompt":
                contents = [
                    passage_prompt(self.text[d], r.question) for d, r in zip(ds, rs, strict=True)
                ]
                pr, c, P = chat_prompts(tok, contents), None, 0
            elif kind == "kvsel":
                T = int(arg[0])
                pr, c, P = questions, self.kv_select(ds, T), T
            else:  # inj:layer:T:how
                layer, T, how = int(arg[0]), int(arg[1]), arg[2]
                e = torch.stack([self.entry(d, layer, T, how) for d in ds])
                pr, c, P = questions, self.inject(e, layer), T
            preds = generate(self.lm, tok, pr, c, P, 24)
            scores += [squad_scores(p, r.answers)[1] for p, r in zip(preds, rs, strict=True)]
        return 100 * float(np.mean(scores))


def main(argv: list[str]) -> None:
    torch.set_num_threads(2)
    probe = Probe(argv[0], int(argv[1]))
    for cfg in argv[2].split(","):
        t = time.time()
        g = probe.run(cfg, False)
        if cfg.startswith("closed"):
            print(f"{cfg:22s} F1 {g:5.1f}  ({time.time() - t:.0f}s)", flush=True)
            continue
        w = probe.run(cfg, True)
        print(
            f"{cfg:22s} gold {g:5.1f} wrong {w:5.1f} diff {g - w:+5.1f}  ({time.time() - t:.0f}s)",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
