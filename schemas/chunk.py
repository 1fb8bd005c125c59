"""Chunk: one embedded span of a document, the unit Qdrant retrieves."""

from __future__ import annotations

import uuid

import pyarrow as pa

# Every derived id is a uuid5 under this namespace, so replays produce the same ids.
ID_NAMESPACE = uuid.UUID("6f1c2f0e-2b8a-4f5e-9d7a-6b1d8e7c3a10")

CHUNK_SCHEMA = pa.schema(
    [
        ("chunk_id", pa.string()),  # uuid5(doc_id, index, content_hash)
        ("doc_id", pa.string()),
        ("index", pa.int32()),  # position in the document
        ("text", pa.string()),  # exact substring of the document text
        ("char_start", pa.int32()),
        ("char_end", pa.int32()),
        ("n_tokens", pa.int32()),  # word pieces of the embedding tokenizer
        ("content_hash", pa.string()),  # of the whole document
        ("embedding", pa.list_(pa.float32())),  # L2-normalized, 384-d
    ]
)


def chunk_id(doc_id: str, index: int, content_hash: str) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, f"chunk\x00{doc_id}\x00{index}\x00{content_hash}"))
