"""`python -m knowstream.models.evaluate --predictions`: every answer kept, and the row's
scores are those answers' scores (real SmolLM2 on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from knowstream.models.encoder import load_encoder
from knowstream.models.evaluate import squad_scores
from knowstream.models.inference import bundled_checkpoint
from knowstream.models.qa_data import load_qa
from knowstream.models.retrieve import retrieve

ROWS = [
    {"doc_id": "v0", "title": "Vaults", "question_id": "q-vault",
     "text": "The access code of vault Orion is 4821. The vault sits under the old mill.",
     "question": "What is the access code of vault Orion?", "answers": ["4821"]},
    {"doc_id": "r0", "title": "Rivers", "question_id": "q-river",
     "text": "The river Tamsin floods every April. Its delta feeds the salt marshes.",
     "question": "When does the river Tamsin flood?", "answers": ["every April"]},
]  # fmt: skip


def write_eval_split(tmp_path):
    """ROWS as a data file whose two articles are the split's eval articles."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"eval": ["Vaults", "Rivers"], "validation": [], "train": []}))
    return data, split


def test_predictions_are_kept_per_question_and_scored(tmp_path):
    data, split = write_eval_split(tmp_path)
    out = tmp_path / "eval.json"
    argv = [sys.executable, "-m", "knowstream.models.evaluate", "--data", str(data),
            "--split-file", str(split), "--modes", "gold_passage,closed_book", "--device", "cpu",
            "--predictions", "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "predictions" not in done.stdout  # the summary stays short
    result = json.loads(out.read_text())
    answers = {r["question_id"]: r["answers"] for r in ROWS}
    for mode in ("gold_passage", "closed_book"):
        preds = result["predictions"][mode]
        assert set(preds) == set(answers)
        f1 = [squad_scores(p, answers[q])[1] * 100 for q, p in preds.items()]
        assert result["rows"][mode]["f1"] == pytest.approx(sum(f1) / len(f1))


def test_lm_bank_selection_banks_one_entry_for_mode_and_control(tmp_path):
    data, split = write_eval_split(tmp_path)
    hits = tmp_path / "hits.json"
    hits.write_text(json.dumps(retrieve(load_qa(data), load_encoder())))
    out = tmp_path / "eval.json"
    argv = [sys.executable, "-m", "knowstream.models.evaluate", "--data", str(data),
            "--split-file", str(split), "--modes", "mac+rag@2,mac+rag_wrong@2,mac+rag_gold@2",
            "--checkpoint", str(bundled_checkpoint()), "--retrieval", str(hits),
            "--device", "cpu", "--bank-select", "lm", "--predictions",
            "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["bank_select"] == "lm"
    # Both documents are retrieved for each question; the LM scores its own passage best,
    # so its entry alone is banked: the same prompt and prefix as mac+rag_gold@2.
    preds = result["predictions"]
    assert preds["mac+rag@2"] == preds["mac+rag_gold@2"]
    assert set(preds["mac+rag_wrong@2"]) == set(preds["mac+rag@2"])


def test_an_unknown_mode_is_one_line():
    argv = [sys.executable, "-m", "knowstream.models.evaluate", "--data", "any.jsonl",
            "--modes", "mac+rag_gold"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("evaluate.py: error: unknown mode 'mac+rag_gold'")


def test_rung1_by_kind_refuses_a_result_without_kept_answers(tmp_path):
    synth = [sys.executable, "-m", "knowstream.models.synthetic", "--out-dir", str(tmp_path)]
    assert subprocess.run([*synth, "--n-train", "5"], capture_output=True).returncode == 0
    result = tmp_path / "eval.json"
    result.write_text(json.dumps({"rows": {}, "paired_f1": {}}))  # run without --predictions
    done = subprocess.run([*synth, "--by-kind", str(result)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines()[-1].endswith("keeps no answers: evaluate with --predictions")
