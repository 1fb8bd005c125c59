"""Stage "chunk": an upsert event -> its token-aware chunks (``models/chunking.py``)."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from knowstream.models.chunking import chunk_spans
from knowstream.pipelines.faults import failpoint
from knowstream.pipelines.stages.stage import doc_row
from knowstream.schemas.chunk import chunk_id


class Chunk(beam.DoFn):
    """Stage "chunk": an upsert event -> the document's chunks and its doc row.

    in:  {"event": DocumentEvent, "topic", "partition", "offset"}
    out: {"doc": DOC row, "text": str, "published_at": datetime|None,
          "chunks": [CHUNK rows without "embedding"]}

    The pipeline runs it ``with_exception_handling``: a document it raises on is
    dead-lettered (``pipelines/faults.py``). ``fail``: doc ids of a failpoint.
    """

    def __init__(self, max_tokens: int, overlap: int, model: str, fail=()) -> None:
        self.max_tokens, self.overlap, self.model = max_tokens, overlap, model
        self.fail = frozenset(fail)
        self.chunked = Metrics.counter("chunk", "chunks")

    def setup(self) -> None:
        from knowstream.models.encoder import load_encoder

        self.tokenizer = load_encoder().tokenizer

    def process(self, sourced: dict):
        event = sourced["event"]
        failpoint("chunk", [event.doc_id], self.fail)
        spans = chunk_spans(event.text, self.tokenizer, self.max_tokens, self.overlap)
        chash = event.content_hash
        chunks = [
            {
                "chunk_id": chunk_id(event.doc_id, s.index, chash),
                "doc_id": event.doc_id,
                "index": s.index,
                "text": event.text[s.char_start : s.char_end],
                "char_start": s.char_start,
                "char_end": s.char_end,
                "n_tokens": s.n_tokens,
                "content_hash": chash,
            }
            for s in spans
        ]
        self.chunked.inc(len(chunks))
        yield {
            "doc": doc_row(sourced, self.model, len(chunks)),
            "text": event.text,
            "published_at": event.published_at,
            "chunks": chunks,
        }
