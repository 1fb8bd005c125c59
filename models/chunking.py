"""Token-aware chunking of a document into overlapping windows of word pieces.

Pure functions only (no apache_beam): the "chunk" stage (`pipelines/stages/chunk.py`) calls
`chunk_spans` once per document and turns each `Span` into a chunk record; evaluation's retrieval
(`models/retrieve.py`) cuts passages with the same function.

Why count tokens instead of characters: the chunks are embedded by all-MiniLM-L6-v2 and read by
a frozen LM, and both have budgets in *word pieces*, not characters. A character budget either
wastes capacity on plain English or overflows (and is silently truncated by the encoder) on text
with numbers, names and non-ASCII characters, which split into many more pieces per character.
Counting with the embedder's own tokenizer makes "≤ max_tokens" a promise the encoder keeps.

Why spans instead of strings: a chunk is always `text[char_start:char_end]` of the original
document, never text decoded back from token ids. Decoding lowercases, strips accents and
re-spaces punctuation ("Levi's" -> "levi ' s"), which would break exact citation highlighting and
make answer spans (SQuAD `answer_starts`) impossible to map onto chunks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Recorded in every snapshot manifest; bump it whenever the same text and arguments could give
# different spans, so snapshots built by different chunkers are never mistaken for equal.
CHUNKER_VERSION = "chunk-v1"

# Fraction of a window, counted from its end, in which we look for a sentence boundary.
SENTENCE_SNAP_FRACTION = 0.25

# Where a sentence ends: terminal punctuation (plus closing quotes/brackets) followed by
# whitespace and a character that is not a lowercase letter, or the last non-space before a
# newline. The lowercase check is a cheap guard against abbreviations like "e.g. the" or
# "approx. five"; it still splits after "U.S. Army", an accepted cost of a regex heuristic that
# runs on every document without a sentence model.
_SENTENCE_END = re.compile(r"""[.!?]+["'”’)\]]*(?=\s+[^a-z\s])|\S(?=[ \t]*\n)""")


@dataclass(frozen=True)
class Span:
    """One chunk of a document: `text[char_start:char_end]` holds `n_tokens` word pieces."""

    index: int
    char_start: int
    char_end: int
    n_tokens: int


def _sentence_end_offsets(text: str) -> set[int]:
    """Character offsets just past the end of each sentence in `text`."""
    return {m.end() for m in _SENTENCE_END.finditer(text)}


def chunk_spans(
    text: str,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    overlap: int,
) -> list[Span]:
    """Split `text` into windows of at most `max_tokens` word pieces, `overlap` shared.

    `tokenizer` must be a Hugging Face *fast* tokenizer (only those return offset mappings).
    Special tokens are not counted: a caller embedding with [CLS]/[SEP] should pass
    `max_tokens <= model_max_length - 2`.

    Windows step by `max_tokens - overlap` tokens. A window that is not the last one is cut
    short at the latest sentence end found in its last ~25% of tokens (see below), and the next
    window then starts `overlap` tokens before that cut, so consecutive chunks always share
    exactly `overlap` tokens.

    The chunks together cover the stripped text: the first starts at its first non-space
    character, the last ends at its last one, and each chunk's end is stretched over any
    characters the tokenizer dropped (control or zero-width characters) up to the next token,
    so with `overlap=0` only whitespace falls between chunks. Text that yields no tokens
    (empty, whitespace, or only characters the normaliser deletes) gives `[]`.

    Raises:
        ValueError: if `max_tokens < 1`, `overlap < 0`, `overlap >= max_tokens`, or the
            tokenizer is not a fast tokenizer.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if overlap < 0 or overlap >= max_tokens:
        raise ValueError(f"overlap must be in [0, max_tokens), got {overlap} for {max_tokens}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("chunk_spans needs a fast tokenizer (offset mappings)")

    encoding = tokenizer(
        text,
        add_special_tokens=False,
        return_offsets_mapping=True,
        truncation=False,
        # Documents are longer than the model's 512 on purpose; that is why we chunk.
        verbose=False,
    )
    # Zero-width offsets would come from special or synthetic tokens; they cover no text.
    offsets: list[tuple[int, int]] = [(s, e) for s, e in encoding["offset_mapping"] if e > s]
    n = len(offsets)
    if n == 0:
        return []

    text_start = len(text) - len(text.lstrip())
    sentence_ends = _sentence_end_offsets(text)
    # The snap region starts this many tokens into a full window.
    snap_from = max_tokens - max(1, int(max_tokens * SENTENCE_SNAP_FRACTION))

    spans: list[Span] = []
    start = 0
    while True:
        end = min(start + max_tokens, n)
        if end < n:
            end = _snap_to_sentence(offsets, sentence_ends, start, end, snap_from, overlap)
        # Stretch over characters dropped before the next token, but not over whitespace.
        next_char = offsets[end][0] if end < n else len(text)
        char_end = len(text[:next_char].rstrip())
        char_start = text_start if start == 0 else offsets[start][0]
        spans.append(Span(len(spans), char_start, char_end, end - start))
        if end == n:
            return spans
        start = end - overlap


def _snap_to_sentence(
    offsets: list[tuple[int, int]],
    sentence_ends: set[int],
    start: int,
    end: int,
    snap_from: int,
    overlap: int,
) -> int:
    """Return the exclusive token end of the window `[start, end)` after sentence snapping.

    Why snap: a chunk is the unit the retriever scores and the LM reads as evidence. A sentence
    cut in half embeds as two half-statements, neither of which matches a question about the
    fact well, and the reader sees a truncated claim. Ending on a sentence keeps facts whole.

    Why only in the last ~25%: snapping anywhere would let chunks shrink far below the budget,
    multiplying chunk count (memory size, embedding cost, retrieval noise) on text with short
    sentences. Limiting the search to the tail bounds the loss to a quarter of a window, and
    picking the *latest* boundary in that tail keeps chunks as full as possible. If no
    boundary lies there (one long sentence, a table), we cut at the token budget.

    The cut must also leave the next window starting after `start` (`end - overlap > start`),
    or a large overlap could stall the loop.
    """
    lowest = max(start + snap_from, start + overlap + 1)
    for cut in range(end, lowest - 1, -1):
        # `cut` tokens kept: the boundary must sit right after token `cut - 1`.
        if offsets[cut - 1][1] in sentence_ends:
            return cut
    return end
