"""Retrieval for evaluation: each question's top chunks among a split's passages.

The pipeline's own parts do the work: passages are cut by the "chunk" stage's
``chunk_spans`` (``models/chunking.py``; 128 word pieces, 32 shared, the Settings
defaults) and chunks and questions are embedded by the "embed" stage's MiniLM
(L2-normalized mean pooling). Ranking is exact cosine similarity, which is what Qdrant's exact
search returns for the same vectors, so the RAG and MAC-over-retrieved rows of
EVAL.md see the evidence ``/ask`` would see, without a broker or a store.

The result is a plain JSON file, so it can be computed once on a CPU machine and
carried along:

    python -m knowstream.models.retrieve --data ../shared/data/squad_v1.1/dev.jsonl \
        --split-file data/splits/squad_v1.1.json --split eval --out retrieval-eval.json

    {"top": 50, "chunks": [[doc_id, chunk_text], ...], "hits": {question_id: [chunk index,
     ...best first]}}

It also reports the file's ``coverage`` at k = 1, 3, 5; with ``--coverage`` it only
reads an existing file and reports that. ``--oracle HITS`` writes a diagnostic file
instead (``oracle``): each question's gold passage whole as its first hit, then the other
documents of its top 3 in HITS without text. At @1 the prompt is the gold passage and the
bank its entry; at @3 the prompt is the same and the bank as retrieval fills it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from knowstream.models.chunking import chunk_spans
from knowstream.models.qa_data import QA, load_qa, load_split, passages, select

TOP = 50  # hits kept per question: enough for k <= 10 distinct documents, and for retention
# runs that drop the hits of documents not yet streamed


def rank_chunks(
    docs: dict[str, str],
    questions: list[str],
    encoder,
    top: int | None = TOP,
    chunk_tokens: int = 128,
    chunk_overlap: int = 32,
) -> tuple[list[tuple[str, str]], np.ndarray]:
    """``docs`` (doc_id -> text) cut into (doc_id, chunk text) chunks, and each question's
    ``top`` best chunk indices (all of them for None), best first."""
    chunks: list[tuple[str, str]] = []
    for doc_id, text in docs.items():
        for s in chunk_spans(text, encoder.tokenizer, chunk_tokens, chunk_overlap):
            chunks.append((doc_id, text[s.char_start : s.char_end]))
    chunk_emb = encoder.embed([t for _, t in chunks])
    q_emb = encoder.embed(questions)
    scores = q_emb @ chunk_emb.T  # cosine: both sides are L2-normalized
    return chunks, np.argsort(-scores, axis=1, kind="stable")[:, :top]


def retrieve(
    records: list[QA], encoder, top: int = TOP, chunk_tokens: int = 128, chunk_overlap: int = 32
) -> dict:
    """The records' passages cut into chunks, and each question's ``top`` best chunks
    (the file format above)."""
    questions = [r.question for r in records]
    chunks, best = rank_chunks(
        passages(records), questions, encoder, top, chunk_tokens, chunk_overlap
    )
    return {
        "top": top,
        "chunks": chunks,
        "hits": {r.question_id: row.tolist() for r, row in zip(records, best, strict=True)},
    }


def ranked_hits(result: dict) -> dict[str, list[tuple[str, str]]]:
    """question_id -> its ranked (doc_id, chunk text) hits, from ``retrieve``'s result."""
    chunks = [(doc_id, text) for doc_id, text in result["chunks"]]
    return {q: [chunks[j] for j in hits] for q, hits in result["hits"].items()}


def load_retrieval(path: str | Path) -> dict[str, list[tuple[str, str]]]:
    """``ranked_hits`` of a file written by this module."""
    return ranked_hits(json.loads(Path(path).read_text()))


def top_docs(hits: list[tuple[str, str]], k: int) -> list[str]:
    """The first ``k`` distinct documents among ranked chunk hits."""
    return list(dict.fromkeys(doc for doc, _ in hits))[:k]


