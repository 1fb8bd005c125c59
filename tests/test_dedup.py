"""Stage "dedup": which event of a batch wins, and whether it changes the memory."""

from __future__ import annotations

from datetime import UTC, datetime

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from knowstream.pipelines.stages.dedup import SKIPPED, Dedup, decide
from knowstream.schemas.event import DocumentEvent

pytestmark = pytest.mark.fast  # needs no service: the `make test-fast` tier

MODEL = "model-a"
T1 = datetime(2016, 6, 1, tzinfo=UTC)
T2 = datetime(2016, 7, 1, tzinfo=UTC)
T3 = datetime(2016, 8, 1, tzinfo=UTC)


def upsert(
    text: str = "Alpha.", at: datetime | None = T2, offset: int = 0, doc_id: str = "a"
) -> dict:
    e = DocumentEvent(doc_id=doc_id, op="upsert", text=text, published_at=at)
    return {"event": e, "topic": "docs", "partition": 0, "offset": offset}


def delete(at: datetime | None = T2, offset: int = 0, doc_id: str = "a") -> dict:
    e = DocumentEvent(doc_id=doc_id, op="delete", published_at=at)
    return {"event": e, "topic": "docs", "partition": 0, "offset": offset}


def known_doc(text: str = "Alpha.", at: datetime | None = T2, model: str = MODEL) -> dict:
    """What the parent version serves for a doc made from ``upsert(text)``."""
    return {
        "kind": "doc",
        "content_hash": upsert(text)["event"].content_hash,
        "published_at": at.isoformat() if at else None,
        "model": model,
    }


def tombstone(at: datetime | None = T2) -> dict:
    return {
        "kind": "tombstone",
        "content_hash": "",
        "published_at": at.isoformat() if at else None,
        "model": "",
    }


# --- within a batch ---


def test_latest_published_at_wins_over_later_offset():
    newer, older = upsert("New.", at=T3, offset=1), upsert("Old.", at=T1, offset=2)
    winner, reason = decide([newer, older], None, MODEL)
    assert winner is newer and reason == "upsert"


def test_tie_on_published_at_goes_to_later_offset():
    first, second = upsert("First.", at=T2, offset=5), upsert("Second.", at=T2, offset=9)
    assert decide([second, first], None, MODEL)[0] is second


def test_without_published_at_later_offset_wins():
    first, second = upsert("First.", at=None, offset=5), upsert("Second.", at=None, offset=9)
    assert decide([second, first], None, MODEL)[0] is second


def test_later_delete_in_batch_wins():
    winner, reason = decide(
        [upsert(at=T2, offset=1), delete(at=T3, offset=2)], known_doc(at=T1), MODEL
    )
    assert winner["event"].op == "delete" and reason == "delete"


def test_upsert_after_delete_in_batch_wins():
    winner, reason = decide([delete(at=T2, offset=1), upsert(at=T3, offset=2)], None, MODEL)
    assert winner["event"].op == "upsert" and reason == "upsert"


def test_replayed_batch_gives_the_same_winner():
    events = [upsert("A.", at=T1, offset=1), upsert("B.", at=T3, offset=2), delete(T2, 3)]
    assert decide(events, None, MODEL) == decide(list(reversed(events)), None, MODEL)


# --- against the memory ---


def test_new_doc_is_an_upsert():
    event = upsert()
    assert decide([event], None, MODEL) == (event, "upsert")


def test_older_event_than_memory_is_stale():
    assert decide([upsert("Older.", at=T1)], known_doc(at=T2), MODEL) == (None, "stale")


def test_older_delete_than_memory_is_stale():
    assert decide([delete(at=T1)], known_doc(at=T2), MODEL) == (None, "stale")


def test_same_published_at_with_new_content_is_not_stale():
    event = upsert("Changed.", at=T2)
    assert decide([event], known_doc("Alpha.", at=T2), MODEL) == (event, "upsert")


def test_newer_changed_content_is_an_upsert():
    event = upsert("Changed.", at=T3)
    assert decide([event], known_doc("Alpha.", at=T2), MODEL) == (event, "upsert")


def test_unchanged_content_and_model_is_skipped():
    assert decide([upsert("Alpha.", at=T3)], known_doc("Alpha.", at=T2), MODEL) == (
        None,
        "unchanged",
    )


def test_unchanged_content_with_new_model_is_rebuilt():
    event = upsert("Alpha.", at=T3)
    assert decide([event], known_doc("Alpha.", at=T2, model="model-old"), MODEL) == (
        event,
        "upsert",
    )


