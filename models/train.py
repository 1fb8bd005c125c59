"""Train MAC's amortizer, aggregator and expansion on SQuAD-format QA, LM frozen.

nanoGPT style: the config values below are plain globals, each overridable as
``--name=value`` on the command line. The exact command of the shipped run
(on the GPU machine, data and weights carried there; see EVAL.md):

    python -m knowstream.models.train --squad=DATA/squad_v1.1_dev.jsonl.gz \
        --split=data/splits/squad_v1.1.json \
        --extra=DATA/squadshifts_reddit.jsonl.gz,DATA/squadshifts_amazon.jsonl.gz \
        --out_dir=OUT --device=cuda --max_minutes=5

and on CPU, a smoke run: ``.venv/bin/python -m knowstream.models.train
--squad=../shared/data/squad_v1.1/dev.jsonl --device=cpu --max_steps=20``.

Objective (as in MAC): NLL of the answer tokens (+EOS) only, the question
going to the frozen LM through its chat template after the generated prefix.
Each question aggregates over a bank of its gold passage's entry plus the
entries of other passages of the same batch (in-batch distractors); the bank
grows 1, 2, 4, 8, 16 over the first ``curriculum_frac`` of training. Progress
is max(step / max_steps, elapsed / max_minutes), so the curriculum and the
learning-rate schedule fit a wall-clock budget too.

Validation (validation articles only; eval articles are never read here):
answer NLL with the gold entry alone, and with the entry of a *wrong* passage
(the control). The checkpoint with the lowest gold validation loss is kept in
``out_dir/best``; ``out_dir/metrics.json`` holds the config, the curves and the
best step. Training data: the split's train articles plus every ``--extra``
file (SQuADShifts).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor
from transformers import DynamicCache

from knowstream.models.inference import chat_prompts, load_models, passage_prompt, prefix_cache
from knowstream.models.mac import MAC, MACConfig
from knowstream.models.qa_data import QA, load_qa, load_split, select

# ----------------------------------------------------------------------------- config
squad = ""  # SQuAD-format JSONL (.gz ok) whose articles --split names (required)
split = "data/splits/squad_v1.1.json"  # article lists: train / validation / eval
extra = ""  # comma-separated extra training files (SQuADShifts); "" = none
out_dir = "out/mac-squad"  # best checkpoint in out_dir/best, curves in out_dir/metrics.json
device = "cuda" if torch.cuda.is_available() else "cpu"
autocast_dtype = "bfloat16"  # on CUDA: autocast dtype, and the frozen LM's dtype
lm_cache = ""  # folder of the LM's safetensors cache; "" = knowstream's default
max_steps = 4000  # optimizer steps at most
max_minutes = 5.0  # wall-clock budget of the training loop (validation included)
batch_docs = 32  # distinct passages per batch; each one's entry is a distractor for the others
q_per_doc = 2  # questions per passage (batch = batch_docs * q_per_doc questions)
curriculum = "1,2,4,8,16"  # bank sizes: gold entry + (size - 1) in-batch distractors
curriculum_frac = 0.6  # the bank sizes take equal parts of this fraction; the last, the rest
lr = 1e-3  # peak AdamW learning rate
min_lr = 1e-4  # cosine decay floor
warmup_steps = 100  # linear warm-up
weight_decay = 0.01  # AdamW weight decay on matrices
grad_clip = 1.0  # gradient-norm clip
eval_every = 100  # steps between validation passes
log_every = 20  # steps between training-loss records
val_max = 0  # validation questions per pass; 0 = all
val_batch = 64  # questions per validation forward
max_answer_tokens = 24  # longer reference answers are cut (the EOS is then not trained)
recon_weight = 0.0  # weight of the self-supervised passage-reconstruction loss (0 = off)
recon_tokens = 48  # reconstruct the passage's first this-many LM tokens from its entry alone
rag_frac = 0.0  # fraction of training questions asked with their passage in the prompt (mac+rag)
seed = 0  # data order and distractors
init_from = ""  # checkpoint folder to continue from ("" = fresh seeded weights)
# MACConfig fields (the rest keep MACConfig's defaults: SmolLM2-135M + MiniLM shapes)
n_tokens = 16  # T, vectors per memory entry
prefix_len = 2  # P, prefix tokens per LM layer
dropout = 0.1  # dropout inside the MAC networks
# -----------------------------------------------------------------------------


def apply_overrides(argv: list[str], config: dict) -> None:
    """``--name=value`` sets the global ``name``, parsed to the default's type."""
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"expected --name=value, got {arg!r}")
        name, value = arg[2:].split("=", 1)
        if name not in config:
            raise SystemExit(f"unknown config value {name!r}")
        kind = type(config[name])
        config[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)


