"""Answering from one memory version: evidence chunks, source docs, related triples.

Shared by ``knowstream ask`` and the HTTP server, so both answer identically.
The version is resolved once at the start of a query and everything after
reads that version, so a query never mixes two snapshots even if ``live``
moves meanwhile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from knowstream.connectors.qdrant import Hit
from knowstream.memory import Memory

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an and are as at be by did do does for from had has have how in is it of on or "
    "the to was were what when where which who whom whose why with".split()
)


@dataclass
class QueryResult:
    question: str
    version: int
    hits: list[Hit]
    docs: dict[str, dict]  # doc_id -> {"title", "url", "content_hash", "published_at"}
    triples: list[dict] = field(default_factory=list)  # most related first


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def _embed(encoder, question: str, threads: int):
    """The question's vector, encoded on ``threads`` torch threads (``Settings.torch_threads``,
    1 by default), the process's setting restored after. Why: with torch's default (one
    thread per core) a ~10 ms encoding took ~500 ms now and then on this busy 2-core
    machine (p95 492 ms against 9 ms on one thread, measured side by side), which made
    /ask's p95 a measure of the machine's load (BENCHMARKS.md 6.1)."""
    import torch

    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        return encoder.embed([question])[0]
    finally:
        if before != threads:
            torch.set_num_threads(before)


def query(memory: Memory, question: str, *, version: int | None = None, k: int = 5) -> QueryResult:
    from knowstream.models.encoder import load_encoder

    served = memory.resolve(version)
    view = memory.view(served)
    vector = _embed(load_encoder(), question, memory.settings.torch_threads)
    hits = view.search(vector.tolist(), k=k)
    doc_ids = list(dict.fromkeys(h.doc_id for h in hits))
    payloads = view.docs(doc_ids)
    docs = {
        d: {key: payloads[d].get(key) for key in ("title", "url", "content_hash", "published_at")}
        for d in doc_ids
        if d in payloads
    }
    # Triples of the evidence docs, ranked by word overlap with the question.
    q = _words(question)
    scored = []
    for d in doc_ids:
        for t in payloads.get(d, {}).get("triples", []):
            overlap = len(q & _words(f"{t['subject']} {t['relation']} {t['object']}"))
            if overlap:
                scored.append((overlap, t["confidence"], {**t, "doc_id": d}))
    scored.sort(key=lambda s: (-s[0], -s[1]))
    return QueryResult(question, served, hits, docs, [t for _, _, t in scored[:10]])
