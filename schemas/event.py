"""DocumentEvent: what arrives on the Kafka topic, and how it is validated.

One JSON object per message, keyed by ``doc_id``::

    {"doc_id": "Super_Bowl_50_0", "op": "upsert", "title": "...", "text": "...",
     "source": "squad-v1.1-dev", "url": "https://...", "published_at": "2016-06-01T00:00:00Z",
     "metadata": {...}, "schema_version": 1}

A ``delete`` needs only ``doc_id``, ``op`` and ``schema_version``. A Kafka
tombstone (null value) with a key is a delete of that key.

Validation never raises anything but :class:`InvalidEvent`, whose ``reason`` is a
short machine-readable code (it becomes the dead-letter ``reason``) and whose
``detail`` is for people.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1  # the newest event schema this code understands
MAX_DOC_ID_CHARS = 512  # longer ids are rejected, not truncated
MAX_METADATA_BYTES = 64 * 1024  # metadata is for small facts, not payloads
MAX_METADATA_DEPTH = 8  # deeper nesting is rejected
MAX_FUTURE = timedelta(days=1)  # clock skew we tolerate on published_at
OPS = ("upsert", "delete")


class InvalidEvent(ValueError):
    """A message that cannot become a DocumentEvent; goes to the dead-letter topic."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DocumentEvent:
    doc_id: str
    op: str  # "upsert" | "delete"
    title: str = ""
    text: str = ""
    source: str = ""
    url: str = ""
    published_at: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def content_hash(self) -> str:
        """What dedup compares: everything that changes derived data, nothing else."""
        body = json.dumps(
            {"title": self.title, "text": self.text, "url": self.url, "source": self.source},
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(body.encode("utf-8")).hexdigest()


EVENT_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("op", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("url", pa.string()),
        ("published_at", pa.timestamp("us", tz="UTC")),
        ("metadata", pa.string()),  # JSON text
        ("schema_version", pa.int32()),
    ]
)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise InvalidEvent("duplicate_key", f"key {dup!r} appears more than once")
    return dict(pairs)


def _reject_constant(name: str) -> Any:
    # json.loads accepts NaN and Infinity, which are not JSON: other readers of
    # the staged metadata (and Qdrant payloads) would choke on them.
    raise InvalidEvent("invalid_json", f"{name} is not a JSON value")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of JSON containers, stopping early past ``limit``."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            children = node.values() if isinstance(node, dict) else node
            stack.extend((c, d + 1) for c in children)
    return deepest


def _check_doc_id(doc_id: Any) -> str:
    if not isinstance(doc_id, str):
        raise InvalidEvent("bad_doc_id", f"doc_id must be a string, got {type(doc_id).__name__}")
    if not doc_id.strip():
        raise InvalidEvent("bad_doc_id", "doc_id is empty")
    if len(doc_id) > MAX_DOC_ID_CHARS:
        raise InvalidEvent("bad_doc_id", f"doc_id is {len(doc_id)} chars (max {MAX_DOC_ID_CHARS})")
    # Ids are only ever payload values, never file names; still, ids that look
    # like paths or carry control characters are almost always upstream bugs.
    if "/" in doc_id or "\\" in doc_id or ".." in doc_id:
        raise InvalidEvent("bad_doc_id", "doc_id contains a path separator or '..'")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in doc_id):
        raise InvalidEvent("bad_doc_id", "doc_id contains control or format characters")
    return doc_id