# ----------------------------------------------------------------------------- LM plumbing


def answer_ids(tokenizer, answers: list[str], max_tokens: int) -> list[list[int]]:
    """Answer tokens + EOS (``<|im_end|>`` for SmolLM2-Instruct), cut to ``max_tokens``."""
    ids = tokenizer([" ".join(a.split()) for a in answers], add_special_tokens=False)["input_ids"]
    return [(x + [tokenizer.eos_token_id])[:max_tokens] for x in ids]


def answer_nll(
    lm, prompts: list[list[int]], answers: list[list[int]], cache: DynamicCache | None, P: int
) -> Tensor:
    """Per-question mean NLL of the answer tokens after prompt (and prefix of length P).

    Right-padded batch; the prompt sits at positions P, P+1, ... as in ``answer``.
    Logits are computed only where an answer token is predicted.
    """
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
    full_mask = torch.cat([torch.ones(B, P, dtype=torch.long, device=dev), mask], 1)
    pos = (P + torch.arange(L, device=dev)).expand(B, L)
    h = lm.model(
        input_ids=ids, attention_mask=full_mask, position_ids=pos, past_key_values=cache
    ).last_hidden_state
    sel = target != -100
    logits = lm.lm_head(h[sel]).float()
    tok_loss = torch.nn.functional.cross_entropy(logits, target[sel], reduction="none")
    row = sel.nonzero()[:, 0]
    per_q = torch.zeros(B, device=dev).index_add_(0, row, tok_loss)
    return per_q / sel.sum(1).clamp(min=1)


def mac_nll(
    mac: MAC,
    lm,
    encoder,
    tokenizer,
    questions: list[str],
    prompts: list[list[int]],
    answers: list[list[int]],
    bank: Tensor,
    bank_mask: Tensor | None = None,
) -> Tensor:
    """Per-question answer NLL with the prefix aggregated from ``bank`` (B, N, T, d)."""
    q_states, q_mask = encoder.encode(questions)
    summary = mac.aggregator(q_states, q_mask, bank, bank_mask)
    cache = prefix_cache(mac, summary, lm.dtype)
    return answer_nll(lm, prompts, answers, cache, mac.config.prefix_len)


# ----------------------------------------------------------------------------- data


RECON_INSTRUCTION = "Repeat the passage."


