"""The walk-through behind ``make run``: the whole system once, on real parts.

    knowstream --home .knowstream/demo demo --data data/sample

1. start a local Kafka-protocol broker (tansu) on loopback,
2. produce the sample stream, ingest it -> memory version 1, ask questions,
3. produce a batch of updates, deletes and malformed messages, ingest -> version 2:
   an answer's evidence changes, a deleted document is gone, bad messages are
   in the dead-letter topic,
4. roll back to version 1: the old evidence is served again,
5. the LM's answers (mode mac+rag: retrieved chunks in the prompt plus the
   memory's modulation from the shipped trained amortizer) to the questions the
   update changes, from version 1, version 2 and after the rollback,
6. print the snapshot history, stop the broker,
7. write the report (``<home>/reports/``: versions, ingest, dead letters, eval as plots).

It starts from empty state in its own ``--home`` (refusing to wipe a folder it
did not create) so that every run shows versions 1 and 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from knowstream.settings import Settings

MARKER = ".knowstream-demo"  # only folders holding this are wiped


def _fresh_home(home: Path) -> None:
    # logs/ is kept: the CLI has opened its log file there already.
    kept = {"logs"}
    if home.exists():
        if not (home / MARKER).exists() and any(p.name not in kept for p in home.iterdir()):
            raise SystemExit(f"{home} exists and was not made by the demo; pick another --home")
        for p in home.iterdir():
            if p.name not in kept:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    home.mkdir(parents=True, exist_ok=True)
    (home / MARKER).write_text("made by `knowstream demo`; wiped at its next run\n")


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # the deliberately malformed lines
        if isinstance(obj, dict):
            out.append(obj)
    return out


def _show(console: Console, result, answer: str, *, expect: bool) -> None:
    """Print a result and whether the updated answer is in its evidence."""
    from knowstream.display import print_result

    print_result(result)
    found = any(answer in h.text for h in result.hits)
    mark = "[green]yes[/green]" if found == expect else "[red]NO[/red]"
    console.print(f"  updated answer {answer!r} in the evidence: {found} (as expected: {mark})")


ANSWER_MODE = "mac+rag"  # the measured best mode (EVAL.md)


def _answers(memory, questions: list[dict], version: int | None) -> list[str]:
    """The LM's answers from memory ``version`` (None: live), through the code path of /ask."""
    from knowstream.serving.generate import answer, retrieve

    out = []
    for q in questions:
        result, bank = retrieve(memory, q["question"], version=version, k=3, mode=ANSWER_MODE)
        out.append(answer(memory, result, bank, ANSWER_MODE) or "")
    return out


def _answer_table(questions: list[dict], old: dict[str, str], columns: dict[str, list[str]]):
    """Question, the answer before and after the update, and what each version's memory
    made the LM say (F1 against the updated answer)."""
    from rich.table import Table

    from knowstream.models.evaluate import squad_scores

    table = Table(title=f"answers (mode {ANSWER_MODE}, k=3)", show_lines=True)
    for col in ("question", "before update", "after update", *columns):
        table.add_column(col)
    for i, q in enumerate(questions):
        cells = []
        for answers in columns.values():
            f1_new = squad_scores(answers[i], q["answers"])[1]
            f1_old = (
                squad_scores(answers[i], [old[q["question_id"]]])[1]
                if q["question_id"] in old
                else 0.0
            )
            cells.append(f"{answers[i]}\n[dim]F1 new {f1_new:.2f} / old {f1_old:.2f}[/dim]")
        table.add_row(
            q["question"], old.get(q["question_id"], "(no document)"), q["answers"][0], *cells
        )
    return table


