"""Train MAC (amortizer, aggregator, expansion, task prompt, encoder LoRA), LM frozen.

A script: nothing imports it but its tests. Every option is a field of
``TrainConfig``, overridable as ``--name=value`` (``knowstream train --name=value``
or ``python -m knowstream.models.train --name=value``). The commands of the runs
in EVAL.md are in ``models/runs/*/command.txt`` and ``models/run_gpu.sh``; on CPU,
a smoke run:

    .venv/bin/knowstream train --squad=../shared/data/squad_v1.1/dev.jsonl \
        --device=cpu --max_steps=20 --out_dir=/tmp/mac-smoke

Objective: **context distillation** (``kd_weight``). The teacher is the frozen
LM with the passage in its prompt (after the shared task prompt, if the config
has one); the student is the same LM with the MAC prefix (task prompt + memory
aggregated from a bank holding the passage's entry) and the question alone. The
loss is KL(teacher || student) over the vocabulary at every answer position,
averaged over answer tokens. Answer positions come from the gold answer (SQuAD
records) or from the LM's own answer with the passage in its prompt (self-QA
records, ``models/selfqa.py``, ``gold: false``). Gold records add the answer NLL
of the student (``gold_weight``) and of the teacher (``task_weight``: that is
what trains the task prompt in the passage-in-prompt setting, the RAG baseline's
setting). ``train_mac=False`` trains the task prompt alone (no encoder needed).

Each question aggregates over a bank of its passage's entry plus the entries of
other passages of the same batch (in-batch distractors), growing along
``curriculum`` over the first ``curriculum_frac`` of training. Progress is
max(step / max_steps, elapsed / max_minutes): the curriculum and the learning
rate schedule fit a wall-clock budget.

``mac+rag`` questions (``rag_frac``): the student also has ``rag_k`` passages in its
prompt, its own and others of the same article (``article_group`` puts them in the
batch), and their entries are its bank, as ``mac+rag@k`` serves them. With the own
passage in the prompt the entry has nothing to add; ``rag_miss`` swaps it for another
passage in part of them, so that only the own entry holds the answer. ``rag_retrieve``
builds those contexts as serving does instead: the top ``rag_k`` chunks by MiniLM among
the batch's passages (in validation, the split's) in the prompt, the entries of the top
``rag_k`` documents in the bank; a miss then leaves the own passage's chunks out.

Validation (the split's validation articles; eval articles are never read):
student answer NLL with the gold entry alone and with a wrong passage's entry
(the control), and the teacher's (task prompt + passage) answer NLL. The
checkpoint with the lowest ``select`` loss is kept in ``out_dir/best``;
``out_dir/metrics.json`` holds the config, the curves and the best step.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from knowstream.models.inference import (
    chat_prompts,
    load_models,
    memory_mask,
    passage_prompt,
    prefix_cache,
    task_cache,
)
from knowstream.models.mac import MAC, MACConfig
from knowstream.models.objectives import (
    answer_ids,
    answer_logits,
    answer_nll,
    kl_per_token,
    per_question,
)
from knowstream.models.qa_data import QA, load_qa, load_split, select
from knowstream.models.retrieve import rank_chunks, top_docs


@dataclass
class TrainConfig:
    # --- data ---
    squad: str = ""  # SQuAD-format JSONL (.gz ok) whose articles --split names
    split: str = "data/splits/squad_v1.1.json"  # article lists: train / validation / eval
    split_train: bool = True  # also train on the split's train articles of --squad
    extra: str = ""  # comma-separated training files used whole (SQuAD train, self-QA, ...)
    out_dir: str = "out/mac-squad"  # best checkpoint in out_dir/best, curves in metrics.json
    # --- machine ---
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    autocast_dtype: str = "bfloat16"  # on CUDA: autocast dtype, and the frozen LM's dtype
    lm_cache: str = ""  # folder of the LM's safetensors cache; "" = knowstream's default
    # --- budget and batches ---
    max_steps: int = 4000  # optimizer steps at most
    max_minutes: float = 5.0  # wall-clock budget of the training loop (validation included)
    batch_docs: int = 32  # distinct passages per batch: each one's entry is a distractor
    q_per_doc: int = 2  # questions per passage (batch = batch_docs * q_per_doc questions)
    curriculum: str = "1,2,4,8,16"  # bank sizes: gold entry + (size - 1) in-batch distractors
    curriculum_frac: float = 0.6  # the sizes take equal parts of this fraction; the last, the rest
    # --- optimizer ---
    lr: float = 1e-3  # peak AdamW learning rate (MAC networks and task prompt)
    lora_lr: float = 3e-4  # peak learning rate of the encoder's LoRA deltas
    min_lr_frac: float = 0.1  # cosine decay floor, as a fraction of the peak
    warmup_steps: int = 100  # linear warm-up
    weight_decay: float = 0.01  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # gradient-norm clip
    # --- objective ---
    train_mac: bool = True  # False: train the task prompt alone (teacher NLL on gold records)
    kd_weight: float = 1.0  # context distillation: KL(teacher with passage || student)
    gold_weight: float = 1.0  # student NLL of gold answers
    task_weight: float = 1.0  # teacher NLL of gold answers (trains the task prompt)
    rag_frac: float = 0.0  # fraction of student questions asked with passages in the prompt
    rag_k: int = 1  # passages in such a prompt: own + rag_k - 1 of its article; or retrieved chunks
    rag_miss: float = 0.0  # of those, the fraction whose own passage is left out of the prompt
    rag_retrieve: bool = False  # those prompts and banks retrieved, as served (chunks, top docs)
    article_group: int = 1  # a batch's passages come in groups of this many per article
    kd_focus: float = 0.0  # 0..1: weight KD tokens by what the passage changes (see kd_weights)
    freeze_task: bool = False  # keep the task prompt as loaded (--init_from): a fixed teacher
    max_answer_tokens: int = 24  # longer answers are cut (the EOS is then not trained)
    # --- validation ---
    eval_every: int = 100  # steps between validation passes
    log_every: int = 20  # steps between training-loss records
    val_max: int = 0  # validation questions per pass; 0 = all
    val_batch: int = 64  # questions per validation forward
    select: str = "gold"  # validation losses picking the best, "+"-summed: gold, rag_gold, ...
    seed: int = 0  # data order and distractors
    init_from: str = ""  # checkpoint folder to continue from ("" = fresh seeded weights)
    # --- MACConfig fields (the rest keep MACConfig's defaults: SmolLM2-135M + MiniLM) ---
    amortizer: str = "reader"  # "reader" (MiniLM + learned readers) or "lm" (the LM reads)
    lm_lora_rank: int = 16  # "lm": LoRA rank of the LM's reading pass
    n_tokens: int = 16  # T, vectors per memory entry
    prefix_len: int = 2  # P, prefix tokens per LM layer (task prompt included)
    task_len: int = 0  # shared task prompt tokens per LM layer (first of the P)
    d_model: int = 192  # width of the amortizer's and question reader's layers
    amortizer_layers: int = 2
    aggregator_blocks: int = 2
    mlp_hidden: int = 384
    token_hidden: int = 16
    encoder_lora_rank: int = 0  # LoRA on the document encoder (0 = frozen encoder)
    dropout: float = 0.1  # dropout inside the MAC networks
    bank_mode: str = ""  # "lm": "mean" or "concat" entries ("" = MACConfig's, or --init_from's)
    # how evaluation and serving read the saved checkpoint's bank, "all" or "lm" (training
    # itself banks every entry; "" = MACConfig's, or --init_from's)
    bank_select: str = ""

    def mac_config(self) -> MACConfig:
        names = {f.name for f in fields(MACConfig)}
        given = {k: v for k, v in asdict(self).items() if k in names and v != ""}
        return MACConfig(**given)


def parse_overrides(argv: list[str], config: TrainConfig) -> TrainConfig:
    """``--name=value`` sets field ``name``, parsed to the field's type."""
    types = {f.name: type(getattr(config, f.name)) for f in fields(config)}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"expected --name=value, got {arg!r}")
        name, value = arg[2:].split("=", 1)
        if name not in types:
            raise SystemExit(f"unknown config value {name!r}")
        kind = types[name]
        parsed = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        setattr(config, name, parsed)
    return config


