"""Console output shared by the CLI and the demo flow: query results, snapshot tables."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

# Tables stay readable when output goes to a file or CI log (rich assumes 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 140)

SNAPSHOT_COLUMNS = (
    "version",
    "parent",
    "kind",
    "state",
    "created",
    "docs",
    "chunks",
    "triples",
    "offsets",
    "live",
)


def _cell(value: object) -> str:
    if value is None or value is False:
        return ""
    return "✔" if value is True else str(value)


def snapshot_table(rows: list[dict]) -> Table:
    table = Table(title="memory snapshots")
    for col in SNAPSHOT_COLUMNS:
        table.add_column(col)
    for r in rows:
        table.add_row(*(_cell(r[c]) for c in SNAPSHOT_COLUMNS))
    return table


def print_result(result) -> None:
    console.print(
        f"[bold]Q:[/bold] {result.question}   [dim](memory version {result.version})[/dim]"
    )
    table = Table(show_lines=False)
    for col in ("score", "doc", "evidence"):
        table.add_column(col)
    for i, h in enumerate(result.hits):
        # The best hit in full (it is the evidence people read); the rest shortened.
        text = h.text if i == 0 or len(h.text) < 120 else h.text[:117] + "..."
        table.add_row(f"{h.score:.3f}", h.doc_id, text)
    console.print(table)
    for t in result.triples[:3]:
        console.print(
            f"  triple: ({t['subject']}, {t['relation']}, {t['object']})  [dim]{t['doc_id']}[/dim]"
        )
