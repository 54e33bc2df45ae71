"""Aligning word tags to SentencePiece pieces by character offsets.

Rules (docs/design.md section 1): a word split into k pieces repeats its tags on all k; a piece
covering several words takes the tags of the word holding its first non-space character; a
piece of whitespace only (or a "▁" with no characters) gets NONE.
"""
from __future__ import annotations

import numpy as np

from lime_jax.ids import NONE_ID

TOKENIZATIONS = ("lime", "plain")
MAX_SUBWORD_INDEX = 64
SUBWORD_INDEX_VOCAB = MAX_SUBWORD_INDEX + 2  # PAD, NONE, places 1..64

# Code points that `str.isspace()` accepts; spaCy and SentencePiece both treat them as spaces.
_SPACE_CODEPOINTS = np.array([c for c in range(0x3001) if chr(c).isspace()], np.uint32)


def codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), np.uint32)


def word_index_of_chars(num_chars: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For each character, the index of the word that holds it, or -1."""
    word_of_char = np.full(num_chars + 1, -1, np.int64)  # +1: a sentinel past the end
    lengths = ends - starts
    if len(lengths):
        word_ids = np.repeat(np.arange(len(starts)), lengths)
        char_ids = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        word_of_char[char_ids] = word_ids
    return word_of_char


def next_non_space(text: str) -> np.ndarray:
    """For each position p (and len(text)), the first q >= p whose character is not a space."""
    cps = codepoints(text)
    n = len(cps)
    non_space = ~np.isin(cps, _SPACE_CODEPOINTS)
    idx = np.where(non_space, np.arange(n), n)
    nxt = np.minimum.accumulate(idx[::-1])[::-1] if n else idx
    return np.append(nxt, n)


def subword_index(word_of_piece: np.ndarray) -> np.ndarray:
    """Feature `subword_index`: NONE (1) for pieces without a word, else 1 + the piece's 1-based
    place among its word's pieces, capped at MAX_SUBWORD_INDEX."""
    n = len(word_of_piece)
    has_word = word_of_piece >= 0
    prev = np.concatenate([[-2], word_of_piece[:-1]]) if n else word_of_piece
    starts = (word_of_piece != prev) | ~has_word
    run_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0)) if n else word_of_piece
    # Pieces without a word inside a word's run (none in practice) do not count as places.
    place = np.arange(n) - run_start + 1
    return np.where(has_word, np.minimum(place, MAX_SUBWORD_INDEX) + 1, NONE_ID).astype(np.int32)


def align_plain(
    text: str,
    piece_begins: np.ndarray,
    piece_ends: np.ndarray,
    piece_has_content: np.ndarray,
    word_starts: np.ndarray,
    word_ends: np.ndarray,
    word_tag_ids: list[np.ndarray],
) -> list[np.ndarray]:
    """Tags of each piece of an ordinary SentencePiece encoding of `text`, and its word (-1: none).

    A piece's anchor is its first non-space character at or after its begin; pieces whose
    span is empty (the leading bytes of a byte-fallback character) or holds only the space
    before a rewritten character (NFKC "ﬁ" -> "▁f" + "in") take the next character, but never
    one past the end of their span (or, for an empty span, the character at their begin).
    """
    n = len(text)
    nxt = next_non_space(text)
    word_of_char = word_index_of_chars(n, word_starts, word_ends)
    begins = np.clip(piece_begins, 0, n)
    anchor = nxt[begins]
    within = anchor <= np.maximum(piece_ends, begins)
    word = np.where(within & piece_has_content & (anchor < n), word_of_char[np.minimum(anchor, n)], -1)
    has_word = word >= 0
    safe = np.where(has_word, word, 0)
    tags = [np.where(has_word, ids[safe] if len(ids) else NONE_ID, NONE_ID).astype(np.int32)
            for ids in word_tag_ids]
    return tags, word


def attached_flags(text: str, word_starts: np.ndarray) -> list[bool]:
    """True for words that follow the previous word with no space in between (e.g. "n't")."""
    prev = word_starts - 1
    return [bool(p >= 0 and not text[p].isspace()) for p in prev.tolist()]


def lime_pieces(
    piece_ids_per_word: list[list[int]],
    piece_has_content: np.ndarray,
    word_tag_ids: list[np.ndarray],
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """LIME tokenization: pieces never cross words, so each takes its own word's tags.

    Returns ids, tags and each piece's word (-1 for pieces of spaces only).
    """
    counts = np.fromiter((len(p) for p in piece_ids_per_word), np.int64, len(piece_ids_per_word))
    ids = np.fromiter((i for p in piece_ids_per_word for i in p), np.int32, int(counts.sum()))
    content = piece_has_content[ids]
    word = np.where(content, np.repeat(np.arange(len(counts)), counts), -1)
    tags = [np.where(content, np.repeat(t, counts), NONE_ID).astype(np.int32) for t in word_tag_ids]
    return ids, tags, word

