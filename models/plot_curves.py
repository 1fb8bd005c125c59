"""Plot the train/validation loss curves of a MAC training run's metrics.json.

.venv/bin/python -m knowstream.models.plot_curves RUN/metrics.json OUT.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(metrics_path: str, out: str) -> None:
    m = json.load(open(metrics_path))
    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [r for r in m["train"] if r["step"] > 1]
    ax.plot(
        [r["step"] for r in tr],
        [r.get("gold_nll", r.get("qa_loss", r["loss"])) for r in tr],
        label="train answer NLL (bank = curriculum size)",
    )
    va = m["val"]
    ax.plot([r["step"] for r in va], [r["gold"] for r in va], "o-", label="validation, gold entry")
    ax.plot(
        [r["step"] for r in va], [r["wrong"] for r in va], "x--", label="validation, wrong entry"
    )
    with_passages = (
        ("rag_gold", "s-", "own entries, passages in the prompt"),
        ("rag_wrong", "+--", "wrong entries, passages in the prompt"),
        ("miss_gold", "d-", "own entries, own passage left out"),
        ("miss_wrong", "1--", "wrong entries, own passage left out"),
    )
    for key, style, what in with_passages:  # mac+rag training, rag_miss
        if va and key in va[0]:
            ax.plot(
                [r["step"] for r in va], [r[key] for r in va], style, label=f"validation, {what}"
            )
    for r in tr:
        if tr.index(r) and r["bank"] != tr[tr.index(r) - 1]["bank"]:
            ax.axvline(r["step"], color="grey", lw=0.5)
            ax.text(
                r["step"] + 5,
                0.02,
                f"bank {r['bank']}",
                fontsize=7,
                transform=ax.get_xaxis_transform(),
                rotation=90,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("answer NLL (nats/token)")
    cfg = m["config"]
    data = [Path(x).name for x in [cfg["squad"], *cfg["extra"].split(",")] if x]
    trained = m.get("n_trained_params", m["n_params"])
    ax.set_title(f"MAC on {' + '.join(data)} ({m['device']}, {trained / 1e6:.2f}M trained)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    plot(sys.argv[1], sys.argv[2])
