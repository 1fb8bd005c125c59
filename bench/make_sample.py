"""Build the committed sample in data/sample/ from the official SQuAD v1.1 dev set.

    python bench/make_sample.py --squad /work/shared/data/squad_v1.1/dev.jsonl --out data/sample

Deterministic: same input file, same bytes out (no clocks, no randomness).

Selection rule, and why: SQuAD dev has 48 articles in file order. We take every 4th one
(indices 0, 4, ..., 44: 12 articles) rather than the first 12, so the sample spreads over
sports, science, history, companies and places instead of clustering on the first topics, and
article 0 (Super_Bowl_50, the usual demo article) is always in. From each we take the first
25 paragraphs (or all, when an article has fewer), giving 287 passages.

Questions: all questions of 287 passages with their inlined passage text would be about 2 MB,
so questions.jsonl keeps the first 2 questions of each passage (file order), plus the original
version of every question that questions_updates.jsonl re-asks, so a demo can show the same
question answered before and after the update. That keeps the whole sample under ~1 MB.

updates.jsonl is a hand-written second batch (all of it defined below, marked synthetic in
metadata): rewrites of existing passages with one changed fact each, brand-new fictional
documents, deletes, and three malformed messages for the dead-letter path.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ARTICLE_STRIDE = 4
PARAGRAPHS_PER_ARTICLE = 25
QUESTIONS_PER_PASSAGE = 2
SOURCE = "squad-v1.1-dev"
SYNTHETIC_EDIT_SOURCE = "squad-v1.1-dev+synthetic-edit"
SYNTHETIC_SOURCE = "knowstream-synthetic"
STREAM_EPOCH = datetime(2016, 6, 1, tzinfo=UTC)
# A month after the initial stream, so every update is newer than what it replaces.
UPDATES_EPOCH = datetime(2016, 7, 1, tzinfo=UTC)
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Rewrite:
    """A synthetic edit of one existing passage: `old` (exactly once in it) becomes `new`."""

    doc_id: str
    old: str
    new: str
    change: str
    question_id: str  # the SQuAD question whose answer the edit changes
    answer: str  # its answer in the edited text


@dataclass(frozen=True)
class NewDoc:
    """A hand-written fictional document, with one question it answers."""

    doc_id: str
    title: str
    text: str
    question: str
    answer: str


REWRITES = [
    Rewrite(
        "Super_Bowl_50_0",
        "Carolina Panthers 24–10",
        "Carolina Panthers 27–23",
        "final score changed from 24–10 to 27–23",
        "56bf10f43aeaaa14008c9500",
        "27–23",
    ),
    Rewrite(
        "Super_Bowl_50_2",
        "Denver linebacker Von Miller was named Super Bowl MVP",
        "Denver linebacker DeMarcus Ware was named Super Bowl MVP",
        "Super Bowl MVP changed from Von Miller to DeMarcus Ware",
        "56be4eafacb8001400a50302",
        "DeMarcus Ware",
    ),
    Rewrite(
        "Sky_(United_Kingdom)_0",
        "changed its name to Sky plc",
        "changed its name to Sky Group plc",
        "holding company name changed from Sky plc to Sky Group plc",
        "57092322efce8f15003a7db3",
        "Sky Group plc",
    ),
    Rewrite(
        "American_Broadcasting_Company_0",
        "headquartered on Columbus Avenue and West 66th Street in Manhattan",
        "headquartered on Varick Street and Spring Street in Manhattan",
        "headquarters moved from Columbus Avenue and West 66th Street "
        "to Varick Street and Spring Street",
        "57267b755951b619008f7436",
        "Varick Street and Spring Street",
    ),
    Rewrite(
        "Oxygen_0",
        "constitutes 20.8% of the Earth's atmosphere",
        "constitutes 20.9% of the Earth's atmosphere",
        "share of the atmosphere changed from 20.8% to 20.9%",
        "571bb2269499d21900609ca9",
        "20.9%",
    ),
]

NEW_DOCS = [
    NewDoc(
        "Synthetic_Aurora_Bay_Bridge_0",
        "Aurora_Bay_Bridge",
        "The Aurora Bay Bridge is a cable-stayed bridge that opened on March 3, 2016, connecting "
        "the towns of Mereford and Caldwick across Aurora Bay. It was designed by the engineer "
        "Ilse Varga and has a main span of 1,140 metres. The bridge carries four lanes of road "
        "traffic and a light-rail line operated by Northshore Transit.",
        "Who designed the Aurora Bay Bridge?",
        "Ilse Varga",
    ),
    NewDoc(
        "Synthetic_Kestrel_Prize_0",
        "Kestrel_Prize",
        "The Kestrel Prize is an annual award for young oceanographers, founded in 2012 by the "
        "Halden Marine Institute. The 2016 prize was awarded to Tomasz Brennan for his survey of "
        "deep-sea vents in the Banda Sea. Winners receive a bronze medal and a research grant of "
        "40,000 euros.",
        "Who won the 2016 Kestrel Prize?",
        "Tomasz Brennan",
    ),
    NewDoc(
        "Synthetic_Lake_Orvel_Observatory_0",
        "Lake_Orvel_Observatory",
        "Lake Orvel Observatory is an astronomical observatory on the northern shore of Lake "
        "Orvel. Its main instrument, the 3.2-metre Castellan Telescope, saw first light on May "
        "12, 2016. The observatory is run by a consortium of four universities and hosts a public "
        "visitor centre.",
        "When did the Castellan Telescope see first light?",
        "May 12, 2016",
    ),
]

# Paragraph 0 of three articles whose first questions are in questions.jsonl, so a demo can
# show those questions losing their evidence.
DELETES = ["Black_Death_0", "Prime_number_0", "Yuan_dynasty_0"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_lines(path: Path, lines: Iterable[str]) -> int:
    """Write `lines` (each without its newline) and return how many."""
    n = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")
            n += 1
    return n


def dumps(obj: dict[str, Any]) -> str:
    # Same style as dev.jsonl: UTF-8 as-is, no \u escapes.
    return json.dumps(obj, ensure_ascii=False)


def iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def wiki_url(title: str) -> str:
    return f"https://en.wikipedia.org/wiki/{title}"


def select_passages(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The passages of the sample, in stream order: {doc_id, title, text, paragraph}."""
    titles = list(dict.fromkeys(r["title"] for r in rows))
    chosen = titles[::ARTICLE_STRIDE]
    passages: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["doc_id"] in passages:
            continue
        # doc_id is "<title>_<paragraph index>", per the dataset's SOURCE.md.
        paragraph = int(r["doc_id"].rsplit("_", 1)[1])
        if r["title"] in chosen and paragraph < PARAGRAPHS_PER_ARTICLE:
            passages[r["doc_id"]] = {
                "doc_id": r["doc_id"],
                "title": r["title"],
                "text": r["text"],
                "paragraph": paragraph,
            }
    order = {t: i for i, t in enumerate(chosen)}
    return sorted(passages.values(), key=lambda p: (order[p["title"]], p["paragraph"]))


