"""`python -m knowstream.models.breakdown`: questions grouped by their hits, each group's
F1 and own − control differences computed from the kept answers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from knowstream.models.breakdown import breakdown, group_of
from knowstream.models.qa_data import QA
from knowstream.models.retrieve import oracle, ranked_hits, top_docs

A = QA("a", "Alpha", "Vault Orion opens with 4821.", "Code of vault Orion?", ("4821",), "qa")
B = QA("b", "Beta", "The Tamsin floods in April.", "When does the Tamsin flood?", ("April",), "qb")
C = QA("c", "Gamma", "Gamma port trades copper.", "What does Gamma trade?", ("copper",), "qc")
CHUNKS = [("a", A.text), ("b", B.text), ("c", C.text), ("x", "Nothing here.")]
HITS = {"qa": [0, 3, 1], "qb": [3, 1, 0], "qc": [3, 0, 1]}  # indices into CHUNKS
PREDICTIONS = {
    "mac+rag@3": {"qa": "4821", "qb": "April", "qc": "tin"},
    "mac+rag_wrong@3": {"qa": "4821", "qb": "May", "qc": "tin"},
    "task_rag@3": {"qa": "4821", "qb": "May", "qc": "tin"},
}


def ranked(q: str) -> list[tuple[str, str]]:
    return [CHUNKS[j] for j in HITS[q]]


def test_groups_follow_bank_prompt_and_first_hit():
    assert group_of(A, ranked("qa"), 3) == "entry +answer +top1"
    assert group_of(B, ranked("qb"), 3) == "entry +answer"
    assert group_of(C, ranked("qc"), 3) == "no entry -answer"
    assert group_of(B, ranked("qb"), 1) == "no entry -answer"


def test_rows_hold_each_groups_f1_and_paired_difference():
    rows = breakdown([A, B, C], PREDICTIONS, {q: ranked(q) for q in HITS}, 3)
    by_group = {r["group"]: r for r in rows}
    assert set(by_group) == {"entry +answer +top1", "entry +answer", "no entry -answer", "all"}
    assert rows[-1]["group"] == "all" and rows[-1]["n"] == 3
    b = by_group["entry +answer"]
    assert b["n"] == 1
    assert b["f1"] == {"mac+rag@3": 100.0, "mac+rag_wrong@3": 0.0, "task_rag@3": 0.0}
    assert b["mac+rag@3 - mac+rag_wrong@3"] == {
        "mean": 100.0,
        "answers_differ": 1.0,
        "better": 1.0,
        "worse": 0.0,
    }
    assert by_group["all"]["mac+rag@3 - mac+rag_wrong@3"]["better"] == pytest.approx(1 / 3)
    assert by_group["entry +answer +top1"]["mac+rag@3 - mac+rag_wrong@3"]["answers_differ"] == 0.0
    assert "task_rag@3 - mac+rag_wrong@3" not in b  # only MAC modes beside their controls


def test_oracle_puts_the_gold_passage_first_and_keeps_the_retrieved_bank():
    hits = {q: ranked(q) for q in HITS}
    result = ranked_hits(json.loads(json.dumps(oracle([A, B, C], hits, k=3))))
    assert result["qa"] == [("a", A.text), ("x", ""), ("b", "")]
    assert result["qc"] == [("c", C.text), ("x", ""), ("a", "")]  # gold first, not retrieved
    for r in (A, B, C):
        assert result[r.question_id][0] == (r.doc_id, r.text)  # @1: gold passage, own entry
        assert set(top_docs(result[r.question_id], 3)) - {r.doc_id} <= set(
            top_docs(hits[r.question_id], 3)
        )  # @3: the rest of the bank is what retrieval banked


@pytest.fixture
def files(tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [
        {"doc_id": r.doc_id, "title": r.title, "text": r.text, "question": r.question,
         "answers": list(r.answers), "question_id": r.question_id}
        for r in (A, B, C)
    ]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    split = tmp_path / "split.json"
    split.write_text(
        json.dumps({"train": [], "validation": [], "eval": ["Alpha", "Beta", "Gamma"]})
    )
    hits = tmp_path / "hits.json"
    hits.write_text(json.dumps({"top": 3, "chunks": CHUNKS, "hits": HITS}))
    return tmp_path, data, split, hits


def run(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "knowstream.models.breakdown", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_prints_the_table_and_the_rung0_questions(files):
    tmp, data, split, hits = files
    ev = tmp / "eval.json"
    ev.write_text(json.dumps({"predictions": PREDICTIONS}))
    out = tmp / "rows.json"
    done = run("--eval", str(ev), "--retrieval", str(hits), "--data", str(data),
               "--split-file", str(split), "--rung0-docs", "3", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| entry +answer | 1 | 100.00 | 0.00 | 0.00 | +100.00 (100%; 100%, 0%) |" in done.stdout
    result = json.loads(out.read_text())
    # All three passages drawn: the rung 0 questions are all of them.
    assert result["rung0_questions"]["mac+rag@3 - mac+rag_wrong@3"]["n"] == 3
    assert result["rung0_questions"]["mac+rag@3 - mac+rag_wrong@3"]["mean"] == pytest.approx(
        100 / 3
    )


def test_cli_reads_the_questions_a_sampled_eval_answered(files):
    tmp, data, split, hits = files
    ev = tmp / "eval.json"
    sampled = {m: {q: a for q, a in by_id.items() if q != "qc"} for m, by_id in PREDICTIONS.items()}
    ev.write_text(json.dumps({"predictions": sampled}))  # as `evaluate --n 2` keeps them
    out = tmp / "rows.json"
    done = run("--eval", str(ev), "--retrieval", str(hits), "--data", str(data),
               "--split-file", str(split), "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    groups = {g["group"]: g["n"] for g in json.loads(out.read_text())["groups"]}
    assert groups == {"entry +answer +top1": 1, "entry +answer": 1, "all": 2}


def test_cli_without_predictions_fails_in_one_line(files):
    tmp, data, split, hits = files
    ev = tmp / "eval.json"
    ev.write_text(json.dumps({"rows": {}}))
    done = run("--eval", str(ev), "--retrieval", str(hits), "--data", str(data),
               "--split-file", str(split))  # fmt: skip
    assert done.returncode == 2
    assert "has no predictions" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_with_a_missing_file_fails_in_one_line(files):
    tmp, data, split, hits = files
    done = run("--eval", str(tmp / "none.json"), "--retrieval", str(hits), "--data", str(data),
               "--split-file", str(split))  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith("none.json: no such file")
    assert "Traceback" not in done.stderr
