"""Question-answering data for training and evaluating MAC (SQuAD-format JSONL).

Every reader takes the data's path as an argument; nothing here knows where
the shared data lives. One JSON object per line, as in SQuAD v1.1 dev
(``squad_v1.1/dev.jsonl``) and SQuADShifts (``squadshifts/*.jsonl``):
``doc_id`` (one passage), ``title`` (its article), ``text`` (the passage),
``question`` and ``answers`` (all reference answers; the first is the one
trained on). ``question_id`` and ``answer_starts`` are optional; ``gold: false``
marks an answer written by the LM itself (self-QA, ``models/selfqa.py``). Files may be
gzip-compressed (``.gz``).

The SQuAD split is by *article* (title): ``make_split`` ranks the titles by
the sha256 of the title and takes the first ``n_eval`` for eval, the next
``n_validation`` for validation and the rest for train. The lists are committed
in ``data/splits/squad_v1.1.json``; regenerate them with

    .venv/bin/python -m knowstream.models.qa_data split ../shared/data/squad_v1.1/dev.jsonl \
        data/splits/squad_v1.1.json
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class QA:
    doc_id: str
    title: str
    text: str
    question: str
    answers: tuple[str, ...]
    question_id: str = ""
    gold: bool = True  # False: the answer is the LM's own (self-QA), not a human reference


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open()


def load_qa(path: str | Path) -> list[QA]:
    """All records of one JSONL file (plain or .gz), in file order."""
    out = []
    with _open(Path(path)) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            r = json.loads(line)
            out.append(
                QA(
                    doc_id=r["doc_id"],
                    title=r["title"],
                    text=r["text"],
                    question=r["question"],
                    answers=tuple(r["answers"]),
                    question_id=str(r.get("question_id", f"{r['doc_id']}#{i}")),
                    gold=bool(r.get("gold", True)),
                )
            )
    return out


def make_split(records: list[QA], n_eval: int = 10, n_validation: int = 4) -> dict:
    """Article-level split, deterministic: titles ranked by sha256(title)."""
    titles = sorted(
        {r.title for r in records}, key=lambda t: hashlib.sha256(t.encode()).hexdigest()
    )
    assert len(titles) > n_eval + n_validation, "not enough articles to split"
    split = {
        "eval": sorted(titles[:n_eval]),
        "validation": sorted(titles[n_eval : n_eval + n_validation]),
        "train": sorted(titles[n_eval + n_validation :]),
    }
    counts = {k: sum(r.title in set(v) for r in records) for k, v in split.items()}
    return {
        "source": "SQuAD v1.1 dev (dev-v1.1.json), one record per question",
        "rule": (
            "titles ranked by sha256(title) hex digest: first "
            f"{n_eval} -> eval, next {n_validation} -> validation, rest -> train"
        ),
        "questions": counts,
        **split,
    }


def load_split(path: str | Path) -> dict[str, list[str]]:
    """``{"train": [...], "validation": [...], "eval": [...]}`` article titles."""
    d = json.loads(Path(path).read_text())
    return {k: d[k] for k in ("train", "validation", "eval")}


def select(records: list[QA], titles: list[str]) -> list[QA]:
    """The records whose article is one of ``titles``."""
    keep = set(titles)
    return [r for r in records if r.title in keep]


def passages(records: list[QA]) -> dict[str, str]:
    """doc_id -> passage text, in first-seen order."""
    out: dict[str, str] = {}
    for r in records:
        out.setdefault(r.doc_id, r.text)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="write the article split of a SQuAD-format JSONL file")
    s.add_argument("data", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--n-eval", type=int, default=10)
    s.add_argument("--n-validation", type=int, default=4)
    a = p.parse_args()
    split = make_split(load_qa(a.data), a.n_eval, a.n_validation)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(split, indent=2) + "\n")
    print(a.out, split["questions"])


if __name__ == "__main__":
    main()
