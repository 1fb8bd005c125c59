"""Tests for knowstream.pipelines.stages.triples (rules over a real spaCy parse)."""

from __future__ import annotations

import pytest
from spacy.language import Language

from knowstream.pipelines.stages.triples import (
    TRIPLES_VERSION,
    Fact,
    extract_facts,
    extract_facts_many,
    load_nlp,
)

pytestmark = pytest.mark.fast  # needs no service: the `make test-fast` tier

SUPER_BOWL_50_0 = (
    "Super Bowl 50 was an American football game to determine the champion of the National "
    "Football League (NFL) for the 2015 season. The American Football Conference (AFC) champion "
    "Denver Broncos defeated the National Football Conference (NFC) champion Carolina Panthers "
    "24–10 to earn their third Super Bowl title. The game was played on February 7, 2016, at "
    "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California."
)


@pytest.fixture(scope="module")
def nlp() -> Language:
    return load_nlp()


def triples(nlp: Language, text: str) -> set[tuple[str, str, str]]:
    return {(f.subject, f.relation, f.object) for f in extract_facts(nlp, text)}


def test_active_verb_with_direct_object(nlp: Language):
    facts = triples(nlp, "The Denver Broncos defeated the Carolina Panthers.")
    assert ("Denver Broncos", "defeat", "Carolina Panthers") in facts


def test_passive_verb_with_preposition(nlp: Language):
    facts = triples(nlp, "The game was played at Levi's Stadium.")
    assert ("game", "play at", "Levi's Stadium") in facts


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "The Yuan dynasty was established by Kublai Khan.",
            ("Kublai Khan", "establish", "Yuan dynasty"),
        ),
        (
            "The Panthers were defeated by the Denver Broncos.",
            ("Denver Broncos", "defeat", "Panthers"),
        ),
    ],
)
def test_passive_with_agent_reads_actively(nlp: Language, text: str, expected):
    facts = triples(nlp, text)
    assert expected in facts
    # The patient is never reported as the doer.
    assert (expected[2], expected[1], expected[0]) not in facts


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Newton did not win the game.", ("Newton", "not win", "game")),
        ("The Broncos never trailed the Panthers.", ("Broncos", "not trail", "Panthers")),
    ],
)
def test_negation_prefixes_relation(nlp: Language, text: str, expected):
    facts = triples(nlp, text)
    assert expected in facts
    assert (expected[0], expected[1].removeprefix("not "), expected[2]) not in facts


def test_pronoun_subjects_are_skipped(nlp: Language):
    assert triples(nlp, "He founded the company in 1995. They won it.") == set()


def test_relative_pronoun_resolves_to_antecedent(nlp: Language):
    facts = triples(
        nlp,
        "Newton was limited by Denver's defense, which sacked him seven times and forced him "
        "into three turnovers.",
    )
    assert ("Denver's defense", "limit", "Newton") in facts
    assert ("Denver's defense", "force into", "three turnovers") in facts
    assert not any(s in {"which", "him"} or o in {"which", "him"} for s, _, o in facts)


def test_copula_and_apposition_share_is(nlp: Language):
    assert ("Super Bowl 50", "is", "American football game") in triples(
        nlp, "Super Bowl 50 was an American football game."
    )
    facts = triples(nlp, "The Denver Broncos, the AFC champion, won Super Bowl 50.")
    assert ("Denver Broncos", "is", "AFC champion") in facts
    assert ("Denver Broncos", "win", "Super Bowl 50") in facts


def test_conjunctions_expand_subjects_and_objects(nlp: Language):
    facts = triples(nlp, "Tesla and Edison built generators and motors.")
    assert facts >= {
        ("Tesla", "build", "generators"),
        ("Tesla", "build", "motors"),
        ("Edison", "build", "generators"),
        ("Edison", "build", "motors"),
    }


def test_coordinated_verb_borrows_subject(nlp: Language):
    facts = triples(nlp, "The Broncos won the game and earned a title.")
    assert {("Broncos", "win", "game"), ("Broncos", "earn", "title")} <= facts


def test_discourse_phrases_are_not_facts(nlp: Language):
    facts = triples(nlp, "For example, Tesla built motors in 1888.")
    assert ("Tesla", "build in", "1888") in facts
    assert not any(o == "example" for _, _, o in facts)


def test_squad_passage(nlp: Language):
    facts = triples(nlp, SUPER_BOWL_50_0)
    # The parse makes "Denver Broncos" an apposition of "champion"; the name wins as node.
    assert ("Denver Broncos", "defeat", "Carolina Panthers") in facts
    assert ("Denver Broncos", "is", "American Football Conference (AFC) champion") in facts
    assert ("game", "play at", "Levi's Stadium") in facts
    assert ("game", "play on", "February 7, 2016") in facts
    assert ("Santa Clara", "is in", "California") in facts


