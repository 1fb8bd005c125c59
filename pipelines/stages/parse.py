"""Stage "parse": raw Kafka records -> validated document events, or dead letters.

    in:  {"topic", "partition", "offset", "key": bytes|None, "value": bytes|None, ...}
    out: {"event": DocumentEvent, "topic", "partition", "offset"}
    out["dead_letters"]: DEAD_LETTER_SCHEMA rows (stage "parse", reason code + detail)

A bad message never stops the batch: it is routed to the dead-letter output
with the reason, and the rest goes on.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from knowstream.schemas.event import InvalidEvent, dead_letter, parse_event

DEAD_LETTERS = "dead_letters"


class Parse(beam.DoFn):
    def __init__(self, max_text_chars: int) -> None:
        self.max_text_chars = max_text_chars
        self.accepted = Metrics.counter("parse", "accepted")
        self.rejected = Metrics.counter("parse", "rejected")

    def process(self, record: dict):
        source = {k: record[k] for k in ("topic", "partition", "offset")}
        error: Exception
        try:
            event = parse_event(record["key"], record["value"], max_text_chars=self.max_text_chars)
        except InvalidEvent as e:
            reason, detail, error = e.reason, e.detail, e
        except Exception as e:  # a validator bug must not stop the stream either
            reason, detail, error = "parse_error", f"{type(e).__name__}: {e}", e
        else:
            self.accepted.inc()
            yield {"event": event, **source}
            return
        self.rejected.inc()
        letter = dead_letter(
            source,
            stage="parse",
            error=type(error).__name__,
            reason=reason,
            detail=detail,
            key=record["key"],
            value=record["value"],
        )
        yield beam.pvalue.TaggedOutput(DEAD_LETTERS, letter)
