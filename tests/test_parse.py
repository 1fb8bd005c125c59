"""Stage "parse": the bad-input catalog of parse_event, fuzzing, and the Parse DoFn in Beam.

Every rejected message must raise :class:`InvalidEvent` with a machine-readable
``reason`` (it becomes the dead letter's reason); nothing else may escape.
"""

from __future__ import annotations

import json
import unicodedata
from datetime import UTC, datetime

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knowstream.pipelines.stages.parse import DEAD_LETTERS, Parse
from knowstream.pipelines.stages.stage import doc_row
from knowstream.schemas.event import (
    DOC_SCHEMA,
    MAX_DOC_ID_CHARS,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    OPS,
    SCHEMA_VERSION,
    DocumentEvent,
    InvalidEvent,
    parse_event,
)

pytestmark = pytest.mark.fast  # needs no service: the `make test-fast` tier

NOW = datetime(2024, 1, 1, tzinfo=UTC)  # "now" for every published_at check here
MAX_TEXT = 1000  # max_text_chars for the catalog: small, so oversize cases stay cheap

GOOD = {
    "doc_id": "Super_Bowl_50_0",
    "op": "upsert",
    "title": "Super_Bowl_50",
    "text": "Super Bowl 50 was an American football game.",
    "source": "squad-v1.1-dev",
    "url": "https://en.wikipedia.org/wiki/Super_Bowl_50",
    "published_at": "2016-06-01T00:00:00Z",
    "metadata": {"article": "Super_Bowl_50", "paragraph": 0},
    "schema_version": 1,
}