def test_ends_are_exact_substrings_and_spans_are_sentences(nlp: Language):
    text = "Oxygen is a chemical element.  The Denver Broncos defeated the Carolina Panthers."
    facts = extract_facts(nlp, text)
    assert facts
    for fact in facts:
        sentence = text[fact.char_start : fact.char_end]
        assert fact.subject in sentence and fact.object in sentence
        assert sentence == sentence.strip() and sentence.endswith(".")
    broncos = next(f for f in facts if f.subject == "Denver Broncos")
    assert text[broncos.char_start : broncos.char_end] == (
        "The Denver Broncos defeated the Carolina Panthers."
    )


def test_confidence_is_bounded_and_favors_named_short_ends(nlp: Language):
    named = extract_facts(nlp, "The Denver Broncos defeated the Carolina Panthers.")
    plain = extract_facts(nlp, "The team defeated the opponent.")
    assert plain and named
    assert all(0.0 <= f.confidence <= 1.0 for f in extract_facts(nlp, SUPER_BOWL_50_0))
    assert max(f.confidence for f in named) > max(f.confidence for f in plain)


def test_deduplicates_per_text(nlp: Language):
    once = extract_facts(nlp, "The Denver Broncos defeated the Carolina Panthers.")
    twice = extract_facts(
        nlp,
        "The Denver Broncos defeated the Carolina Panthers. "
        "The Denver Broncos defeated the Carolina Panthers.",
    )
    keys = [(f.subject.casefold(), f.relation, f.object.casefold()) for f in twice]
    assert len(keys) == len(set(keys))
    assert {(f.subject, f.relation, f.object) for f in twice} == {
        (f.subject, f.relation, f.object) for f in once
    }


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_text_gives_no_facts(nlp: Language, text: str):
    assert extract_facts(nlp, text) == []


def test_many_matches_one_at_a_time(nlp: Language):
    texts = [SUPER_BOWL_50_0, "", "The game was played at Levi's Stadium.", "He won."]
    many = extract_facts_many(nlp, texts, batch_size=2)
    assert many == [extract_facts(nlp, t) for t in texts]
    assert many[1] == [] and many[3] == []


def test_deterministic_and_cached(nlp: Language):
    assert load_nlp() is nlp
    assert extract_facts(nlp, SUPER_BOWL_50_0) == extract_facts(nlp, SUPER_BOWL_50_0)
    assert all(isinstance(f, Fact) for f in extract_facts(nlp, SUPER_BOWL_50_0))
    assert TRIPLES_VERSION.startswith("rules-")


def test_triples_dofn_in_pipeline(nlp: Language):
    """The Triples model in a real Beam pipeline (RunInference): facts land in the chunk of
    their sentence; a document that raises fails alone, its batch neighbours go on."""
    from datetime import UTC, datetime

    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from knowstream.pipelines.faults import Isolated
    from knowstream.pipelines.stages.triples import Triples
    from knowstream.schemas.triple import TRIPLE_SCHEMA

    when = datetime(2016, 6, 1, tzinfo=UTC)
    cut = SUPER_BOWL_50_0.index("The American")  # chunk 0: sentence one; chunk 1: the rest
    chunks = [
        {"chunk_id": "c0", "char_start": 0, "char_end": cut - 1},
        {"chunk_id": "c1", "char_start": cut, "char_end": len(SUPER_BOWL_50_0)},
    ]
    batch = [
        {"doc": {"doc_id": "sb"}, "text": SUPER_BOWL_50_0, "published_at": when, "chunks": chunks},
        {"doc": {"doc_id": "empty"}, "text": "", "published_at": None, "chunks": []},
        {"doc": {"doc_id": "unchunked"}, "text": "He won.", "published_at": None, "chunks": []},
    ]
    facts = extract_facts(nlp, SUPER_BOWL_50_0)
    want = [
        {
            "subject": f.subject,
            "relation": f.relation,
            "object": f.object,
            "doc_id": "sb",
            "chunk_id": "c0" if f.char_start < cut else "c1",
            "confidence": f.confidence,
            "observed_at": when,
        }
        for f in facts
    ]
    homes = {(r["subject"], r["relation"], r["object"]): r["chunk_id"] for r in want}
    assert homes[("Denver Broncos", "defeat", "Carolina Panthers")] == "c1"
    assert "c0" in homes.values()
    assert all(list(r) == TRIPLE_SCHEMA.names for r in want)

    options = PipelineOptions(["--runner=FnApiRunner"])
    with BeamTestPipeline(options=options) as p:
        rows = p | beam.Create(batch) | RunInference(Triples())
        assert_that(rows, equal_to(want))
        faulty = Triples(batch_size=3, fail={"empty"})  # fails the batch of all three
        kept, failures = p | "again" >> beam.Create(batch) | Isolated(faulty)
        assert_that(kept, equal_to(want), label="kept")
        assert_that(
            failures | beam.Map(lambda f: (f[0], f[1]["stage"])),
            equal_to([("empty", "triples")]),
            label="failures",
        )