def stream_events(passages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "doc_id": p["doc_id"],
            "op": "upsert",
            "title": p["title"],
            "text": p["text"],
            "source": SOURCE,
            "url": wiki_url(p["title"]),
            "published_at": iso(STREAM_EPOCH + timedelta(seconds=i)),
            "metadata": {"article": p["title"], "paragraph": p["paragraph"]},
            "schema_version": SCHEMA_VERSION,
        }
        for i, p in enumerate(passages)
    ]


def select_questions(rows: list[dict[str, Any]], doc_ids: set[str]) -> list[dict[str, Any]]:
    """First QUESTIONS_PER_PASSAGE questions per passage, plus the re-asked ones."""
    reasked = {rw.question_id for rw in REWRITES}
    seen: dict[str, int] = {}
    kept = []
    for r in rows:
        if r["doc_id"] not in doc_ids:
            continue
        seen[r["doc_id"]] = seen.get(r["doc_id"], 0) + 1
        if seen[r["doc_id"]] <= QUESTIONS_PER_PASSAGE or r["question_id"] in reasked:
            kept.append(r)
    missing = reasked - {r["question_id"] for r in kept}
    assert not missing, f"re-asked questions not in the sample: {missing}"
    return kept


def qa_row(
    doc_id: str, title: str, text: str, question_id: str, question: str, answer: str
) -> dict[str, Any]:
    """One question in dev.jsonl's format, with its single answer located in `text`."""
    start = text.find(answer)
    assert start >= 0, f"{answer!r} not in the text of {doc_id}"
    return {
        "doc_id": doc_id,
        "title": title,
        "text": text,
        "question_id": question_id,
        "question": question,
        "answers": [answer],
        "answer_starts": [start],
    }