def recon_nll(mac, lm, encoder, tokenizer, texts: list[str], entries: Tensor) -> Tensor:
    """Per-passage NLL of the passage's first ``recon_tokens`` tokens, the LM seeing
    only the instruction and the prefix made from the bank ``entries`` (B, N, T, d)
    (the objective of in-context autoencoders / gist tokens)."""
    prompts = chat_prompts(tokenizer, [RECON_INSTRUCTION] * len(texts))
    targets = [x[:recon_tokens] for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return mac_nll(
        mac, lm, encoder, tokenizer, [RECON_INSTRUCTION] * len(texts), prompts, targets, entries
    )


class Batches:
    """Random batches of distinct passages with ``q_per_doc`` questions each."""

    def __init__(self, records: list[QA], tokenizer, seed: int, max_answer_tokens: int) -> None:
        self.rng = random.Random(seed)
        by_doc: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            by_doc[r.doc_id].append(i)
        self.docs = list(by_doc.items())
        self.records = records
        self.prompts = chat_prompts(tokenizer, [r.question for r in records])
        # The same questions with the passage in the prompt: the mac+rag setting,
        # where the prefix must help (or at least not hurt) an LM that reads text.
        self.rag_prompts = (
            chat_prompts(tokenizer, [passage_prompt(r.text, r.question) for r in records])
            if rag_frac > 0
            else []
        )
        self.answers = answer_ids(tokenizer, [r.answers[0] for r in records], max_answer_tokens)

    def train_prompt(self, i: int) -> list[int]:
        """Question ``i``'s prompt: with its passage with probability ``rag_frac``."""
        if self.rag_prompts and self.rng.random() < rag_frac:
            return self.rag_prompts[i]
        return self.prompts[i]

    def sample(self, n_docs: int, q_per_doc: int):
        docs = self.rng.sample(self.docs, min(n_docs, len(self.docs)))
        texts = [self.records[qs[0]].text for _, qs in docs]
        qidx = [
            [self.rng.choice(qs) for _ in range(q_per_doc)]
            if len(qs) < q_per_doc
            else self.rng.sample(qs, q_per_doc)
            for _, qs in docs
        ]
        owner = [d for d, qs in enumerate(qidx) for _ in qs]  # passage index of each question
        flat = [i for qs in qidx for i in qs]
        return texts, owner, flat


def bank_for(entries: Tensor, owner: list[int], size: int, shift: int = 0) -> Tensor:
    """(B_q, size, T, d): the gold entry (offset by ``shift`` passages: 0 = gold,
    else a wrong passage) followed by the next ``size - 1`` passages of the batch."""
    n = entries.shape[0]
    size = min(size, n)
    idx = torch.tensor([[(o + shift + j) % n for j in range(size)] for o in owner])
    return entries[idx.to(entries.device)]


def lr_at(step: int, progress: float) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def bank_size_at(progress: float, sizes: list[int]) -> int:
    stage = int(progress / curriculum_frac * len(sizes))
    return sizes[min(stage, len(sizes) - 1)]


# ----------------------------------------------------------------------------- loop


@torch.no_grad()
def validate(mac, lm, encoder, tokenizer, val: Batches, ctx) -> dict[str, float]:
    """Mean answer NLL on validation questions with the gold entry alone and with
    a wrong passage's entry (the next passage in a fixed order: the control)."""
    mac.eval()
    doc_ids = [d for d, _ in val.docs]
    doc_index = {d: i for i, d in enumerate(doc_ids)}
    qs = list(range(len(val.records)))
    if val_max:
        qs = qs[:val_max]
    totals = {"gold": 0.0, "wrong": 0.0}
    recon = {"recon_gold": 0.0, "recon_wrong": 0.0}
    n_docs = 0
    for start in range(0, len(qs), val_batch):
        idx = qs[start : start + val_batch]
        gold = [doc_index[val.records[i].doc_id] for i in idx]
        wrong = [(g + len(doc_ids) // 2) % len(doc_ids) for g in gold]  # another passage
        used = sorted(set(gold + wrong))
        pos = {d: k for k, d in enumerate(used)}
        with ctx:
            entries = mac.amortizer.amortize_texts(
                encoder, [val.records[val.docs[d][1][0]].text for d in used]
            )
            args = (
                [val.records[i].question for i in idx],
                [val.prompts[i] for i in idx],
                [val.answers[i] for i in idx],
            )
            for name, which in (("gold", gold), ("wrong", wrong)):
                bank = entries[torch.tensor([pos[d] for d in which], device=entries.device)][
                    :, None
                ]
                nll = mac_nll(mac, lm, encoder, tokenizer, *args, bank)
                totals[name] += float(nll.sum())
            if recon_weight > 0:
                # Passage reconstruction from its own entry vs another passage's.
                texts = [val.records[val.docs[d][1][0]].text for d in used]
                n = len(used)
                for name, shift in (("recon_gold", 0), ("recon_wrong", n // 2 or 1)):
                    order = torch.tensor([(k + shift) % n for k in range(n)], device=entries.device)
                    nll = recon_nll(mac, lm, encoder, tokenizer, texts, entries[order][:, None])
                    recon[name] += float(nll.sum())
                n_docs += n
    mac.train()
    out = {k: v / len(qs) for k, v in totals.items()}
    if n_docs:
        out.update({k: v / n_docs for k, v in recon.items()})
    return out


def train(
    mac: MAC,
    lm,
    tokenizer,
    encoder,
    train_records: list[QA],
    val_records: list[QA],
    out: Path | None,
    log=print,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """The training loop on already-loaded models; returns the metrics dict
    (also written to ``out/metrics.json`` if ``out`` is given). ``on_step`` gets the
    step and the fraction of the run done (steps or time budget, whichever is ahead)."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    use_amp = dev.type == "cuda"
    amp_dtype = getattr(torch, autocast_dtype)
    ctx = (
        torch.autocast("cuda", dtype=amp_dtype) if use_amp else torch.autocast("cpu", enabled=False)
    )
    sizes = [int(s) for s in curriculum.split(",")]
    tr = Batches(train_records, tokenizer, seed, max_answer_tokens)
    va = Batches(val_records, tokenizer, seed, max_answer_tokens) if val_records else None
    decay = [p for p in mac.parameters() if p.dim() >= 2]
    no_decay = [p for p in mac.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    mac.train()
    metrics: dict = {
        "config": {k: v for k, v in globals().items() if k in CONFIG_KEYS},
        "mac_config": asdict(mac.config),
        "n_params": sum(p.numel() for p in mac.parameters()),
        "n_train_questions": len(train_records),
        "n_train_passages": len(tr.docs),
        "n_val_questions": len(val_records),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "train": [],
        "val": [],
        "best": None,
    }
    t0 = time.time()
    budget = max_minutes * 60
    running, running_qa, n_running = 0.0, 0.0, 0
    step = 0
    while True:
        elapsed = time.time() - t0
        progress = max(step / max_steps, elapsed / budget)
        last = step >= max_steps or elapsed >= budget
        if va is not None and (step % eval_every == 0 or last) and (step > 0 or last):
            v = validate(mac, lm, encoder, tokenizer, va, ctx)
            rec = {"step": step, "elapsed_s": round(elapsed, 1), **v}
            metrics["val"].append(rec)
            better = metrics["best"] is None or v["gold"] < metrics["best"]["gold"]
            if better:
                metrics["best"] = rec
                if out is not None:
                    mac.save(out / "best")
            log(
                f"step {step} val "
                + json.dumps({k: round(x, 4) for k, x in v.items()})
                + " *" * better
            )
            if out is not None:
                (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if last:
            break
        size = bank_size_at(progress, sizes)
        cur_lr = lr_at(step, progress)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        texts, owner, flat = tr.sample(batch_docs, q_per_doc)
        with ctx:
            entries = mac.amortizer.amortize_texts(encoder, texts)
            bank = bank_for(entries, owner, size)
            nll = mac_nll(
                mac,
                lm,
                encoder,
                tokenizer,
                [tr.records[i].question for i in flat],
                [tr.train_prompt(i) for i in flat],
                [tr.answers[i] for i in flat],
                bank,
            )
            loss = nll.mean()
            if recon_weight > 0:
                rec_loss = recon_nll(mac, lm, encoder, tokenizer, texts, entries[:, None]).mean()
                loss = loss + recon_weight * rec_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(mac.parameters(), grad_clip)
        opt.step()
        running += float(loss.detach())
        running_qa += float(nll.mean().detach())
        n_running += 1
        step += 1
        if on_step:
            on_step(step, max(step / max_steps, (time.time() - t0) / budget))
        if step % log_every == 0 or step == 1:
            rec = {
                "step": step,
                "loss": running / n_running,
                "qa_loss": running_qa / n_running,
                "bank": size,
                "lr": cur_lr,
                "grad_norm": float(gnorm),
                "elapsed_s": round(time.time() - t0, 1),
            }
            metrics["train"].append(rec)
            log(json.dumps(rec))
            running, running_qa, n_running = 0.0, 0.0, 0
    metrics["steps"] = step
    metrics["train_seconds"] = round(time.time() - t0, 1)
    if out is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


CONFIG_KEYS = [
    k
    for k, v in list(globals().items())
    if not k.startswith("_") and isinstance(v, (int, float, str, bool)) and k != "annotations"
]


def main(argv: list[str]) -> None:
    apply_overrides(argv, globals())
    if not squad:
        raise SystemExit("--squad=PATH is required (SQuAD-format JSONL)")
    torch.manual_seed(seed)
    parts = load_split(split)
    records = load_qa(squad)
    train_records = select(records, parts["train"])
    for path in filter(None, extra.split(",")):
        train_records += load_qa(path)
    val_records = select(records, parts["validation"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm, tokenizer, encoder = load_models(device, lm_cache, autocast_dtype)
    cfg = MACConfig(n_tokens=n_tokens, prefix_len=prefix_len, dropout=dropout)
    mac = MAC.load(init_from, device) if init_from else MAC.init(cfg).to(device)
    print(f"{len(train_records)} train / {len(val_records)} val questions on {device}", flush=True)
    from rich.progress import Progress, TextColumn

    # On a terminal: a bar over the run (steps or time budget); in a log file: the lines.
    with Progress(
        *Progress.get_default_columns(),
        TextColumn("step {task.fields[step]}"),
        disable=not sys.stdout.isatty(),
    ) as bar:
        task = bar.add_task("training", total=1.0, step=0)
        m = train(
            mac,
            lm,
            tokenizer,
            encoder,
            train_records,
            val_records,
            out,
            log=_log,  # printed above the bar (rich redirects stdout)
            on_step=lambda step, done: bar.update(task, completed=min(done, 1.0), step=step),
        )
    print(json.dumps({"best": m["best"], "steps": m["steps"]}), flush=True)


def _log(msg: str) -> None:
    print(msg, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
