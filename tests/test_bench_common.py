"""The shared benchmark helpers (bench/_common.py) and bench/amortize.py's pure parts."""

from __future__ import annotations

import base64
import gzip
import json
import time

import numpy as np
import pytest

from bench import _common as common
from bench import amortize as bench_amortize

pytestmark = pytest.mark.fast  # needs no service: the `make test-fast` tier


def write_rows(path, rows):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


ROWS = [
    {"doc_id": "a", "title": "A", "text": "Alpha text.", "question": "q1?", "answers": ["x"]},
    {"doc_id": "a", "title": "A", "text": "Alpha text.", "question": "q2?", "answers": ["y"]},
    {"doc_id": "b", "title": "B", "text": "Beta text.", "question": "q3?", "answers": ["z"]},
    {"doc_id": "c", "title": "C", "text": "  ", "question": "q4?", "answers": []},
    {"doc_id": "d", "title": "D", "text": "Delta.", "op": "delete"},
]


@pytest.mark.parametrize("name", ["dev.jsonl", "dev.jsonl.gz"])
def test_load_documents_dedupes_by_doc_id(tmp_path, name):
    path = write_rows(tmp_path / name, ROWS)
    docs = common.load_documents(path, 10)
    assert [d["doc_id"] for d in docs] == ["a", "b"]  # blank text and deletes skipped
    assert docs[0] == {"doc_id": "a", "title": "A", "text": "Alpha text.", "op": "upsert"}
    assert len(common.load_documents(path, 1)) == 1


def test_load_questions_spreads_over_documents(tmp_path):
    path = write_rows(tmp_path / "dev.jsonl", ROWS)
    qs = common.load_questions(path, {"a", "b"}, 2)
    assert [q["question"] for q in qs] == ["q1?", "q3?"]  # one per doc before a second
    assert [q["question"] for q in common.load_questions(path, {"a", "b"}, 9)] == [
        "q1?",
        "q3?",
        "q2?",
    ]
    assert qs[1] == {"doc_id": "b", "question": "q3?", "answers": ["z"]}


def test_percentile_matches_numpy():
    values = [0.3, 0.1, 0.9, 0.5, 0.7, 0.2, 0.4]
    for q in (0, 50, 95, 100):
        assert common.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    with pytest.raises(ValueError):
        common.percentile([], 50)


def test_instrumented_times_and_restores():
    class Owner:
        @staticmethod
        def work(x):
            time.sleep(0.01)
            return x + 1

    original = Owner.work
    timer = common.StepTimer()
    with common.instrumented(timer, [(Owner, "work", "work")]):
        assert Owner.work(1) == 2 and Owner.work(2) == 3
    assert Owner.work is original
    assert timer.calls["work"] == 2 and timer.seconds["work"] > 0
    assert set(timer.take()) == {"work"} and timer.take() == {}


def test_ask_latency_timing_targets_exist():
    from bench import ask_latency

    for owner, attr, _ in ask_latency.timing_targets():
        assert callable(getattr(owner, attr)), f"{owner}.{attr}"


def test_machine_info_and_header():
    info = common.machine_info(["numpy", "no-such-package-xyz"])
    assert info["versions"]["no-such-package-xyz"] == "not installed"
    assert info["cores"] >= 1 and isinstance(info["gpus"], list)
    assert info["versions"]["numpy"] == np.__version__


def test_amortize_padding_counts():
    windows = [[0] * 10, [0] * 100, [0] * 12, [0] * 98]
    assert bench_amortize.padding(windows, 2, sort=False) == (220, 396)  # 2x100 + 2x98
    assert bench_amortize.padding(windows, 2, sort=True) == (220, 224)  # 2x12 + 2x100
    assert bench_amortize.padding(windows, 4, sort=True) == (220, 400)


def test_amortize_lm_ids_cut_as_the_lm_reader_does():
    """The "lm" raw path reads LM ids as LMAmortizer.amortize_texts: at most max_doc_tokens,
    an empty text one EOS."""

    class Tokenizer:
        eos_token_id = 2

        def __call__(self, texts, add_special_tokens, verbose):
            return {"input_ids": [[7] * len(t.split()) for t in texts]}

    ids = bench_amortize.lm_ids(Tokenizer(), ["a b c d e", "", "a b"], max_doc_tokens=3)
    assert ids == [[7, 7, 7], [2], [7, 7]]


def test_amortize_entry_bytes():
    data = np.zeros((16, 576), dtype=np.float16).tobytes()
    row = {
        "amortizer_version": "mac-0123456789ab",
        "shape": [16, 576],
        "dtype": "float16",
        "data": data,
        "checksum": "0" * 64,
    }
    b = bench_amortize.entry_bytes(row)
    assert b["vector_float16"] == 18_432
    assert b["base64_data"] == len(base64.b64encode(data)) == 24_576
    assert b["base64_data"] < b["qdrant_modulation_payload_json"] < b["base64_data"] + 300


def test_amortize_windows_match_amortize_texts():
    """The raw path cuts documents exactly as Amortizer.amortize_texts does."""
    from knowstream.models.encoder import MAX_TOKENS, load_encoder

    tok = load_encoder().tokenizer
    texts = ["word " * 600, "short one"]
    windows, owner = bench_amortize.windows_of(tok, texts)
    assert owner == [0, 0, 0, 1]
    assert all(len(w) <= MAX_TOKENS for w in windows)
    assert windows[0][0] == tok.cls_token_id and windows[0][-1] == tok.sep_token_id
    assert bench_amortize.pyarrow_stand_in() is False  # installed here: nothing replaced