def test_metadata_or_time_alone_does_not_count_as_change():
    e = DocumentEvent(doc_id="a", op="upsert", text="Alpha.", published_at=T3, metadata={"x": 1})
    sourced = {"event": e, "topic": "docs", "partition": 0, "offset": 0}
    assert decide([sourced], known_doc("Alpha.", at=T2), MODEL) == (None, "unchanged")


@pytest.mark.parametrize(
    ("event_at", "known_at"), [(None, T2), (T2, None), (None, None)], ids=["event", "known", "both"]
)
def test_without_a_time_to_compare_nothing_is_stale(event_at, known_at):
    event = upsert("Changed.", at=event_at)
    assert decide([event], known_doc("Alpha.", at=known_at), MODEL) == (event, "upsert")


def test_delete_of_known_doc():
    event = delete(at=T3)
    assert decide([event], known_doc(at=T2), MODEL) == (event, "delete")


def test_delete_of_unknown_doc_leaves_a_tombstone():
    # The doc may have been created and deleted within one batch: a late copy of
    # its upsert must find a tombstone.
    event = delete()
    assert decide([event], None, MODEL) == (event, "delete")


def test_create_and_delete_in_one_batch_then_late_upsert_stays_deleted():
    events = [upsert(at=T1, offset=0), delete(at=T2, offset=1)]
    winner, why = decide(events, None, MODEL)
    assert why == "delete" and winner["event"].op == "delete"
    assert decide([upsert(at=T1, offset=5)], tombstone(at=T2), MODEL) == (None, "stale")


@pytest.mark.parametrize("tomb_at", [T1, None], ids=["older-tombstone", "tombstone-no-time"])
def test_newer_delete_refreshes_the_tombstone(tomb_at):
    event = delete(at=T2)
    assert decide([event], tombstone(tomb_at), MODEL) == (event, "delete")


@pytest.mark.parametrize("at", [T2, None], ids=["same-time", "undated"])
def test_delete_no_newer_than_the_tombstone_is_a_no_op(at):
    assert decide([delete(at=at)], tombstone(at=T2), MODEL) == (None, "delete_repeated")


def test_late_older_upsert_after_delete_is_stale():
    # The delete at T3 left a tombstone; an upsert published at T2 arrives later.
    assert decide([upsert(at=T2, offset=99)], tombstone(at=T3), MODEL) == (None, "stale")


def test_newer_upsert_after_delete_resurrects():
    event = upsert(at=T3)
    assert decide([event], tombstone(at=T2), MODEL) == (event, "upsert")


def test_unchanged_is_judged_on_the_batch_winner():
    # The memory holds "Alpha."; the batch changes it and then changes it back.
    events = [upsert("Beta.", at=T2, offset=1), upsert("Alpha.", at=T3, offset=2)]
    assert decide(events, known_doc("Alpha.", at=T1), MODEL) == (None, "unchanged")


# --- the Dedup DoFn in a real Beam pipeline ---


def test_dedup_dofn_in_pipeline():
    events = [
        upsert("New.", at=T1, offset=0, doc_id="new"),
        upsert("Old.", at=T1, offset=1, doc_id="changed"),
        upsert("Newer.", at=T3, offset=2, doc_id="changed"),
        upsert("Same.", at=T3, offset=3, doc_id="same"),
        upsert("Late.", at=T1, offset=4, doc_id="late"),
        delete(at=T3, offset=5, doc_id="gone"),
        delete(at=T3, offset=6, doc_id="never"),
        delete(at=T3, offset=7, doc_id="already"),
    ]
    known = {
        "changed": known_doc("Old.", at=T1),
        "same": known_doc("Same.", at=T2),
        "late": known_doc("Late now.", at=T2),
        "gone": known_doc(at=T2),
        "already": tombstone(at=T2),
    }
    options = PipelineOptions(["--runner=FnApiRunner"])
    with BeamTestPipeline(options=options) as p:
        out = (
            p
            | beam.Create(events)
            | beam.Map(lambda s: (s["event"].doc_id, s))
            | beam.GroupByKey()
            | beam.ParDo(Dedup(known, MODEL)).with_outputs(SKIPPED, main="changes")
        )
        changes = out.changes | "changes" >> beam.Map(
            lambda s: (s["event"].doc_id, s["event"].op, s["offset"])
        )
        assert_that(
            changes,
            equal_to(
                [
                    ("new", "upsert", 0),
                    ("changed", "upsert", 2),
                    ("gone", "delete", 5),
                    ("never", "delete", 6),
                    ("already", "delete", 7),
                ]
            ),
            label="changes",
        )
        assert_that(
            out[SKIPPED],
            equal_to([("unchanged", "same"), ("stale", "late")]),
            label="skipped",
        )
