"""Progress of micro-batches on a terminal: records with rate and ETA, and per-stage counts.

The total is what was consumed plus the lag after the last batch, so the ETA
follows the backlog as it grows or shrinks. Stages report their Beam counters
(``parse.accepted``, ``chunk.chunks``, ``embed.chunks``, ``amortize.docs``, ...) once
their batch is done. Without a terminal this shows nothing: each batch logs one
line instead (``flows/observe.py``).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# Counters shown as their own rows, with each "<stage>.failed" (the rest are in the log line).
STAGES = {
    "parse.accepted": "parse: valid events",
    "parse.rejected": "parse: dead letters",
    "chunk.chunks": "chunk: chunks",
    "embed.chunks": "embed: chunks embedded",
    "triples.triples": "triples: triples",
    "amortize.docs": "amortize: memory entries",
}


class RateColumn(ProgressColumn):
    """Done per second since the task started."""

    def render(self, task) -> Text:
        return Text(f"{task.completed / task.elapsed:>7.2f}/s" if task.elapsed else "")


class BatchProgress:
    """Records (done of done + lag), batches, and a row per stage counter."""

    def __init__(self, console: Console, what: str) -> None:
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<26}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>9}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self.records = self.bar.add_task(what, total=None, rate="")
        self.batches = self.bar.add_task("batches", total=None, rate="")
        self.stages: dict[str, TaskID] = {}

    def __enter__(self) -> BatchProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def batch(self, report) -> None:
        """Count one ``flows.batch.BatchReport``."""
        done = self.bar.tasks[self.records].completed + report.messages
        total = done + sum(report.lag.values()) if report.lag else None
        self.bar.update(self.records, completed=done, total=total, rate=self._rate(self.records))
        self.bar.advance(self.batches)
        failed = {
            n: f"{n.split('.')[0]}: failed docs" for n in report.counters if n.endswith(".failed")
        }
        for name, label in {**STAGES, **failed}.items():
            if name in report.counters:
                if name not in self.stages:
                    self.stages[name] = self.bar.add_task(label, total=None, rate="")
                self.bar.advance(self.stages[name], report.counters[name])
                self.bar.update(self.stages[name], rate=self._rate(self.stages[name]))

    def _rate(self, task: TaskID) -> str:
        # Over the whole run (a stage's row appears only after its first batch).
        elapsed = self.bar.tasks[self.records].elapsed
        return f"{self.bar.tasks[task].completed / elapsed:.1f}/s" if elapsed else ""


class StepProgress:
    """One bar per named step (an eval mode): done of total, rate and ETA; off without a
    terminal, where each step logs its own line."""

    def __init__(self, console: Console) -> None:
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<26}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self.steps: dict[str, TaskID] = {}

    def __enter__(self) -> StepProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def update(self, step: str, done: int, total: int) -> None:
        if step not in self.steps:
            self.steps[step] = self.bar.add_task(step, total=total)
        self.bar.update(self.steps[step], completed=done, total=total)
