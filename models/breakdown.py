"""Where the memory changes answers: an evaluation's F1 by what retrieval gave each question.

Reads an ``eval.json`` written by ``evaluate --predictions`` and the hits file it was
evaluated with; the questions are those it answered. Each question falls in a group by its
top-k hits, as ``@k`` modes serve them: the gold document's entry in the bank or not
(``entry``), an answer string in the prompt's chunks or not (``answer``), and the gold
chunk first (``top1``). Per group, then for all questions: the mean F1 of every mode, and
for each MAC mode beside its control the paired difference, how often the two answers
differ and how often either scores higher. An own entry earns its keep where it beats its
control in groups whose gold entry is banked.

``--rung0-docs N`` also gives the paired own − wrong F1 on the questions of the N passages
rung 0 was measured on (``selfqa --max-docs N``, same ``--seed``): rung 2's fraction of
rung 0's gain on the same questions.

    .venv/bin/python -m knowstream.models.breakdown --eval eval.json \\
        --retrieval .gpu/retrieval-eval.json --data ../shared/data/squad_v1.1/dev.jsonl \\
        --split eval --rung0-docs 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from knowstream.models.evaluate import CONTROL, paired, parse_mode, squad_scores
from knowstream.models.qa_data import QA, load_qa, load_split, select
from knowstream.models.retrieve import load_retrieval, shown
from knowstream.models.selfqa import sampled_passages


def group_of(record: QA, hits: list[tuple[str, str]], k: int) -> str:
    """``entry``/``no entry``, ``+answer``/``-answer``, ``+top1`` of one question's hits."""
    entry, answer = shown(record, hits, k)
    top1 = bool(hits) and hits[0][0] == record.doc_id
    return f"{'entry' if entry else 'no entry'} {'+' if answer else '-'}answer" + (
        " +top1" if top1 else ""
    )


def per_question_f1(predictions: dict[str, str], records: list[QA]) -> np.ndarray:
    return np.array([squad_scores(predictions[r.question_id], r.answers)[1] for r in records]) * 100


def control_pairs(modes: list[str]) -> list[tuple[str, str]]:
    """(MAC mode, its control) for every MAC mode whose control was evaluated too."""
    pairs = []
    for mode in modes:
        name, k = parse_mode(mode)
        control = CONTROL.get(name, "") + (f"@{k}" if k else "")
        if name in CONTROL and control in modes:
            pairs.append((mode, control))
    return pairs


def group_row(name: str, records: list[QA], predictions: dict[str, dict[str, str]]) -> dict:
    """n, each mode's mean F1, and for each MAC mode and its control the paired
    difference, the fraction of answers that differ, and the fractions of questions where
    the MAC mode scores better and worse."""
    f1 = {m: per_question_f1(p, records) for m, p in predictions.items()}
    row: dict = {
        "group": name,
        "n": len(records),
        "f1": {m: float(x.mean()) for m, x in f1.items()},
    }
    for mode, control in control_pairs(list(predictions)):
        d = f1[mode] - f1[control]
        own, other = predictions[mode], predictions[control]
        row[f"{mode} - {control}"] = {
            "mean": float(d.mean()),
            "answers_differ": float(
                np.mean([own[r.question_id] != other[r.question_id] for r in records])
            ),
            "better": float(np.mean(d > 0)),
            "worse": float(np.mean(d < 0)),
        }
    return row


def breakdown(
    records: list[QA], predictions: dict[str, dict[str, str]], hits: dict, k: int
) -> list[dict]:
    """``group_row`` of each group, largest first, then of all the questions."""
    groups: dict[str, list[QA]] = {}
    for r in records:
        groups.setdefault(group_of(r, hits[r.question_id], k), []).append(r)
    ordered = sorted(groups.items(), key=lambda g: (-len(g[1]), g[0]))
    return [group_row(name, rs, predictions) for name, rs in [*ordered, ("all", records)]]


def paired_on(
    records: list[QA], predictions: dict[str, dict[str, str]], a: str, b: str, seed: int = 0
) -> dict:
    f1_a, f1_b = (per_question_f1(predictions[m], records) for m in (a, b))
    return {"n": len(records), **paired(f1_a, f1_b, seed)}


def markdown(rows: list[dict]) -> str:
    modes = list(rows[0]["f1"]) if rows else []
    diffs = [key for key in (rows[0] if rows else {}) if " - " in key]
    head = ["group", "n", *modes, *(f"{d} (answers differ; better, worse)" for d in diffs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["group"], str(row["n"]), *(f"{row['f1'][m]:.2f}" for m in modes)]
        cells += [
            f"{row[d]['mean']:+.2f} ({row[d]['answers_differ']:.0%}; "
            f"{row[d]['better']:.0%}, {row[d]['worse']:.0%})"
            for d in diffs
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description="an eval's F1 by what retrieval gave each question")
    p.add_argument("--eval", required=True, help="eval.json of `evaluate --predictions`")
    p.add_argument("--retrieval", required=True, help="the hits file it was evaluated with")
    p.add_argument("--data", required=True, help="SQuAD-format JSONL (.gz ok)")
    p.add_argument("--split-file", default="data/splits/squad_v1.1.json")
    p.add_argument("--split", default="eval")
    p.add_argument("--k", type=int, default=3, help="the k of the @k modes")
    p.add_argument("--rung0-docs", type=int, default=0, help="rung 0's number of passages")
    p.add_argument("--seed", type=int, default=0, help="rung 0's selfqa seed")
    p.add_argument("--out", default=None, help="also write the rows as JSON")
    a = p.parse_args()
    for flag, path in (("--eval", a.eval), ("--retrieval", a.retrieval), ("--data", a.data)):
        if not Path(path).is_file():
            p.error(f"{flag} {path}: no such file")
    result = json.loads(Path(a.eval).read_text())
    if "predictions" not in result:
        p.error(f"{a.eval} has no predictions: write it with `evaluate --predictions`")
    predictions = result["predictions"]
    hits = load_retrieval(a.retrieval)
    split = select(load_qa(a.data), load_split(a.split_file)[a.split])
    # Every mode's answers; an `evaluate --n` run answered a sample of the split.
    answered = set.intersection(*(set(by_id) for by_id in predictions.values()))
    records = [r for r in split if r.question_id in answered]
    if not records:
        p.error(f"{a.eval} answers no question of --split {a.split}")
    missing = [r.question_id for r in records if r.question_id not in hits]
    if missing:
        p.error(f"{len(missing)} answered questions have no hits in {a.retrieval}")
    rows = breakdown(records, predictions, hits, a.k)
    print(markdown(rows))
    out: dict = {"k": a.k, "groups": rows}
    if a.rung0_docs:
        ids = {d for d, _, _ in sampled_passages(split, a.rung0_docs, a.seed)}
        sub = [r for r in records if r.doc_id in ids]
        out["rung0_questions"] = {
            f"{m} - {c}": paired_on(sub, predictions, m, c)
            for m, c in control_pairs(list(predictions))
        }
        for key, v in out["rung0_questions"].items():
            lo, hi = v["ci"]
            print(f"{key} on rung 0's {v['n']} questions: {v['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
