"""Self-QA: questions the frozen LM writes about each passage, and its own answers
with the passage in its prompt, as training data for context distillation.

For every passage the LM is asked, with the passage in its prompt, to write a
question (sampled at ``--temperature``, ``--per-doc`` times); questions that do
not end in "?" or are too short or long are dropped, duplicates too. The LM then
answers each kept question greedily with the passage in its prompt (the teacher
setting of ``models/train.py``). The records are SQuAD-format JSONL with
``gold: false``: training uses their answers only as the positions where the
student is distilled toward the teacher, never as references.

    python -m knowstream.models.selfqa --data TRAIN.jsonl.gz --out selfqa.jsonl.gz \
        --per-doc 3 --device cuda
    # only some articles of a split file (e.g. rung 0's eval passages):
    python -m knowstream.models.selfqa --data dev.jsonl --split-file S.json --split eval ...
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import time
from pathlib import Path

import torch

from knowstream.models.inference import chat_prompts, generate, load_models, passage_prompt
from knowstream.models.qa_data import QA, load_qa, load_split, select

QUESTION_INSTRUCTION = (
    "Write one short question about a fact stated in the passage, that the passage answers "
    "with a few words. Reply with the question only.\n\nPassage: "
)
# Worked examples as earlier chat turns: placed inside the instruction, SmolLM2-135M
# copied their labels ("Example question: ...") instead of following them.
EXAMPLES = (
    (
        "The Eiffel Tower was completed in 1889 for the World's Fair in Paris. Its designer, "
        "Gustave Eiffel, also built the internal frame of the Statue of Liberty.",
        "Who designed the Eiffel Tower?",
    ),
    (
        "The Amazon River carries more water than any other river. Its basin covers about "
        "seven million square kilometres, most of it in Brazil.",
        "Which country holds most of the Amazon basin?",
    ),
)
LABEL = re.compile(r"^(?:[A-Za-z]+ )?question\s*\d*\s*:\s*", re.IGNORECASE)


def question_prompts(tokenizer, passages: list[str]) -> list[list[int]]:
    """Token ids of the question-writing chat: the worked examples, then the passage."""
    shots = []
    for text, question in EXAMPLES:
        shots += [
            {"role": "user", "content": QUESTION_INSTRUCTION + text},
            {"role": "assistant", "content": question},
        ]
    texts = tokenizer.apply_chat_template(
        [shots + [{"role": "user", "content": QUESTION_INSTRUCTION + p}] for p in passages],
        add_generation_prompt=True,
        tokenize=False,
    )
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def clean_question(text: str) -> str:
    """The first line, without a leading label such as "Question:"."""
    lines = text.strip().splitlines()
    return LABEL.sub("", " ".join(lines[0].split())) if lines else ""


def keep_question(q: str) -> bool:
    """A usable question (``clean_question``'s one line): ends with '?', 4 to 30 words."""
    return q.endswith("?") and 4 <= len(q.split()) <= 30


@torch.no_grad()
def self_qa(
    lm,
    tokenizer,
    docs: list[tuple[str, str, str]],
    per_doc: int,
    batch: int = 256,
    temperature: float = 0.7,
    seed: int = 0,
    log=print,
) -> list[dict]:
    """Records (doc_id, title, text, question, answers, question_id, gold=False) for
    ``docs`` = [(doc_id, title, text)], up to ``per_doc`` questions each."""
    gen = torch.Generator(device=lm.device).manual_seed(seed)
    jobs = [d for d in docs for _ in range(per_doc)]
    prompts = question_prompts(tokenizer, [text for _, _, text in jobs])
    order = sorted(range(len(jobs)), key=lambda i: len(prompts[i]))  # less padding
    questions: dict[str, list[str]] = {}
    t0 = time.time()
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        outs = generate(
            lm, tokenizer, [prompts[i] for i in idx], max_new_tokens=40,
            temperature=temperature, generator=gen,
        )  # fmt: skip
        for i, q in zip(idx, outs, strict=True):
            q = clean_question(q)
            seen = questions.setdefault(jobs[i][0], [])
            if keep_question(q) and q not in seen:
                seen.append(q)
    n_q = sum(len(v) for v in questions.values())
    log(f"questions: {n_q} kept of {len(jobs)} asked ({time.time() - t0:.0f} s)")
    pairs = [(d, q) for d in docs for q in questions.get(d[0], [])]
    a_prompts = chat_prompts(tokenizer, [passage_prompt(d[2], q) for d, q in pairs])
    order = sorted(range(len(pairs)), key=lambda i: len(a_prompts[i]))
    answers: list[str] = [""] * len(pairs)
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        outs = generate(lm, tokenizer, [a_prompts[i] for i in idx], max_new_tokens=24)
        for i, a in zip(idx, outs, strict=True):
            answers[i] = a
    log(f"answers: {len(pairs)} ({time.time() - t0:.0f} s)")
    out = []
    for j, ((doc_id, title, text), q) in enumerate(pairs):
        if answers[j].strip():
            out.append(
                {
                    "doc_id": doc_id, "title": title, "text": text, "question": q,
                    "answers": [answers[j]], "question_id": f"self-{j}", "gold": False,
                }
            )  # fmt: skip
    return out


def sampled_passages(records: list[QA], n: int, seed: int) -> list[tuple[str, str, str]]:
    """(doc id, title, text) of ``n`` passages of ``records`` drawn with ``seed`` (0: all,
    in order): rung 0's passages are the ones ``--max-docs`` drew."""
    docs = list({r.doc_id: (r.doc_id, r.title, r.text) for r in records}.values())
    return random.Random(seed).sample(docs, min(n, len(docs))) if n else docs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="SQuAD-format JSONL (.gz ok): its passages")
    p.add_argument("--split-file", default=None, help="only the articles of --split in this file")
    p.add_argument("--split", default="train")
    p.add_argument("--max-docs", type=int, default=0, help="seeded sample of passages (0 = all)")
    p.add_argument("--per-doc", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help=".jsonl or .jsonl.gz")
    a = p.parse_args()
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    records = load_qa(a.data)
    if a.split_file:
        records = select(records, load_split(a.split_file)[a.split])
    docs = sampled_passages(records, a.max_docs, a.seed)
    lm, tokenizer, _ = load_models(device, encoder=False)
    out = self_qa(lm, tokenizer, docs, a.per_doc, a.batch, a.temperature, a.seed)
    path = Path(a.out)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    print(json.dumps({"docs": len(docs), "records": len(out), "out": str(path)}))
    for r in out[:5]:
        print(json.dumps({k: r[k] for k in ("question", "answers")}))


if __name__ == "__main__":
    main()