def _check_text(name: str, value: Any, *, required: bool, max_chars: int) -> str:
    if value is None:  # absent or null
        if not required:
            return ""
        raise InvalidEvent(f"empty_{name}", f"no {name}")
    if not isinstance(value, str):
        raise InvalidEvent("bad_type", f"{name} must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidEvent("too_large", f"{name} is {len(value)} chars (max {max_chars})")
    value = _clean(value)
    # After cleaning: a text of only control or format characters is empty too.
    if required and not value.strip():
        raise InvalidEvent(f"empty_{name}", f"{name} is empty")
    return value


def _clean(text: str) -> str:
    """Drop control and bidi-override characters that break tokenizers and displays.

    Newlines and tabs stay: they carry paragraph structure.
    """
    return "".join(
        c for c in text if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf", "Cs")
    )


def _check_time(value: Any, now: datetime) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEvent("bad_published_at", "published_at must be an ISO-8601 string")
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidEvent("bad_published_at", f"not ISO-8601: {value[:64]!r}") from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    try:
        ts = ts.astimezone(UTC)
    except OverflowError:  # e.g. year 9999 at -05:00 is past datetime.max in UTC
        raise InvalidEvent("bad_published_at", f"out of range: {value[:64]!r}") from None
    if ts > now + MAX_FUTURE:
        raise InvalidEvent("bad_published_at", f"published_at {value!r} is in the future")
    return ts


def parse_event(
    key: bytes | None,
    value: bytes | None,
    *,
    max_text_chars: int = 200_000,
    now: datetime | None = None,
) -> DocumentEvent:
    """Turn one Kafka message into a DocumentEvent or raise InvalidEvent."""
    now = now or datetime.now(UTC)
    if value is None:  # tombstone: a delete of the key
        if not key:
            raise InvalidEvent("tombstone_without_key", "null value and no key")
        try:
            doc_id = key.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidEvent("not_utf8", "tombstone key is not UTF-8") from None
        return DocumentEvent(doc_id=_check_doc_id(doc_id), op="delete")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidEvent(
            "not_utf8", f"message is not UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    try:
        obj = json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except InvalidEvent:
        raise
    except (ValueError, RecursionError) as e:
        raise InvalidEvent("invalid_json", f"not JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not_an_object", f"expected a JSON object, got {type(obj).__name__}")

    version = obj.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidEvent(
            "bad_schema_version", f"schema_version must be a positive int: {version!r}"
        )
    if version > SCHEMA_VERSION:
        raise InvalidEvent(
            "future_schema_version", f"schema_version {version} > supported {SCHEMA_VERSION}"
        )
    if "doc_id" not in obj:
        raise InvalidEvent("missing_doc_id", "no doc_id field")
    doc_id = _check_doc_id(obj["doc_id"])
    op = obj.get("op", "upsert")
    if op not in OPS:
        raise InvalidEvent("unknown_op", f"op must be one of {OPS}, got {str(op)[:64]!r}")
    published_at = _check_time(obj.get("published_at"), now)
    if op == "delete":
        return DocumentEvent(doc_id=doc_id, op="delete", published_at=published_at)

    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):  # "", [] and 0 too: no silent {}
        raise InvalidEvent("bad_type", f"metadata must be an object, got {type(metadata).__name__}")
    if _depth(metadata, MAX_METADATA_DEPTH) > MAX_METADATA_DEPTH:
        raise InvalidEvent("too_deep", f"metadata nested deeper than {MAX_METADATA_DEPTH}")
    try:
        metadata_bytes = len(json.dumps(metadata, ensure_ascii=False).encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): no UTF-8 writer takes it
        raise InvalidEvent("not_utf8", "metadata holds a lone surrogate") from None
    if metadata_bytes > MAX_METADATA_BYTES:
        raise InvalidEvent("too_large", f"metadata over {MAX_METADATA_BYTES} bytes")
    return DocumentEvent(
        doc_id=doc_id,
        op="upsert",
        title=_check_text("title", obj.get("title"), required=False, max_chars=4096),
        text=_check_text("text", obj.get("text"), required=True, max_chars=max_text_chars),
        source=_check_text("source", obj.get("source"), required=False, max_chars=4096),
        url=_check_text("url", obj.get("url"), required=False, max_chars=4096),
        published_at=published_at,
        metadata=metadata,
        schema_version=version,
    )


# What the "stage" step writes per accepted event: the document row of the
# batch delta (upserts and deletes alike), with where in Kafka it came from.
DOC_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("op", pa.string()),
        ("title", pa.string()),
        ("source", pa.string()),
        ("url", pa.string()),
        ("published_at", pa.timestamp("us", tz="UTC")),
        ("metadata", pa.string()),  # JSON text
        ("content_hash", pa.string()),  # "" for deletes
        ("model", pa.string()),  # fingerprint of the models and settings that derived it
        ("n_chunks", pa.int32()),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
    ]
)

# A rejected message, as it goes to "<topic>.dlq": one per source message (Kafka coordinates),
# from the stage that refused it. Rows are built by ``dead_letter`` only.
DEAD_LETTER_SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("key", pa.binary()),
        ("value", pa.binary()),  # the message as received
        ("doc_id", pa.string()),  # None when parse could not read one
        ("stage", pa.string()),  # "parse", "chunk", "embed", "triples" or "amortize"
        ("error", pa.string()),  # exception class, e.g. "InvalidEvent", "RuntimeError"
        ("reason", pa.string()),  # machine-readable code, e.g. "invalid_json", "stage_error"
        ("detail", pa.string()),  # for people: the error's message, cut at MAX_DETAIL_CHARS
    ]
)
MAX_DETAIL_CHARS = 500


def dead_letter(
    source: dict[str, Any],
    *,
    stage: str,
    error: str,
    reason: str,
    detail: str,
    doc_id: str | None = None,
    key: bytes | None = None,
    value: bytes | None = None,
) -> dict[str, Any]:
    """A DEAD_LETTER_SCHEMA row for the message at ``source`` (topic, partition, offset)."""
    return {
        "topic": source["topic"],
        "partition": source["partition"],
        "offset": source["offset"],
        "key": key,
        "value": value,
        "doc_id": doc_id,
        "stage": stage,
        "error": error,
        "reason": reason,
        "detail": detail[:MAX_DETAIL_CHARS],
    }