# ----------------------------------------------------------------------------- LM plumbing


def mac_cache(mac: MAC, lm, encoder, questions: list[str], bank: Tensor, bank_mask=None):
    """The prefix cache aggregated from ``bank`` (B, N, T, d) for each question."""
    q_states, q_mask = encoder.encode(questions)
    summary = mac.aggregator(q_states, q_mask, bank, bank_mask)
    return prefix_cache(mac, summary, lm.dtype)


def mac_nll(mac, lm, encoder, tokenizer, questions, prompts, answers, bank, bank_mask=None):
    """Per-question answer NLL with the prefix aggregated from ``bank`` (B, N, T, d)."""
    cache = mac_cache(mac, lm, encoder, questions, bank, bank_mask)
    real = memory_mask(mac, bank_mask)
    return answer_nll(lm, prompts, answers, cache, mac.config.prefix_len, real)


# ----------------------------------------------------------------------------- data


class Context(NamedTuple):
    """What a question with passages sees: the texts in its prompt (passages or chunks) and
    the passages whose entries are its bank (indices into its batch's or split's)."""

    prompt: list[str]
    bank: list[int]


def swapped_out(docs: list[int], own: int, spare: list[int]) -> list[int]:
    """The prompt of a retrieval miss: ``docs`` with ``spare`` (one passage, or none) in
    ``own``'s place."""
    return [x for d in docs for x in (spare if d == own else [d])]


