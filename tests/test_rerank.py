"""`models/rerank.py`: the frozen SmolLM2's query likelihood of a question after each
banked document (real LM on CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from knowstream.models.inference import load_models
from knowstream.models.rerank import best_documents, question_likelihood

DOCS = [
    "Bees make honey from the nectar of flowers and store it in wax combs.",
    "Paris is the capital and largest city of France, on the river Seine.",
    "The bank vault was sealed behind a steel door in 1911.",
]


@pytest.fixture(scope="module")
def lm():
    model, tokenizer, _ = load_models("cpu", encoder=False)
    return model, tokenizer


def test_the_document_that_answers_scores_highest(lm):
    for question, gold in (("What is the capital of France?", 1), ("What do bees make?", 0)):
        scores = question_likelihood(*lm, [(d, question) for d in DOCS])
        assert max(range(len(DOCS)), key=scores.__getitem__) == gold
        assert all(s < 0 for s in scores)  # mean log-probabilities


def test_best_documents_are_picked_per_question(lm):
    texts = {f"d{i}": d for i, d in enumerate(DOCS)}
    questions = ["What is the capital of France?", "What do bees make?", "What do bees make?"]
    candidates = [["d0", "d1", "d2"], ["d2", "d0"], ["d2"]]
    assert best_documents(*lm, questions, candidates, texts) == ["d1", "d0", "d2"]


def test_scores_do_not_depend_on_the_batch(lm):
    pairs = [(d, q) for d in DOCS for q in ("Who sealed the vault?", "Which river runs in Paris?")]
    together = question_likelihood(*lm, pairs, batch_size=len(pairs))
    alone = [question_likelihood(*lm, [p])[0] for p in pairs]
    assert together == pytest.approx(alone, abs=1e-4)


def test_a_missing_file_is_one_line(tmp_path):
    argv = [sys.executable, "-m", "knowstream.models.rerank", "--data", "nope.jsonl",
            "--retrieval", str(tmp_path / "hits.json")]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith("no such file: nope.jsonl")
