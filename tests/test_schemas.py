"""Schemas: Modulation bytes, SnapshotManifest JSON, and deterministic chunk ids."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from knowstream.schemas.chunk import ID_NAMESPACE, chunk_id
from knowstream.schemas.manifest import MANIFEST_FORMAT, OffsetRange, SnapshotManifest
from knowstream.schemas.modulation import MODULATION_SCHEMA, Modulation

pytestmark = pytest.mark.fast  # needs no service: the `make test-fast` tier

# --- Modulation ---


def entry(dtype: str = "float16") -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((16, 576)) * 3).astype(dtype)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_modulation_array_round_trip(dtype):
    arr = entry(dtype)
    mod = Modulation.from_array("doc", "hash", "mac-1", arr)
    assert (mod.shape, mod.dtype, len(mod.data)) == ((16, 576), dtype, arr.nbytes)
    back = mod.to_array()
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, arr)


def test_modulation_bytes_are_little_endian_c_order():
    arr = entry()
    big = arr.astype(">f2")
    fortran = np.asfortranarray(arr)
    for same in (big, fortran, arr.T.copy().T):
        mod = Modulation.from_array("doc", "hash", "mac-1", same)
        assert mod.data == arr.astype("<f2").tobytes(order="C")
        assert np.array_equal(mod.to_array(), arr)


def test_modulation_row_round_trip():
    mod = Modulation.from_array("doc", "hash", "mac-1", entry())
    row = mod.to_row()
    assert set(row) == set(MODULATION_SCHEMA.names)
    assert Modulation.from_row(row) == mod
    # And through Arrow, as staging and publishing store it.
    (stored,) = pa.Table.from_pylist([row], schema=MODULATION_SCHEMA).to_pylist()
    assert Modulation.from_row(stored) == mod
    assert np.array_equal(Modulation.from_row(stored).to_array(), entry())


def test_modulation_checksum_mismatch_raises():
    row = Modulation.from_array("doc", "hash", "mac-1", entry()).to_row()
    flipped = bytes([row["data"][0] ^ 1]) + row["data"][1:]
    with pytest.raises(ValueError, match="checksum mismatch"):
        Modulation.from_row({**row, "data": flipped})
    with pytest.raises(ValueError, match="checksum mismatch"):
        Modulation.from_row({**row, "checksum": "0" * 64})


def test_modulation_row_without_checksum_is_accepted():
    mod = Modulation.from_array("doc", "hash", "mac-1", entry())
    row = {k: v for k, v in mod.to_row().items() if k != "checksum"}
    assert Modulation.from_row(row) == mod


def test_modulation_checksum_is_sha256_of_data():
    mod = Modulation.from_array("doc", "hash", "mac-1", entry())
    assert mod.checksum == hashlib.sha256(mod.data).hexdigest()
    other = Modulation.from_array("doc", "hash", "mac-1", entry() + np.float16(1))
    assert other.checksum != mod.checksum


# --- SnapshotManifest ---

MANIFEST = SnapshotManifest(
    version=3,
    parent=2,
    created_at="2024-01-01T00:00:00+00:00",
    kind="ingest",
    offsets=[OffsetRange("docs", 0, 287, 301), OffsetRange("docs", 1, 0, 5)],
    counts={"docs": 14, "chunks": 20, "triples": 61, "modulations": 8, "dead_letters": 3},
    model_versions={"embedder": "all-MiniLM-L6-v2@gt-1", "amortizer": "mac-0123456789ab"},
    checksums={"content": "ab" * 32, "chunks.parquet": "cd" * 32},
)


def test_manifest_json_round_trip():
    text = MANIFEST.to_json()
    back = SnapshotManifest.from_json(text)
    assert back == MANIFEST
    assert all(isinstance(o, OffsetRange) for o in back.offsets)
    assert back.to_json() == text  # stable text: sorted keys


def test_root_manifest_round_trip():
    root = SnapshotManifest(
        version=1, parent=None, created_at="2024-01-01T00:00:00Z", kind="backfill"
    )
    back = SnapshotManifest.from_json(root.to_json())
    assert back == root and back.parent is None and back.offsets == []


def test_manifest_json_is_plain_json():
    raw = json.loads(MANIFEST.to_json())
    assert raw["format"] == MANIFEST_FORMAT
    assert raw["offsets"][0] == {"topic": "docs", "partition": 0, "start": 287, "end": 301}


@pytest.mark.parametrize("fmt", [None, MANIFEST_FORMAT + 1, 0])
def test_manifest_of_other_format_is_refused(fmt):
    raw = json.loads(MANIFEST.to_json())
    if fmt is None:
        del raw["format"]
    else:
        raw["format"] = fmt
    with pytest.raises(ValueError, match="manifest format"):
        SnapshotManifest.from_json(json.dumps(raw))


def test_manifest_is_immutable():
    with pytest.raises(AttributeError):
        MANIFEST.version = 4  # type: ignore[misc]
    assert replace(MANIFEST, version=4).version == 4 and MANIFEST.version == 3


# --- chunk ids ---


def test_chunk_id_is_deterministic_and_pinned():
    first = chunk_id("Super_Bowl_50_0", 0, "abc")
    assert first == chunk_id("Super_Bowl_50_0", 0, "abc")
    # Pinned: replays, other processes and older versions must produce the same id.
    assert first == "9e337699-23ef-53e4-a37f-62db2a9e5358"
    assert uuid.UUID(first).version == 5
    assert first == str(uuid.uuid5(ID_NAMESPACE, "chunk\x00Super_Bowl_50_0\x000\x00abc"))


def test_chunk_id_depends_on_every_part():
    ids = {
        chunk_id("a", 0, "h"),
        chunk_id("b", 0, "h"),
        chunk_id("a", 1, "h"),
        chunk_id("a", 0, "g"),
        # Parts cannot run into each other: ("a", 12) is not ("a1", 2).
        chunk_id("a", 12, "h"),
        chunk_id("a1", 2, "h"),
    }
    assert len(ids) == 6
