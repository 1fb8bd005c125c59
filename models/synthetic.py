"""Rung 1 of the diagnostic ladder: synthetic facts.

Each passage holds exactly one random fact ("The access code of vault Orion is
4821.") amid filler sentences that carry no answer; its one question asks for
that fact. Every passage is its own article, so the wrong-entry control of
``models/evaluate.py`` is another passage with another fact of the same kind.
The generator writes SQuAD-format JSONL and a split file, so training and
evaluation are the real ones (frozen SmolLM2, amortize -> aggregate -> prefix):

    python -m knowstream.models.synthetic --out-dir synth --n-train 6000
    python -m knowstream.models.train --squad=synth/facts.jsonl --split=synth/split.json ...
    python -m knowstream.models.evaluate --data synth/facts.jsonl \
        --split-file synth/split.json --split eval --modes mac_gold,mac_wrong --checkpoint CKPT

Target (issue 9): own entry >= 90% exact match, wrong entry <= 5%.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYLLABLES = "ka lo mi re tu sa vo ne di pa ru zo li fe go ta mo si".split()
CITIES = (
    "Lisbon Oslo Nairobi Lima Hanoi Dublin Quito Accra Tallinn Bergen Porto Dakar Cusco "
    "Krakow Malmo Tbilisi Perth Leeds Turin Osaka Tunis Minsk Zagreb Riga Basel Lyon Graz"
).split()
METALS = "copper silver tin zinc nickel cobalt bronze iron gold platinum titanium lead".split()
FILLER = [
    "The weather in the region is mild for most of the year.",
    "Visitors often remark on the quiet of the surrounding hills.",
    "Records from that period are kept in a small local archive.",
    "The nearest village lies a short walk to the east.",
    "Several committees have reviewed the arrangements over the years.",
    "Local guides offer tours on weekends during the summer.",
    "The building was repainted after a storm damaged its roof.",
    "A narrow road connects the site to the main highway.",
    "Many of the older maps of the area are no longer accurate.",
    "The staff meet every Monday to plan the week's work.",
    "Birds nest along the river banks in early spring.",
    "The annual report is usually published in the autumn.",
    "A small café near the entrance serves coffee and bread.",
    "The gardens were redesigned by a team of volunteers.",
    "Heavy rain sometimes closes the northern footpath.",
    "The library next door holds a large collection of letters.",
    "School groups visit the site several times a year.",
    "The original plans were drawn up by a regional office.",
]
TEMPLATES = [  # (fact, question, answer kind)
    (
        "The access code of vault {name} is {code}.",
        "What is the access code of vault {name}?",
        "code",
    ),
    (
        "The expedition {name} set out from the port of {city}.",
        "From which port did the expedition {name} set out?",
        "city",
    ),
    ("The statue of {name} is made of {metal}.", "What is the statue of {name} made of?", "metal"),
]


def make_name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()


def make_passage(i: int, rng: random.Random) -> dict:
    fact, question, kind = rng.choice(TEMPLATES)
    name = make_name(rng)
    value = {
        "code": str(rng.randint(1000, 9999)),
        "city": rng.choice(CITIES),
        "metal": rng.choice(METALS),
    }[kind]
    fields = {"name": name, "code": value, "city": value, "metal": value}
    sentences = rng.sample(FILLER, rng.randint(4, 7))
    sentences.insert(rng.randint(0, len(sentences)), fact.format(**fields))
    text = " ".join(sentences)
    doc = f"synth-{i}"
    return {
        "doc_id": doc, "title": doc, "text": text, "question": question.format(**fields),
        "answers": [value], "question_id": f"{doc}-q", "answer_starts": [text.index(value)],
        "kind": kind,
    }  # fmt: skip


def generate(n_train: int, n_validation: int, n_eval: int, seed: int = 0) -> tuple[list, dict]:
    """Records and the split (titles = doc ids) of n_train + n_validation + n_eval passages."""
    rng = random.Random(seed)
    records = [make_passage(i, rng) for i in range(n_train + n_validation + n_eval)]
    titles = [r["title"] for r in records]
    split = {
        "source": f"models/synthetic.py, seed {seed}",
        "train": titles[:n_train],
        "validation": titles[n_train : n_train + n_validation],
        "eval": titles[n_train + n_validation :],
    }
    return records, split


def by_kind(records: list[dict], predictions: dict[str, dict[str, str]]) -> dict:
    """Exact match (percent) and questions of each mode's kept answers (``evaluate
    --predictions``), by kind of fact: ``{mode: {kind: (em, n)}}``."""
    from knowstream.models.evaluate import exact_match

    kinds = {r["question_id"]: (r["kind"], r["answers"][0]) for r in records}
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for mode, preds in predictions.items():
        hits: dict[str, list[float]] = {}
        for qid, pred in preds.items():
            kind, gold = kinds[qid]
            hits.setdefault(kind, []).append(exact_match(pred, gold))
        out[mode] = {k: (100 * sum(v) / len(v), len(v)) for k, v in sorted(hits.items())}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--n-validation", type=int, default=200)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--by-kind", type=Path, help="an evaluation JSON with --predictions: its exact match "
        "by kind of fact, over OUT_DIR/facts.jsonl (nothing is written)",
    )  # fmt: skip
    a = p.parse_args()
    if a.by_kind:
        facts = a.out_dir / "facts.jsonl"
        if not facts.is_file() or not a.by_kind.is_file():
            p.error(f"--by-kind needs {facts} (generate it first) and {a.by_kind}")
        with facts.open() as f:
            records = [json.loads(line) for line in f]
        predictions = json.loads(a.by_kind.read_text()).get("predictions")
        if not predictions:
            p.error(f"{a.by_kind} keeps no answers: evaluate with --predictions")
        known = {r["question_id"] for r in records}
        if any(q not in known for preds in predictions.values() for q in preds):
            p.error(f"{a.by_kind} answers questions that {facts} does not hold")
        table = by_kind(records, predictions)
        for mode, row in table.items():
            cells = ", ".join(f"{k} {em:.1f}% of {n}" for k, (em, n) in row.items())
            print(f"{mode:18s} {cells}")
        return
    records, split = generate(a.n_train, a.n_validation, a.n_eval, a.seed)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    with (a.out_dir / "facts.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (a.out_dir / "split.json").write_text(json.dumps(split) + "\n")
    print(f"{len(records)} passages -> {a.out_dir}")


if __name__ == "__main__":
    main()