def run_demo(settings: Settings, data: Path, console: Console) -> None:
    from knowstream import report
    from knowstream.connectors.kafka import count_messages, produce_file
    from knowstream.display import print_result, snapshot_table
    from knowstream.flows.backfill import rollback_flow
    from knowstream.flows.ingest import ingest_flow
    from knowstream.infra import services
    from knowstream.memory import Memory
    from knowstream.query import query

    _fresh_home(settings.home)
    streamed = {e["doc_id"] for e in _read_jsonl(data / "stream.jsonl")}
    updates = [u for u in _read_jsonl(data / "updates.jsonl") if isinstance(u.get("doc_id"), str)]
    changed = [
        u["doc_id"]
        for u in updates
        if u.get("op", "upsert") == "upsert" and u["doc_id"] in streamed
    ]
    deleted = [u["doc_id"] for u in updates if u.get("op") == "delete"]
    changed_qs = [
        q for q in _read_jsonl(data / "questions_updates.jsonl") if q["doc_id"] in changed
    ][:2]
    deleted_qs = [q for q in _read_jsonl(data / "questions.jsonl") if q["doc_id"] in deleted][:1]
    # Questions whose answer the update changes (rewritten facts, new documents), and
    # each rewritten one's answer before the update (its original SQuAD question).
    update_qs = _read_jsonl(data / "questions_updates.jsonl")
    originals = {q["question_id"]: q for q in _read_jsonl(data / "questions.jsonl")}
    before = {
        q["question_id"]: originals[orig]["answers"][0]
        for q in update_qs
        if (orig := q["question_id"].removeprefix("synthetic-upd-")) in originals
    }

    console.print(Rule("1. start the broker"))
    services.start_broker(settings)
    try:
        console.print(f"tansu broker on {settings.bootstrap_servers}")

        console.print(Rule("2. stream the sample -> memory version 1"))
        n = produce_file(settings, data / "stream.jsonl")
        console.print(f"produced {n} document events to '{settings.topic}'")
        with console.status(
            "ingesting (parse, dedup, chunk, embed, triples, amortize, stage, publish)..."
        ):
            reports = ingest_flow(settings, once=True)
        v1 = reports[-1].version
        console.print(f"memory version {v1} is live")
        memory = Memory(settings)
        for q in changed_qs + deleted_qs:
            print_result(query(memory, q["question"], k=3))

        console.print(Rule("3. updates, deletes and malformed messages -> memory version 2"))
        n = produce_file(settings, data / "updates.jsonl")
        console.print(f"produced {n} messages")
        with console.status("ingesting the update batch..."):
            reports = ingest_flow(settings, once=True)
        v2 = reports[-1].version
        console.print(f"memory version {v2} is live")
        for q in changed_qs:
            _show(console, query(memory, q["question"], k=3), q["answers"][0], expect=True)
        for d in deleted:
            gone = d not in memory.view(v2).docs([d])
            still = d in memory.view(v1).docs([d])
            console.print(f"deleted {d}: gone from v{v2}: {gone}; still in v{v1}: {still}")
        for q in deleted_qs:
            result = query(memory, q["question"], k=3)
            print_result(result)
            cited = any(h.doc_id == q["doc_id"] for h in result.hits)
            console.print(f"  evidence from {q['doc_id']}: {cited}")
        dead = count_messages(settings, settings.dlq_topic)
        console.print(f"dead letters on '{settings.dlq_topic}': {dead}")

        with console.status("loading the LM and answering the changed questions (CPU)..."):
            columns = {
                f"version {v1}": _answers(memory, update_qs, v1),
                f"live (version {v2})": _answers(memory, update_qs, None),
            }

        console.print(Rule(f"4. roll back to version {v1}"))
        rollback_flow(v1, settings)
        for q in changed_qs:
            _show(console, query(memory, q["question"], k=3), q["answers"][0], expect=False)
        with console.status("answering from the rolled-back live version..."):
            live = memory.resolve(None)
            columns[f"live after rollback (version {live})"] = _answers(memory, update_qs, None)

        console.print(Rule("5. answers from the frozen LM with the memory"))
        console.print(_answer_table(update_qs, before, columns))

        console.print(Rule("6. snapshot history"))
        console.print(snapshot_table(memory.history()))

        console.print(Rule("7. the report"))
        page = report.write(settings, memory.registry)
        console.print(f"versions, ingest, dead letters and eval as plots: {page.resolve()}")
    finally:
        services.stop_all(settings)
        console.print("services stopped")
