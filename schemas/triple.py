"""Triple: one (subject, relation, object) fact extracted from a chunk."""

from __future__ import annotations

import pyarrow as pa

TRIPLE_SCHEMA = pa.schema(
    [
        ("subject", pa.string()),
        ("relation", pa.string()),  # verb lemma, with its preposition ("play at")
        ("object", pa.string()),
        ("doc_id", pa.string()),
        ("chunk_id", pa.string()),  # the chunk whose text holds the sentence
        ("confidence", pa.float32()),  # rule heuristic in [0, 1]
        ("observed_at", pa.timestamp("us", tz="UTC")),  # the event's published_at
    ]
)
