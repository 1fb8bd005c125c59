"""`knowstream retrieve`: the hits file of one split, with the real chunker and MiniLM."""

from __future__ import annotations

import json
import subprocess
import sys

PASSAGES = {
    "Vaults": "The access code of vault Orion is 4821. The vault sits under the old mill.",
    "Rivers": "The river Tamsin floods every April. Its delta feeds the salt marshes.",
}


def test_retrieve_writes_each_questions_hits(tmp_path):
    rows = [
        {"doc_id": "v0", "title": "Vaults", "text": PASSAGES["Vaults"],
         "question": "What is the access code of vault Orion?", "answers": ["4821"]},
        {"doc_id": "r0", "title": "Rivers", "text": PASSAGES["Rivers"],
         "question": "When does the river Tamsin flood?", "answers": ["every April"]},
    ]  # fmt: skip
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"eval": ["Vaults", "Rivers"], "validation": [], "train": []}))
    out = tmp_path / "hits.json"
    argv = [sys.executable, "-m", "knowstream.cli", "retrieve", "--data", str(data),
            "--split-file", str(split), "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    hits = json.loads(out.read_text())
    owners = [doc for doc, _ in hits["chunks"]]
    assert sorted(set(owners)) == ["r0", "v0"]
    # each question's best chunk is from its own passage
    assert {owners[h[0]] for h in hits["hits"].values()} == {"v0", "r0"}
    assert "gold passage: 1.000" in " ".join(done.stdout.split())
    # the coverage table: each gold document and its answer are in the top chunk
    again = subprocess.run([*argv, "--coverage"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads(out.read_text()) == hits  # --coverage only reads the file
    row = next(line for line in again.stdout.splitlines() if "@1" in line)
    assert [cell.strip() for cell in row.split("│")[2:5]] == ["100.0%", "100.0%", "0.0%"]
