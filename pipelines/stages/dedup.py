"""Stage "dedup": keep only the events that change the memory.

    in:  (doc_id, [{"event", "topic", "partition", "offset"}, ...])   grouped by doc id
    out: the one winning event of each doc, when it changes the memory
    out["skipped"]: (reason, doc_id) for counters and reports

The rules, in order (they make replays and out-of-order delivery harmless):

1. Within a batch, the event with the latest ``published_at`` wins; ties, and
   events without ``published_at``, go to the later Kafka offset.
2. An event older than what the memory holds for that doc (by ``published_at``)
   is stale and skipped: a late, older update never overwrites a newer one.
   Deletes leave a tombstone carrying their ``published_at`` so a late, older
   upsert cannot resurrect a deleted document either.
3. An upsert whose content hash and model fingerprint equal the memory's is
   unchanged and skipped: unchanged documents cost no chunking, embedding,
   triples or amortization.
4. A delete always leaves a tombstone (with its ``published_at``), even for a
   document the memory does not hold: the document may have been created and
   deleted within one batch, and a late copy of its upsert must stay dead. Only
   a delete no newer than the tombstone already held is a no-op.

``known`` maps doc id -> {"kind": "doc"|"tombstone", "content_hash",
"published_at" (ISO or None), "model"} as served by the parent version; the flow
looks it up for the batch's doc ids only, so this costs O(batch).
"""

from __future__ import annotations

from datetime import UTC, datetime

import apache_beam as beam
from apache_beam.metrics import Metrics

SKIPPED = "skipped"
_MIN = datetime.min.replace(tzinfo=UTC)


def _order(sourced: dict) -> tuple:
    e = sourced["event"]
    return (e.published_at or _MIN, sourced["partition"], sourced["offset"])


def _newer(event, known: dict) -> bool:
    """Whether the event is dated after what the memory holds (undated events are not)."""
    if event.published_at is None:
        return False
    if not known.get("published_at"):
        return True
    return event.published_at > datetime.fromisoformat(known["published_at"])


def decide(sourced_events: list[dict], known: dict | None, model: str) -> tuple[dict | None, str]:
    """The winning event and why; ``None`` with a reason when nothing changes."""
    winner = max(sourced_events, key=_order)
    event = winner["event"]
    if known and known.get("published_at") and event.published_at:
        if event.published_at < datetime.fromisoformat(known["published_at"]):
            return None, "stale"
    if event.op == "delete":
        if known and known["kind"] == "tombstone" and not _newer(event, known):
            return None, "delete_repeated"
        return winner, "delete"
    if (
        known
        and known["kind"] == "doc"
        and known["content_hash"] == event.content_hash
        and known.get("model") == model
    ):
        return None, "unchanged"
    return winner, "upsert"


class Dedup(beam.DoFn):
    def __init__(self, known: dict[str, dict], model: str) -> None:
        self.known, self.model = known, model

    def process(self, keyed: tuple[str, list[dict]]):
        doc_id, sourced_events = keyed
        winner, reason = decide(list(sourced_events), self.known.get(doc_id), self.model)
        Metrics.counter("dedup", reason).inc()
        if winner is None:
            yield beam.pvalue.TaggedOutput(SKIPPED, (reason, doc_id))
        else:
            yield winner
