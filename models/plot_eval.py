"""Bar chart of an evaluation JSON (models/evaluate.py): F1 per mode with its 95%
interval, each MAC mode drawn next to its wrong-passage control.

    .venv/bin/python -m knowstream.models.plot_eval RESULT.json OUT.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from knowstream.models.evaluate import CONTROL, parse_mode  # noqa: E402

COLORS = {  # one colour per family; controls are hatched in the same colour
    "closed_book": "#888888",
    "gold_passage": "#2b8a3e",
    "rag": "#1c7ed6",
    "mac_gold": "#e8590c",
    "mac": "#e8590c",
    "mac+rag": "#7048e8",
    "task_closed_book": "#555555",  # the same modes after the shared task prompt
    "task_gold_passage": "#1b5e20",
    "task_rag": "#0b4f9c",
}
CONTROL_OF = {control: mode for mode, control in CONTROL.items()}  # control -> a mode it controls


def plot(result_path: str, out: str) -> None:
    res = json.loads(open(result_path).read())
    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(rows)), 4.5))
    for i, (mode, row) in enumerate(rows.items()):
        name, _ = parse_mode(mode)
        control = name in CONTROL_OF
        color = COLORS[CONTROL_OF.get(name, name)]
        lo, hi = row["f1_ci"]
        ax.bar(
            i,
            row["f1"],
            color="white" if control else color,
            edgecolor=color,
            hatch="//" if control else None,
            yerr=[[row["f1"] - lo], [hi - row["f1"]]],
            capsize=3,
        )
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(list(rows), rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("SQuAD F1 (95% bootstrap CI)")
    ax.set_title(
        f"{res['split']} articles, n = {res['n']}, {res['mac_version'] or ''} on {res['device']}"
        "\nhatched: wrong-passage control of the bar to its left",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="F1 per mode of an evaluation result, as a PNG")
    p.add_argument("result", help="result JSON of `knowstream eval --out` / models/evaluate.py")
    p.add_argument("out", help="the PNG to write")
    a = p.parse_args(argv)
    plot(a.result, a.out)


if __name__ == "__main__":
    main()