def enc(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def event(**changes: object) -> bytes:
    """GOOD with fields changed; a value of ``...`` removes the field."""
    obj = {**GOOD, **changes}
    return enc({k: v for k, v in obj.items() if v is not ...})


def nested(depth: int) -> dict:
    obj: dict = {}
    for _ in range(depth - 1):
        obj = {"x": obj}
    return obj


def parse(key: bytes | None, value: bytes | None, **kwargs) -> DocumentEvent:
    return parse_event(key, value, now=NOW, max_text_chars=MAX_TEXT, **kwargs)


# (key, value, reason): every way a message is rejected.
BAD = {
    # --- not a JSON object ---
    "not_json": (b"k", b"this line is not JSON", "invalid_json"),
    "truncated_json": (b"k", b'{"doc_id": "a", "text": "b"', "invalid_json"),
    "empty_value": (b"k", b"", "invalid_json"),
    "nan_is_not_json": (
        b"k",
        b'{"doc_id": "a", "text": "b", "metadata": {"x": NaN}}',
        "invalid_json",
    ),
    "infinity_is_not_json": (b"k", b'{"doc_id": "a", "text": "b", "n": -Infinity}', "invalid_json"),
    "json_nested_100k_deep": (b"k", b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
    "not_utf8": (b"k", b'{"doc_id": "a", "text": "caf\xe9"}', "not_utf8"),
    "utf16_bom": (b"k", "{}".encode("utf-16"), "not_utf8"),
    "json_array": (b"k", enc([GOOD]), "not_an_object"),
    "json_string": (b"k", enc("Super_Bowl_50_0"), "not_an_object"),
    "json_null": (b"k", b"null", "not_an_object"),
    # --- duplicate keys (json.loads would silently keep the last) ---
    "duplicate_key": (b"k", b'{"doc_id": "a", "text": "b", "doc_id": "c"}', "duplicate_key"),
    "duplicate_key_nested": (
        b"k",
        b'{"doc_id": "a", "text": "b", "metadata": {"x": 1, "x": 2}}',
        "duplicate_key",
    ),
    # --- doc_id ---
    "missing_doc_id": (b"k", event(doc_id=...), "missing_doc_id"),
    "empty_doc_id": (b"k", event(doc_id=""), "bad_doc_id"),
    "whitespace_doc_id": (b"k", event(doc_id=" \t\n "), "bad_doc_id"),
    "null_doc_id": (b"k", event(doc_id=None), "bad_doc_id"),
    "number_doc_id": (b"k", event(doc_id=42), "bad_doc_id"),
    "slash_in_doc_id": (b"k", event(doc_id="a/b"), "bad_doc_id"),
    "backslash_in_doc_id": (b"k", event(doc_id="a\\b"), "bad_doc_id"),
    "dotdot_doc_id": (b"k", event(doc_id=".."), "bad_doc_id"),
    "dotdot_inside_doc_id": (b"k", event(doc_id="a..b"), "bad_doc_id"),
    "nul_in_doc_id": (b"k", event(doc_id="a\x00b"), "bad_doc_id"),
    "bidi_override_in_doc_id": (b"k", event(doc_id="a\u202eb"), "bad_doc_id"),
    "lone_surrogate_in_doc_id": (b"k", b'{"doc_id": "a\\ud800b", "text": "b"}', "bad_doc_id"),
    "10kb_doc_id": (b"k", event(doc_id="x" * 10_240), "bad_doc_id"),
    # --- op ---
    "unknown_op": (b"k", event(op="patch"), "unknown_op"),
    "null_op": (b"k", event(op=None), "unknown_op"),
    "object_op": (b"k", event(op={"upsert": True}), "unknown_op"),
    # --- text ---
    "missing_text": (b"k", event(text=...), "empty_text"),
    "empty_text": (b"k", event(text=""), "empty_text"),
    "whitespace_text": (b"k", event(text="  \n\t "), "empty_text"),
    "only_control_chars_text": (b"k", event(text="\x00\x07\u202e\u200b"), "empty_text"),
    "text_over_limit": (b"k", event(text="x" * (MAX_TEXT + 1)), "too_large"),
    # --- wrong types ---
    "number_title": (b"k", event(title=50), "bad_type"),
    "number_text": (b"k", event(text=50), "bad_type"),
    "list_url": (b"k", event(url=["https://example.org"]), "bad_type"),
    "string_metadata": (b"k", event(metadata="article=Super_Bowl_50"), "bad_type"),
    "empty_string_metadata": (b"k", event(metadata=""), "bad_type"),
    "list_metadata": (b"k", event(metadata=[]), "bad_type"),
    "number_metadata": (b"k", event(metadata=0), "bad_type"),
    # --- published_at ---
    "non_iso_published_at": (b"k", event(published_at="June 1st, 2016"), "bad_published_at"),
    "number_published_at": (b"k", event(published_at=1464739200), "bad_published_at"),
    "far_future_published_at": (
        b"k",
        event(published_at="2999-01-01T00:00:00Z"),
        "bad_published_at",
    ),
    "tomorrow_plus_published_at": (
        b"k",
        event(published_at="2024-01-02T00:00:01Z"),
        "bad_published_at",
    ),
    "out_of_range_published_at": (
        b"k",
        event(published_at="9999-12-31T23:59:59-05:00"),
        "bad_published_at",
    ),
    "delete_with_bad_published_at": (
        b"k",
        enc({"doc_id": "a", "op": "delete", "published_at": "yesterday"}),
        "bad_published_at",
    ),
    # --- schema_version ---
    "future_schema_version": (
        b"k",
        event(schema_version=SCHEMA_VERSION + 1),
        "future_schema_version",
    ),
    "zero_schema_version": (b"k", event(schema_version=0), "bad_schema_version"),
    "string_schema_version": (b"k", event(schema_version="1"), "bad_schema_version"),
    "bool_schema_version": (b"k", event(schema_version=True), "bad_schema_version"),
    "float_schema_version": (b"k", event(schema_version=1.0), "bad_schema_version"),
    # --- metadata ---
    "metadata_100_deep": (b"k", event(metadata=nested(100)), "too_deep"),
    "metadata_1mb": (b"k", event(metadata={"blob": "x" * (1 << 20)}), "too_large"),
    "metadata_over_limit_in_utf8_bytes": (
        b"k",
        event(metadata={"blob": "é" * (MAX_METADATA_BYTES // 2)}),
        "too_large",
    ),
    "lone_surrogate_in_metadata": (
        b"k",
        b'{"doc_id": "a", "text": "b", "metadata": {"x": "\\ud800"}}',
        "not_utf8",
    ),
    # --- Kafka tombstones (value None) ---
    "tombstone_without_key": (None, None, "tombstone_without_key"),
    "tombstone_with_empty_key": (b"", None, "tombstone_without_key"),
    "tombstone_with_non_utf8_key": (b"\xff\xfe", None, "not_utf8"),
    "tombstone_with_path_key": (b"../etc/passwd", None, "bad_doc_id"),
}


@pytest.mark.parametrize(("key", "value", "reason"), list(BAD.values()), ids=list(BAD))
def test_bad_input_is_rejected_with_reason(key, value, reason):
    with pytest.raises(InvalidEvent) as info:
        parse(key, value)
    assert info.value.reason == reason, info.value.detail
    assert info.value.detail
    assert isinstance(info.value, ValueError)  # callers may catch it as a ValueError


def test_catalog_covers_every_limit():
    # The limits the catalog is built around, so a change to them is a change to the tests.
    assert MAX_DOC_ID_CHARS < 10_240
    assert MAX_METADATA_DEPTH < 100
    assert MAX_METADATA_BYTES < 1 << 20
    assert len(BAD) >= 20


# --- valid messages ---


def test_valid_upsert():
    e = parse(b"Super_Bowl_50_0", event())
    assert e == DocumentEvent(
        doc_id="Super_Bowl_50_0",
        op="upsert",
        title="Super_Bowl_50",
        text=GOOD["text"],
        source="squad-v1.1-dev",
        url="https://en.wikipedia.org/wiki/Super_Bowl_50",
        published_at=datetime(2016, 6, 1, tzinfo=UTC),
        metadata={"article": "Super_Bowl_50", "paragraph": 0},
        schema_version=1,
    )


def test_minimal_upsert_gets_defaults():
    e = parse(None, enc({"doc_id": "a", "text": "b"}))
    assert (e.op, e.title, e.source, e.url, e.published_at, e.metadata) == (
        "upsert",
        "",
        "",
        "",
        None,
        {},
    )
    assert e.schema_version == SCHEMA_VERSION


def test_null_optional_fields_are_empty():
    e = parse(None, event(title=None, source=None, url=None, published_at=None, metadata=None))
    assert (e.title, e.source, e.url, e.published_at, e.metadata) == ("", "", "", None, {})


def test_valid_delete_needs_only_id_and_op():
    e = parse(b"a", enc({"doc_id": "a", "op": "delete", "schema_version": 1}))
    assert e == DocumentEvent(doc_id="a", op="delete")


def test_delete_keeps_published_at_and_ignores_the_rest():
    e = parse(None, event(op="delete", text="", metadata="ignored"))
    assert e.op == "delete" and e.text == "" and e.metadata == {}
    assert e.published_at == datetime(2016, 6, 1, tzinfo=UTC)


def test_tombstone_with_key_is_a_delete():
    assert parse(b"Black_Death_0", None) == DocumentEvent(doc_id="Black_Death_0", op="delete")


def test_published_at_is_normalized_to_utc():
    assert parse(None, event(published_at="2016-06-01T02:00:00+02:00")).published_at == datetime(
        2016, 6, 1, tzinfo=UTC
    )
    naive = parse(None, event(published_at="2016-06-01T00:00:00")).published_at
    assert naive == datetime(2016, 6, 1, tzinfo=UTC) and naive.tzinfo is not None


def test_small_clock_skew_is_tolerated():
    e = parse(None, event(published_at="2024-01-01T12:00:00Z"))  # 12 h after NOW
    assert e.published_at == datetime(2024, 1, 1, 12, tzinfo=UTC)


def test_text_at_the_limit_is_accepted():
    assert len(parse(None, event(text="x" * MAX_TEXT)).text) == MAX_TEXT


def test_default_text_limit():
    assert len(parse_event(None, event(text="x" * 200_000), now=NOW).text) == 200_000
    with pytest.raises(InvalidEvent, match="too_large"):
        parse_event(None, event(text="x" * 200_001), now=NOW)


def test_control_and_bidi_characters_are_cleaned_not_rejected():
    dirty = (
        "Line one\x00 with NUL,\x07 bell,\x1b[31m escape.\n"
        "\u202eReversed\u202c and \u2066isolated\u2069,\u200b zero\u200dwidth\ufeff.\r\n"
        "\tTabbed line.\x7f"
    )
    e = parse(None, event(text=dirty, title="Title\u202e\x00"))
    for s in (e.text, e.title):
        assert not [c for c in s if c not in "\n\t" and unicodedata.category(c) in ("Cc", "Cf")]
    assert e.title == "Title"
    assert e.text.count("\n") == 2 and "\tTabbed line." in e.text  # structure kept
    assert "Reversed and isolated, zerowidth." in e.text
    assert "\r" not in e.text  # a carriage return is a control character


def test_content_hash_covers_content_only():
    a = parse(None, event())
    assert a.content_hash == parse(None, event()).content_hash
    same = parse(None, event(published_at="2016-07-01T00:00:00Z", metadata={"x": 1}))
    assert same.content_hash == a.content_hash  # when and extras do not change derived data
    assert parse(None, event(text="Other.")).content_hash != a.content_hash
    assert parse(None, event(title="Other")).content_hash != a.content_hash


def test_sample_stream_parses():
    from pathlib import Path

    lines = (Path(__file__).resolve().parents[1] / "data" / "sample" / "stream.jsonl").read_bytes()
    events = [parse_event(None, line) for line in lines.splitlines()[:50]]
    assert len({e.doc_id for e in events}) == 50 and all(e.op == "upsert" for e in events)


# --- property-based: nothing but InvalidEvent escapes, and what passes can be staged ---


def check(key: bytes | None, value: bytes | None) -> None:
    try:
        e = parse_event(key, value, max_text_chars=MAX_TEXT, now=NOW)
    except InvalidEvent as err:
        assert err.reason and err.reason.replace("_", "").isalnum()
        return
    assert isinstance(e, DocumentEvent) and e.op in OPS
    assert e.doc_id.strip() and len(e.doc_id) <= MAX_DOC_ID_CHARS
    if e.op == "upsert":
        assert e.text.strip()
    for s in (e.text, e.title, e.source, e.url):
        assert all(c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf", "Cs") for c in s)
    # What parse accepts must survive the next stages: hashing and a Parquet doc row.
    e.content_hash.encode()
    row = doc_row({"event": e, "topic": "t", "partition": 0, "offset": 0}, "model", 1)
    pa.Table.from_pylist([row], schema=DOC_SCHEMA)


# Lone surrogates included: JSON's "\ud800" escape decodes to one.
any_char = st.characters(exclude_categories=())
any_text = st.text(any_char, max_size=20)
json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
FIELDS = [*GOOD]
DROP = object()  # a change that removes the field
near_valid_field = {
    "doc_id": st.sampled_from(["a", "Super_Bowl_50_0", "", " ", "a/b", "..", "a\ud800"]) | any_text,
    "op": st.sampled_from([*OPS, "patch", "UPSERT"]) | json_value,
    "title": any_text | json_value,
    "text": any_text
    | st.sampled_from(["x" * MAX_TEXT, "x" * (MAX_TEXT + 1), "\u202e"])
    | json_value,
    "published_at": st.sampled_from(
        [
            "2016-06-01T00:00:00Z",
            "2016-06-01",
            "2024-01-02T00:00:00+00:00",
            "2999-01-01T00:00:00Z",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "2016-06-01T00:00:00+23:59",
        ]
    )
    | st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat())
    | json_value,
    "metadata": st.dictionaries(any_text, json_value, max_size=4) | json_value,
    "schema_version": st.sampled_from([1, 2, 0, -1, True, 1.0, "1"]) | json_value,
}
near_valid_field["source"] = near_valid_field["url"] = near_valid_field["title"]
# A valid event (upsert, minimal upsert or delete) with up to 3 fields replaced or dropped:
# most examples get past the early checks and exercise the later ones.
BASES = [GOOD, {"doc_id": "a", "text": "b"}, {"doc_id": "a", "op": "delete"}]
changes = st.lists(st.sampled_from(FIELDS), max_size=3, unique=True).flatmap(
    lambda fields: st.fixed_dictionaries({f: st.just(DROP) | near_valid_field[f] for f in fields})
)
near_valid_events = st.builds(
    lambda base, change: {k: v for k, v in {**base, **change}.items() if v is not DROP},
    st.sampled_from(BASES),
    changes,
) | st.dictionaries(st.sampled_from(FIELDS) | any_text, json_value, max_size=6)
keys = st.none() | st.binary(max_size=12) | any_text.map(lambda s: s.encode("utf-8", "replace"))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(key=keys, value=st.none() | st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(key, value):
    check(key, value)


@FUZZ
@given(key=keys, obj=json_value)
def test_fuzz_arbitrary_json(key, obj):
    check(key, json.dumps(obj).encode())


@FUZZ
@given(key=keys, obj=near_valid_events, ascii_only=st.booleans())
def test_fuzz_near_valid_events(key, obj, ascii_only):
    # ensure_ascii=False puts lone surrogates in raw: not UTF-8, caught as such.
    check(key, json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))


@FUZZ
@given(
    obj=near_valid_events, cut=st.integers(min_value=0, max_value=400), byte=st.binary(max_size=3)
)
def test_fuzz_corrupted_json(obj, cut, byte):
    raw = json.dumps(obj).encode()
    check(None, raw[:cut] + byte + raw[cut:])


# --- the Parse DoFn in a real Beam pipeline ---


def test_parse_dofn_routes_bad_records_to_dead_letters():
    def record(offset: int, key: bytes | None, value: bytes | None) -> dict:
        return {"topic": "docs", "partition": 0, "offset": offset, "key": key, "value": value}

    records = [
        record(0, b"a", enc({"doc_id": "a", "text": "Alpha."})),
        record(1, b"x", b"not JSON"),
        record(2, None, enc({"op": "upsert", "text": "no id"})),
        record(3, b"b", None),  # tombstone: delete of b
        record(4, None, None),  # tombstone without a key
        record(5, b"c", enc({"doc_id": "c", "text": "x" * 101})),  # over max_text_chars=100
        record(6, b"d", enc({"doc_id": "d", "op": "delete"})),
    ]
    options = PipelineOptions(["--runner=FnApiRunner"])
    with BeamTestPipeline(options=options) as p:
        out = (
            p
            | beam.Create(records)
            | beam.ParDo(Parse(max_text_chars=100)).with_outputs(DEAD_LETTERS, main="events")
        )
        events = out.events | "events" >> beam.Map(
            lambda s: (s["offset"], s["topic"], s["partition"], s["event"].doc_id, s["event"].op)
        )
        letters = out[DEAD_LETTERS] | "letters" >> beam.Map(
            lambda d: (d["offset"], d["topic"], d["partition"], d["key"], d["value"], d["reason"])
        )
        assert_that(
            events,
            equal_to(
                [
                    (0, "docs", 0, "a", "upsert"),
                    (3, "docs", 0, "b", "delete"),
                    (6, "docs", 0, "d", "delete"),
                ]
            ),
            label="good records",
        )
        assert_that(
            letters,
            equal_to(
                [
                    (1, "docs", 0, b"x", b"not JSON", "invalid_json"),
                    (2, "docs", 0, None, records[2]["value"], "missing_doc_id"),
                    (4, "docs", 0, None, None, "tombstone_without_key"),
                    (5, "docs", 0, b"c", records[5]["value"], "too_large"),
                ]
            ),
            label="dead letters",
        )
        details = out[DEAD_LETTERS] | "details" >> beam.Map(lambda d: bool(d["detail"]))
        assert_that(details, equal_to([True] * 4), label="every letter explains itself")
