"""Modulation: a document's memory entry, the amortizer's output (its config's entry_shape).

Stored as raw little-endian bytes with its shape and dtype, so any reader can
rebuild the exact tensor without pickles.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

MODULATION_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("content_hash", pa.string()),
        ("amortizer_version", pa.string()),
        ("shape", pa.list_(pa.int32())),  # the amortizer config's entry_shape
        ("dtype", pa.string()),  # numpy dtype name, "float16"
        ("data", pa.binary()),  # C-order little-endian bytes
        ("checksum", pa.string()),  # sha256 of data
    ]
)


@dataclass(frozen=True)
class Modulation:
    doc_id: str
    content_hash: str
    amortizer_version: str
    shape: tuple[int, ...]
    dtype: str
    data: bytes

    @classmethod
    def from_array(
        cls, doc_id: str, content_hash: str, amortizer_version: str, array: np.ndarray
    ) -> Modulation:
        arr = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
        return cls(
            doc_id, content_hash, amortizer_version, arr.shape, arr.dtype.name, arr.tobytes()
        )

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def to_array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(
            self.shape
        )

    def to_row(self) -> dict:
        return {
            "doc_id": self.doc_id,
            "content_hash": self.content_hash,
            "amortizer_version": self.amortizer_version,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "data": self.data,
            "checksum": self.checksum,
        }

    @classmethod
    def from_row(cls, row: dict) -> Modulation:
        mod = cls(
            row["doc_id"],
            row["content_hash"],
            row["amortizer_version"],
            tuple(row["shape"]),
            row["dtype"],
            row["data"],
        )
        if "checksum" in row and row["checksum"] != mod.checksum:
            raise ValueError(f"modulation of {mod.doc_id}: checksum mismatch")
        return mod