@torch.no_grad()
def retrieved_hits(encoder, questions: list[str], texts: list[str]) -> list[list[tuple[str, str]]]:
    """Each question's chunks of ``texts`` as served, best first: (passage index as a
    string, chunk text), with ``texts`` as the whole store."""
    docs = {str(d): t for d, t in enumerate(texts)}
    chunks, best = rank_chunks(docs, questions, encoder, top=None)
    return [[chunks[j] for j in row] for row in best]


def retrieved_context(hits: list[tuple[str, str]], own: int, k: int, miss: bool) -> Context:
    """The ``mac+rag@k`` context of a question's ``retrieved_hits``: its top k chunks in the
    prompt and the entries of its top k passages in the bank; with a miss, the next chunks
    take the places of its own passage's."""
    shown = [t for d, t in hits if not (miss and int(d) == own)][:k]
    return Context(shown, [int(d) for d in top_docs(hits, k)])


class Batches:
    """Random batches of distinct passages with ``q_per_doc`` questions each; with
    ``article_group`` > 1, in groups of passages of one article (the hard negatives
    retrieval returns, used as the other passages of mac+rag prompts)."""

    def __init__(self, records: list[QA], tokenizer, cfg: TrainConfig) -> None:
        self.rng = random.Random(cfg.seed)
        self.rag_frac, self.rag_k, self.rag_miss = cfg.rag_frac, cfg.rag_k, cfg.rag_miss
        self.rag_retrieve = cfg.rag_retrieve
        self.group = cfg.article_group
        self.tokenizer = tokenizer
        by_doc: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            by_doc[r.doc_id].append(i)
        self.docs = list(by_doc.items())
        self.by_title: dict[str, list[int]] = defaultdict(list)  # article -> indices in docs
        for j, (_, qs) in enumerate(self.docs):
            self.by_title[records[qs[0]].title].append(j)
        self.records = records
        self.prompts = chat_prompts(tokenizer, [r.question for r in records])
        # The teacher's prompts: the passage, then the question.
        self.passage_prompts = chat_prompts(
            tokenizer, [passage_prompt(r.text, r.question) for r in records]
        )
        self.answers = answer_ids(tokenizer, [r.answers[0] for r in records], cfg.max_answer_tokens)

    def student_contexts(
        self, flat: list[int], owner: list[int], titles: list[str], texts: list[str], encoder
    ) -> list[Context | None]:
        """For each question (record ``flat[q]``, its passage ``owner[q]`` of the batch's
        ``texts``): None (question alone), or with probability ``rag_frac`` passages in its
        prompt, as ``mac+rag@k`` serves them: its own and ``rag_k - 1`` others of the same
        article when the batch has them (else any others), in random order, their entries
        the bank. With probability ``rag_miss`` the own passage is then swapped in the
        prompt for another (a retrieval miss at chunk level): its entry alone holds the
        answer. With ``rag_retrieve``: ``retrieved_context`` over the batch's passages."""
        out: list[Context | None] = []
        retrieve: list[tuple[int, bool]] = []  # rag_retrieve: (question, miss)
        for q, o in enumerate(owner):
            if not (self.rag_frac and self.rng.random() < self.rag_frac):
                out.append(None)
                continue
            if self.rag_retrieve:
                retrieve.append((q, bool(self.rag_miss and self.rng.random() < self.rag_miss)))
                out.append(None)
                continue
            same = [d for d, t in enumerate(titles) if t == titles[o] and d != o]
            rest = [d for d in range(len(titles)) if d != o and titles[d] != titles[o]]
            self.rng.shuffle(same)
            self.rng.shuffle(rest)
            others = same + rest
            docs = [o, *others[: self.rag_k - 1]]
            self.rng.shuffle(docs)
            prompt = docs
            if self.rag_miss and self.rng.random() < self.rag_miss:
                prompt = swapped_out(docs, o, others[self.rag_k - 1 : self.rag_k])
            out.append(Context([texts[d] for d in prompt], docs))
        if retrieve:
            questions = [self.records[flat[q]].question for q, _ in retrieve]
            hits = retrieved_hits(encoder, questions, texts)
            for (q, miss), h in zip(retrieve, hits, strict=True):
                out[q] = retrieved_context(h, owner[q], self.rag_k, miss)
        return out

    def student_prompts(
        self, flat: list[int], contexts: Sequence[Context | None]
    ) -> list[list[int]]:
        """The student's prompt of each question: the question alone, or its passages."""
        prompts: list[list[int]] = []
        for i, c in zip(flat, contexts, strict=True):
            if c is None:
                prompts.append(self.prompts[i])
            elif c.prompt == [self.records[i].text]:
                prompts.append(self.passage_prompts[i])  # its own passage: the teacher's prompt
            else:
                joined = "\n\n".join(c.prompt)
                content = passage_prompt(joined, self.records[i].question)
                prompts += chat_prompts(self.tokenizer, [content])
        return prompts

    def _grouped_docs(self, n_docs: int):
        """``n_docs`` passages, ``group`` at a time from random articles."""
        titles = [t for t, ds in self.by_title.items() if len(ds) >= self.group]
        if not titles:
            return self.rng.sample(self.docs, min(n_docs, len(self.docs)))
        n_art = min(len(titles), -(-n_docs // self.group))
        articles = self.rng.sample(titles, n_art)
        picked = [j for t in articles for j in self.rng.sample(self.by_title[t], self.group)]
        return [self.docs[j] for j in picked[:n_docs]]

    def sample(self, n_docs: int, q_per_doc: int):
        """Passage texts, their article titles, each question's passage (index into the
        texts) and the questions (indices into the records)."""
        if self.group > 1:
            docs = self._grouped_docs(n_docs)
        else:
            docs = self.rng.sample(self.docs, min(n_docs, len(self.docs)))
        texts = [self.records[qs[0]].text for _, qs in docs]
        titles = [self.records[qs[0]].title for _, qs in docs]
        qidx = [
            [self.rng.choice(qs) for _ in range(q_per_doc)]
            if len(qs) < q_per_doc
            else self.rng.sample(qs, q_per_doc)
            for _, qs in docs
        ]
        owner = [d for d, qs in enumerate(qidx) for _ in qs]  # passage index of each question
        flat = [i for qs in qidx for i in qs]
        return texts, titles, owner, flat


def padded_bank(entries: Tensor, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    """(B_q, N, T, d) + mask (B_q, N): each question's entries ``rows`` (indices into
    ``entries``), padded to the longest."""
    N = max(len(r) for r in rows)
    idx = torch.tensor([r + [0] * (N - len(r)) for r in rows], device=entries.device)
    mask = torch.tensor([[j < len(r) for j in range(N)] for r in rows], device=entries.device)
    return entries[idx], mask


def mixed_bank(
    entries: Tensor, owner: list[int], size: int, contexts: Sequence[Context | None]
) -> tuple[Tensor, Tensor]:
    """The banks of a batch's questions: for a question alone, its passage's entry followed
    by the next ``size - 1`` passages' of the batch (in-batch distractors); for a question
    with passages, its context's bank, in order."""
    n = entries.shape[0]
    rows = [
        [(o + j) % n for j in range(min(size, n))] if c is None else c.bank
        for o, c in zip(owner, contexts, strict=True)
    ]
    return padded_bank(entries, rows)


def lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine to min_lr_frac."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_frac
    return floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def bank_size_at(progress: float, sizes: list[int], curriculum_frac: float) -> int:
    stage = int(progress / curriculum_frac * len(sizes))
    return sizes[min(stage, len(sizes) - 1)]


# ----------------------------------------------------------------------------- losses


def step_losses(mac, lm, tokenizer, encoder, data: Batches, batch, size, cfg):
    """The losses of one batch (``Batches.sample``'s): a dict of scalars, ``loss`` the
    weighted total."""
    texts, titles, owner, flat = batch
    recs = [data.records[i] for i in flat]
    answers = [data.answers[i] for i in flat]
    gold = torch.tensor([r.gold for r in recs], device=lm.device, dtype=torch.float)
    B = len(flat)
    out: dict[str, Tensor] = {}
    # Teacher: task prompt (if any) + passage + question. It has gradients only to
    # train the task prompt; its distribution is a detached target for the student.
    t_cache, t_P = task_cache(mac, B, lm.dtype)
    need_task_grad = cfg.task_weight > 0 and t_cache is not None and not cfg.freeze_task
    with torch.set_grad_enabled(need_task_grad and torch.is_grad_enabled()):
        t_logits, target, rows = answer_logits(
            lm, [data.passage_prompts[i] for i in flat], answers, t_cache, t_P
        )
    t_nll = per_question(F.cross_entropy(t_logits, target, reduction="none"), rows, B)
    out["teacher_nll"] = (t_nll * gold).sum() / gold.sum().clamp(min=1)
    loss = cfg.task_weight * out["teacher_nll"] if need_task_grad else t_logits.new_zeros(())
    if cfg.train_mac:
        entries = mac.amortizer.amortize_texts(encoder, texts)
        contexts = data.student_contexts(flat, owner, titles, texts, encoder)
        bank, bank_mask = mixed_bank(entries, owner, size, contexts)
        cache = mac_cache(mac, lm, encoder, [r.question for r in recs], bank, bank_mask)
        prompts = data.student_prompts(flat, contexts)
        real = memory_mask(mac, bank_mask)
        s_logits, _, _ = answer_logits(lm, prompts, answers, cache, mac.config.prefix_len, real)
        s_nll = per_question(F.cross_entropy(s_logits, target, reduction="none"), rows, B)
        out["gold_nll"] = (s_nll * gold).sum() / gold.sum().clamp(min=1)
        kl = kl_per_token(t_logits.detach(), s_logits)
        if cfg.kd_focus > 0:
            with torch.no_grad():
                base, _, _ = answer_logits(
                    lm, [data.prompts[i] for i in flat], answers, t_cache, t_P
                )
            w = kd_weights(t_logits.detach(), base, cfg.kd_focus)
            out["kd"] = (w * kl).sum() / w.sum()
        else:
            out["kd"] = kl.mean()
        loss = loss + cfg.gold_weight * out["gold_nll"] + cfg.kd_weight * out["kd"]
    out["loss"] = loss
    return out


def kd_weights(teacher: Tensor, closed_book: Tensor, focus: float) -> Tensor:
    """(n_tok,) weights of the KD tokens, mean 1 at ``focus`` = 1: the more the passage
    moves the teacher's next-token distribution away from the closed-book one (same task
    prompt, no passage), the more the token weighs. Answer format is predicted alike with
    or without the passage, so its tokens no longer outweigh the ones only the document
    can tell."""
    gain = kl_per_token(teacher, closed_book).clamp(min=0)
    return (1 - focus) + focus * gain / gain.mean().clamp(min=1e-6)


# ----------------------------------------------------------------------------- loop


def val_context(val: Batches, gold: int, n: int, k: int, miss: bool) -> Context:
    """A fixed mac+rag@k context of validation passage ``gold``: it and the next k - 1
    passages of its article, the gold one at position ``n % k``; with ``miss``, the
    article's k-th next passage takes the gold one's place in the prompt (or none does)."""
    same = val.by_title[val.records[val.docs[gold][1][0]].title]
    at = same.index(gold)
    following = [same[(at + j) % len(same)] for j in range(1, len(same))]
    docs = following[: k - 1]
    docs.insert(n % (len(docs) + 1), gold)
    prompt = swapped_out(docs, gold, following[k - 1 : k]) if miss else docs
    return Context([val.records[val.docs[d][1][0]].text for d in prompt], docs)


@torch.no_grad()
def validate(mac, lm, encoder, tokenizer, val: Batches, ctx, cfg: TrainConfig) -> dict:
    """Mean answer NLL on validation questions: the student with the gold entry
    alone and with a wrong passage's entry (another article's, as a rule: the
    control), and the teacher (task prompt + passage); and the KD loss of each. When
    training asks questions with ``rag_k`` > 1 passages in the prompt: also with such a
    prompt (``val_context``, or with ``rag_retrieve`` the split's retrieved chunks, as
    ``mac+rag@k`` of the evaluation) and their own entries (``rag_gold``) or wrong ones
    (``rag_wrong``); with ``rag_miss``, the same with the gold passage out of the prompt
    (``miss_gold``, ``miss_wrong``)."""
    mac.eval()
    texts = [val.records[qs[0]].text for _, qs in val.docs]
    doc_index = {d: i for i, (d, _) in enumerate(val.docs)}
    shift = len(val.docs) // 2

    def wrong(bank: list[int]) -> list[int]:
        return [(d + shift) % len(val.docs) for d in bank]

    with_passages = []
    if cfg.train_mac and cfg.rag_frac > 0 and cfg.rag_k > 1:
        with_passages = [("rag", False)] + [("miss", True)] * (cfg.rag_miss > 0)
    qs = list(range(len(val.records)))
    if cfg.val_max:
        qs = qs[: cfg.val_max]
    retrieved: dict[bool, list[Context]] = {}
    if cfg.rag_retrieve and with_passages:
        hits = retrieved_hits(encoder, [val.records[i].question for i in qs], texts)
        owners = [doc_index[val.records[i].doc_id] for i in qs]
        for _, miss in with_passages:
            retrieved[miss] = [
                retrieved_context(h, o, cfg.rag_k, miss) for h, o in zip(hits, owners, strict=True)
            ]
    totals: dict[str, float] = defaultdict(float)
    for start in range(0, len(qs), cfg.val_batch):
        idx = qs[start : start + cfg.val_batch]
        answers = [val.answers[i] for i in idx]
        with ctx:
            t_cache, t_P = task_cache(mac, len(idx), lm.dtype)
            t_logits, target, rows = answer_logits(
                lm, [val.passage_prompts[i] for i in idx], answers, t_cache, t_P
            )
            nll = per_question(F.cross_entropy(t_logits, target, reduction="none"), rows, len(idx))
            totals["teacher"] += float(nll.sum())
            if not cfg.train_mac:
                continue
            gold = [doc_index[val.records[i].doc_id] for i in idx]
            alone = [None] * len(idx)
            runs: list[tuple[str, Sequence[Context | None], list[list[int]]]] = [
                ("gold", alone, [[g] for g in gold]),
                ("wrong", alone, [wrong([g]) for g in gold]),
            ]
            for name, miss in with_passages:
                if cfg.rag_retrieve:
                    cs = retrieved[miss][start : start + len(idx)]
                else:
                    cs = [val_context(val, g, n, cfg.rag_k, miss) for n, g in enumerate(gold)]
                banks = [c.bank for c in cs]
                runs += [
                    (f"{name}_gold", cs, banks),
                    (f"{name}_wrong", cs, [wrong(b) for b in banks]),
                ]
            used = sorted({d for _, _, banks in runs for b in banks for d in b})
            pos = {d: k for k, d in enumerate(used)}
            entries = mac.amortizer.amortize_texts(encoder, [texts[d] for d in used])
            questions = [val.records[i].question for i in idx]
            for name, contexts, banks in runs:
                bank, mask = padded_bank(entries, [[pos[d] for d in b] for b in banks])
                cache = mac_cache(mac, lm, encoder, questions, bank, mask)
                prompts = val.student_prompts(idx, contexts)
                real = memory_mask(mac, mask)
                P = mac.config.prefix_len
                s_logits, _, _ = answer_logits(lm, prompts, answers, cache, P, real)
                tok = F.cross_entropy(s_logits, target, reduction="none")
                totals[name] += float(per_question(tok, rows, len(idx)).sum())
                kd = per_question(kl_per_token(t_logits, s_logits), rows, len(idx))
                totals[f"kd_{name}"] += float(kd.sum())
    mac.train()
    return {k: v / len(qs) for k, v in totals.items()}


def train(
    mac: MAC,
    lm,
    tokenizer,
    encoder,
    train_records: list[QA],
    val_records: list[QA],
    out: Path | None,
    cfg: TrainConfig,
    log=print,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """The training loop on already-loaded models; returns the metrics dict
    (also written to ``out/metrics.json`` if ``out`` is given). ``on_step`` gets the
    step and the fraction of the run done (steps or time budget, whichever is ahead)."""
    torch.manual_seed(cfg.seed)
    mac.bind_lm(lm, tokenizer)
    dev = torch.device(cfg.device)
    use_amp = dev.type == "cuda"
    amp_dtype = getattr(torch, cfg.autocast_dtype)
    ctx = (
        torch.autocast("cuda", dtype=amp_dtype) if use_amp else torch.autocast("cpu", enabled=False)
    )
    sizes = [int(s) for s in cfg.curriculum.split(",")]
    tr = Batches(train_records, tokenizer, cfg)
    va = Batches(val_records, tokenizer, cfg) if val_records else None
    if mac.expansion.task is not None:
        mac.expansion.task.requires_grad_(not (cfg.train_mac and cfg.freeze_task))
    if cfg.train_mac:
        named = [
            (n, p)
            for n, p in mac.named_parameters()
            if not (cfg.freeze_task and n == "expansion.task")
        ]
    else:
        assert mac.expansion.task is not None, (
            "train_mac=False trains the task prompt: task_len > 0"
        )
        named = [("expansion.task", mac.expansion.task)]
    groups: dict[tuple[float, float], list] = defaultdict(list)
    for name, p in named:
        peak = cfg.lora_lr if name.startswith("amortizer.lora.") else cfg.lr
        decay = cfg.weight_decay if p.dim() >= 2 and "lora" not in name else 0.0
        groups[(peak, decay)].append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "peak": peak, "weight_decay": wd} for (peak, wd), ps in groups.items()],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    mac.train()
    metrics: dict = {
        "config": asdict(cfg),
        "mac_config": asdict(mac.config),
        "n_params": sum(p.numel() for p in mac.parameters()),
        "n_trained_params": sum(p.numel() for _, p in named),
        "n_train_questions": len(train_records),
        "n_train_gold": sum(r.gold for r in train_records),
        "n_train_passages": len(tr.docs),
        "n_val_questions": len(val_records),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "train": [],
        "val": [],
        "best": None,
    }
    t0 = time.time()
    budget = cfg.max_minutes * 60
    running: dict[str, float] = defaultdict(float)
    n_running = 0
    step = 0
    while True:
        elapsed = time.time() - t0
        progress = max(step / cfg.max_steps, elapsed / budget)
        last = step >= cfg.max_steps or elapsed >= budget
        if va is not None and (step % cfg.eval_every == 0 or last) and (step > 0 or last):
            v = validate(mac, lm, encoder, tokenizer, va, ctx, cfg)
            v["select"] = sum(v[k] for k in cfg.select.split("+"))
            rec = {"step": step, "elapsed_s": round(elapsed, 1), **v}
            metrics["val"].append(rec)
            better = math.isfinite(v["select"]) and (
                metrics["best"] is None or v["select"] < metrics["best"]["select"]
            )
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
        size = bank_size_at(progress, sizes, cfg.curriculum_frac)
        factor = lr_factor(step, progress, cfg)
        for g in opt.param_groups:
            g["lr"] = g["peak"] * factor
        batch = tr.sample(cfg.batch_docs, cfg.q_per_doc)
        with ctx:
            losses = step_losses(mac, lm, tokenizer, encoder, tr, batch, size, cfg)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
        if torch.isfinite(gnorm):
            opt.step()
        else:  # one overflowing batch must not turn every weight into NaN
            metrics["skipped_steps"] = metrics.get("skipped_steps", 0) + 1
        for k, x in losses.items():
            running[k] += float(x.detach())
        n_running += 1
        step += 1
        if on_step:
            on_step(step, max(step / cfg.max_steps, (time.time() - t0) / budget))
        if step % cfg.log_every == 0 or step == 1:
            rec = {
                "step": step,
                **{k: x / n_running for k, x in running.items()},
                "bank": size,
                "lr": cfg.lr * factor,
                "grad_norm": float(gnorm),
                "skipped_steps": metrics.get("skipped_steps", 0),  # so far, not finite
                "elapsed_s": round(time.time() - t0, 1),
            }
            metrics["train"].append(rec)
            log(json.dumps(rec))
            running, n_running = defaultdict(float), 0
    metrics["steps"] = step
    metrics["train_seconds"] = round(time.time() - t0, 1)
    if out is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def main(argv: list[str]) -> None:
    cfg = parse_overrides(argv, TrainConfig())
    if cfg.bank_select not in ("", "all", "lm"):
        raise SystemExit(f"--bank_select must be all or lm, not {cfg.bank_select!r}")
    records: list[QA] = []
    val_records: list[QA] = []
    if cfg.squad:
        parts = load_split(cfg.split)
        dev_records = load_qa(cfg.squad)
        if cfg.split_train:
            records += select(dev_records, parts["train"])
        val_records = select(dev_records, parts["validation"])
    for path in filter(None, cfg.extra.split(",")):
        records += load_qa(path)
    if not records:
        raise SystemExit("no training data: give --squad=PATH and/or --extra=PATHS")
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm, tokenizer, encoder = load_models(
        cfg.device, cfg.lm_cache, cfg.autocast_dtype, cfg.train_mac
    )
    if cfg.init_from:
        mac = MAC.load(cfg.init_from, cfg.device)  # its own MACConfig (dropout included)
        if cfg.bank_mode:
            mac.config.bank_mode = cfg.bank_mode
        if cfg.bank_select:
            mac.config.bank_select = cfg.bank_select
    else:
        mac = MAC.init(cfg.mac_config()).to(cfg.device)
    print(f"{len(records)} train / {len(val_records)} val questions on {cfg.device}", flush=True)
    from rich.progress import Progress, TextColumn

    # On a terminal: a bar over the run (steps or time budget); in a log file: the lines.
    with Progress(
        *Progress.get_default_columns(),
        TextColumn("step {task.fields[step]}"),
        disable=not sys.stdout.isatty(),
    ) as bar:
        task = bar.add_task("training", total=1.0, step=0)
        m = train(
            mac, lm, tokenizer, encoder, records, val_records, out, cfg,
            log=_log,  # printed above the bar (rich redirects stdout)
            on_step=lambda step, done: bar.update(task, completed=min(done, 1.0), step=step),
        )  # fmt: skip
    print(json.dumps({"best": m["best"], "steps": m["steps"]}), flush=True)


def _log(msg: str) -> None:
    print(msg, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