def build_updates(
    passages: dict[str, dict[str, Any]], rows: list[dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """The raw lines of updates.jsonl and the questions whose answers they change."""
    by_qid = {r["question_id"]: r for r in rows}
    questions: list[dict[str, Any]] = []

    rewrites = []
    for rw in REWRITES:
        p = passages[rw.doc_id]
        assert p["text"].count(rw.old) == 1, f"{rw.old!r} not exactly once in {rw.doc_id}"
        text = p["text"].replace(rw.old, rw.new)
        rewrites.append(
            {
                "doc_id": rw.doc_id,
                "op": "upsert",
                "title": p["title"],
                "text": text,
                "source": SYNTHETIC_EDIT_SOURCE,
                "url": wiki_url(p["title"]),
                "published_at": None,  # stamped in stream order below
                "metadata": {
                    "article": p["title"],
                    "paragraph": p["paragraph"],
                    "synthetic": True,
                    "change": rw.change,
                },
                "schema_version": SCHEMA_VERSION,
            }
        )
        original = by_qid[rw.question_id]
        assert original["doc_id"] == rw.doc_id
        questions.append(
            qa_row(
                rw.doc_id,
                p["title"],
                text,
                f"synthetic-upd-{rw.question_id}",
                original["question"],
                rw.answer,
            )
        )

    new_docs = []
    for i, nd in enumerate(NEW_DOCS):
        new_docs.append(
            {
                "doc_id": nd.doc_id,
                "op": "upsert",
                "title": nd.title,
                "text": nd.text,
                "source": SYNTHETIC_SOURCE,
                # example.org is reserved for examples: no real page is implied.
                "url": f"https://example.org/synthetic/{nd.title}",
                "published_at": None,
                "metadata": {
                    "article": nd.title,
                    "paragraph": 0,
                    "synthetic": True,
                    "change": "new fictional document",
                },
                "schema_version": SCHEMA_VERSION,
            }
        )
        questions.append(
            qa_row(nd.doc_id, nd.title, nd.text, f"synthetic-new-{i}", nd.question, nd.answer)
        )

    deletes = [
        {"doc_id": d, "op": "delete", "published_at": None, "schema_version": SCHEMA_VERSION}
        for d in DELETES
    ]
    for d in DELETES:
        assert d in passages, d

    # Dead-letter material. Each one fails a different check of schemas/event.py.
    not_json = "producer log: flushed 3 records to documents (this line is not JSON)"
    missing_doc_id = {
        "op": "upsert",
        "title": "Kestrel_Prize",
        "text": "A message whose producer forgot the doc_id.",
        "published_at": None,
        "metadata": {"synthetic": True, "change": "malformed: missing doc_id"},
        "schema_version": SCHEMA_VERSION,
    }
    unknown_op = {
        "doc_id": "Super_Bowl_50_1",
        "op": "patch",
        "text": "A message with an op the pipeline does not know.",
        "published_at": None,
        "metadata": {"synthetic": True, "change": "malformed: unknown op"},
        "schema_version": SCHEMA_VERSION,
    }

    # Interleaved, as a real topic would deliver them: bad messages between good ones show
    # that one rejected message does not stop the batch.
    events: list[dict[str, Any] | str] = [
        rewrites[0],
        rewrites[1],
        not_json,
        new_docs[0],
        deletes[0],
        rewrites[2],
        missing_doc_id,
        new_docs[1],
        deletes[1],
        rewrites[3],
        unknown_op,
        new_docs[2],
        deletes[2],
        rewrites[4],
    ]
    lines = []
    for i, ev in enumerate(events):
        if isinstance(ev, str):
            lines.append(ev)
            continue
        ev["published_at"] = iso(UPDATES_EPOCH + timedelta(seconds=i))
        lines.append(dumps(ev))
    return lines, questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--squad", type=Path, required=True, help="SQuAD v1.1 dev.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args()

    rows = read_jsonl(args.squad)
    passages = select_passages(rows)
    by_id = {p["doc_id"]: p for p in passages}
    args.out.mkdir(parents=True, exist_ok=True)

    n_stream = write_lines(args.out / "stream.jsonl", map(dumps, stream_events(passages)))
    questions = select_questions(rows, set(by_id))
    n_questions = write_lines(args.out / "questions.jsonl", map(dumps, questions))
    update_lines, update_questions = build_updates(by_id, rows)
    n_updates = write_lines(args.out / "updates.jsonl", update_lines)
    n_uq = write_lines(args.out / "questions_updates.jsonl", map(dumps, update_questions))

    articles = len({p["title"] for p in passages})
    print(
        f"{articles} articles, {n_stream} passages -> stream.jsonl; "
        f"{n_questions} questions; {n_updates} update lines; {n_uq} update questions"
    )


if __name__ == "__main__":
    main()