def shown(record: QA, hits: list[tuple[str, str]], k: int) -> tuple[bool, bool]:
    """What an ``@k`` mode shows for one question's ranked hits: its gold document's entry
    in the bank, and an answer string in the prompt's chunks."""
    entry = record.doc_id in top_docs(hits, k)
    answer = any(a in text for _, text in hits[:k] for a in record.answers)
    return entry, answer


def coverage(records: list[QA], hits: dict[str, list[tuple[str, str]]], k: int) -> dict:
    """Fractions of questions whose top-k hits hold, as ``@k`` modes serve them: the gold
    document among the bank's k documents (``gold_entry``), an answer string in the prompt's
    k chunks (``answer_in_prompt``), and the first without the second (``entry_only``): the
    only questions where the own entry can add an answer the prompt lacks."""
    entry, prompt = np.array([shown(r, hits[r.question_id], k) for r in records]).T
    return {
        "gold_entry": float(entry.mean()),
        "answer_in_prompt": float(prompt.mean()),
        "entry_only": float((entry & ~prompt).mean()),
    }


def oracle(records: list[QA], hits: dict[str, list[tuple[str, str]]], k: int = 3) -> dict:
    """A hits file (``retrieve``'s format) whose first hit is each question's gold passage,
    followed by the other documents of its top ``k`` in ``hits`` as empty chunks."""
    chunks: list[tuple[str, str]] = []
    rows: dict[str, list[int]] = {}
    for r in records:
        others = [d for d in top_docs(hits[r.question_id], k) if d != r.doc_id][: k - 1]
        rows[r.question_id] = list(range(len(chunks), len(chunks) + 1 + len(others)))
        chunks += [(r.doc_id, r.text), *((d, "") for d in others)]
    return {"top": k, "chunks": chunks, "hits": rows}


def coverage_report(
    data: str | Path, split_file: str | Path, split: str, hits_file: str | Path
) -> dict[str, dict]:
    """``coverage`` at k = 1, 3, 5 of a hits file over its split's questions."""
    hits = load_retrieval(hits_file)
    records = [
        r for r in select(load_qa(data), load_split(split_file)[split]) if r.question_id in hits
    ]
    return {f"@{k}": coverage(records, hits, k) for k in (1, 3, 5)}


def retrieve_split(
    data: str | Path, split_file: str | Path, split: str, out: str | Path, top: int = TOP
) -> tuple[int, float]:
    """Write the hits of one split's questions to ``out``; returns (questions, the
    fraction whose top-1 chunk comes from the gold passage)."""
    from knowstream.models.encoder import load_encoder

    records = select(load_qa(data), load_split(split_file)[split])
    result = retrieve(records, load_encoder(), top)
    Path(out).write_text(json.dumps(result))
    chunks, hits = result["chunks"], result["hits"]
    hit1 = float(np.mean([chunks[hits[r.question_id][0]][0] == r.doc_id for r in records]))
    return len(records), hit1


def main() -> None:
    p = argparse.ArgumentParser(description="top chunks per question of a split (JSON)")
    p.add_argument("--data", required=True, help="SQuAD-format JSONL (.gz ok)")
    p.add_argument("--split-file", default="data/splits/squad_v1.1.json")
    p.add_argument("--split", default="eval", choices=["train", "validation", "eval"])
    p.add_argument("--top", type=int, default=TOP)
    p.add_argument("--out", required=True)
    p.add_argument("--coverage", action="store_true", help="report the hits already in --out")
    p.add_argument("--oracle", default=None, help="write the oracle of this hits file to --out")
    a = p.parse_args()
    if a.oracle:
        records = select(load_qa(a.data), load_split(a.split_file)[a.split])
        Path(a.out).write_text(json.dumps(oracle(records, load_retrieval(a.oracle))))
    elif not a.coverage:
        n, hit1 = retrieve_split(a.data, a.split_file, a.split, a.out, a.top)
        print(f"{n} questions, top-1 chunk from the gold passage: {hit1:.3f}")
    for at, row in coverage_report(a.data, a.split_file, a.split, a.out).items():
        print(at, json.dumps({m: round(v, 4) for m, v in row.items()}))


if __name__ == "__main__":
    main()
