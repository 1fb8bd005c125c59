"""`python -m knowstream.models.fit_selector`: the bundled checkpoint's selector trained to
pick the passage that answers among its article's passages (real MiniLM on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

from knowstream.models.encoder import load_encoder
from knowstream.models.inference import bundled_checkpoint
from knowstream.models.mac import MAC
from knowstream.models.qa_data import load_qa
from knowstream.models.retrieve import retrieve

PASSAGES = {
    ("Vaults", "v0"): ("The access code of vault Orion is 4821.", "What is Orion's access code?"),
    ("Vaults", "v1"): ("Vault Lyra was sealed in 1911 by the mayor.", "When was Lyra sealed?"),
    ("Rivers", "r0"): ("The river Tamsin floods every April.", "When does the Tamsin flood?"),
    ("Rivers", "r1"): ("The river Orne carries salt to the marshes.", "What does the Orne carry?"),
}


def write(tmp_path):
    rows = [
        {"doc_id": d, "title": t, "text": text, "question": q, "answers": ["x"],
         "question_id": f"q-{d}"}
        for (t, d), (text, q) in PASSAGES.items()
    ]  # fmt: skip
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [], "validation": ["Vaults", "Rivers"], "eval": []}))
    hits = tmp_path / "hits.json"
    hits.write_text(json.dumps(retrieve(load_qa(data), load_encoder())))
    return data, split, hits


def test_fit_writes_a_new_checkpoint_with_the_trained_selector(tmp_path):
    data, split, hits = write(tmp_path)
    out = tmp_path / "ckpt"
    argv = [sys.executable, "-m", "knowstream.models.fit_selector",
            "--checkpoint", str(bundled_checkpoint()), "--data", str(data),
            "--val-data", str(data), "--split-file", str(split), "--val-retrieval", str(hits),
            "--k", "2", "--epochs", "2", "--lr", "0.05", "--batch", "2",
            "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    fitted, shipped = MAC.load(out), MAC.load(bundled_checkpoint())
    assert fitted.config.select_top == 1 and fitted.version != shipped.version
    log = json.loads((out / "fit_selector.json").read_text())
    assert log["from"] == shipped.version and log["version"] == fitted.version
    assert [c["epoch"] for c in log["curve"]] == [0, 1, 2]
    assert all(0 <= c["selector_top1"] <= c["gold_banked"] <= 1 for c in log["curve"])
    # Only the selector changed: every other weight is the shipped one.
    same = shipped.state_dict()
    for name, w in fitted.state_dict().items():
        if not name.startswith("aggregator."):
            assert w.equal(same[name]), name


def test_a_missing_file_is_one_line(tmp_path):
    argv = [sys.executable, "-m", "knowstream.models.fit_selector", "--checkpoint", "nope",
            "--data", "nope.jsonl", "--val-data", "nope.jsonl", "--val-retrieval", "nope.json",
            "--out", str(tmp_path / "o")]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.splitlines()[-1].endswith(
        "no such file or folder: nope"
    )
