"""Text -> aligned features: annotate, tokenize, align, append EOS.

One document becomes an int32 array of shape [4, L]: `targets` (piece ids), `targets_pos` and
`targets_ner` (tag ids), and `subword_index` (each piece's place in its word, for cohesion
analysis; not a model input), EOS last (`eos_column`). Tags are stored unshifted; LIME+1 shifts
them when batches are built, so its input at a document's last piece carries the EOS tag.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lime_jax.annotation import align
from lime_jax.annotation.annotator import AnnotatedDoc, Annotator
from lime_jax.annotation.spm import Tokenizer
from lime_jax.annotation.vocab import TagVocab
from lime_jax.ids import EOS_ID, EOS_TAG_ID, NONE_ID

FEATURES = ("targets", "targets_pos", "targets_ner", "subword_index")


def eos_column(features: Sequence[str] = FEATURES) -> np.ndarray:
    """The ids of the EOS that ends every document, per feature: EOS in `targets`, the EOS tag in
    each tag feature (`targets_<tag>`), NONE in `subword_index` (EOS has no word, and id 2 there
    is a word's first piece)."""
    return np.array([EOS_ID if f == "targets" else EOS_TAG_ID if f.startswith("targets_") else NONE_ID
                     for f in features], np.int32)


@dataclasses.dataclass
class Stats:
    documents: int = 0
    empty_documents: int = 0
    skipped_documents: int = 0  # could not be processed; skipped by explicit policy
    words: int = 0
    pieces: int = 0

    def add(self, other: "Stats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class DocumentProcessor:
    """Turns texts into aligned feature arrays with one annotator and one SentencePiece model."""

    def __init__(self, annotator: Annotator, spm_model: str, tokenization: str = "lime"):
        if tokenization not in align.TOKENIZATIONS:
            raise ValueError(f"unknown tokenization {tokenization!r}; choose one of {align.TOKENIZATIONS}")
        self.annotator = annotator
        self.tokenizer = Tokenizer(spm_model)
        self.tokenization = tokenization
        self.pos_vocab, self.ner_vocab = annotator.vocabularies()

    @property
    def vocabularies(self) -> dict[str, TagVocab]:
        return {"targets_pos": self.pos_vocab, "targets_ner": self.ner_vocab}

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return {"targets": self.tokenizer.vocab_size, "targets_pos": self.pos_vocab.size,
                "targets_ner": self.ner_vocab.size, "subword_index": align.SUBWORD_INDEX_VOCAB}

    def align(self, text: str, doc: AnnotatedDoc) -> np.ndarray:
        """The [4, L] features of one annotated text, EOS included."""
        tag_ids = [doc.pos, doc.ner]
        if self.tokenization == "lime":
            words = [text[s:e] for s, e in zip(doc.starts.tolist(), doc.ends.tolist())]
            per_word = self.tokenizer.encode_words(words, align.attached_flags(text, doc.starts))
            ids, tags, word = align.lime_pieces(per_word, self.tokenizer.has_content, tag_ids)
        else:
            ids, begins, ends = self.tokenizer.encode_with_offsets(text)
            tags, word = align.align_plain(text, begins, ends, self.tokenizer.has_content[ids],
                                           doc.starts, doc.ends, tag_ids)
        out = np.empty((len(FEATURES), len(ids) + 1), np.int32)
        out[0, :-1] = ids
        out[1, :-1], out[2, :-1] = tags
        out[3, :-1] = align.subword_index(word)
        out[:, -1] = eos_column()
        return out

    def process(self, texts: Sequence[str]) -> tuple[list[np.ndarray | None], Stats]:
        """Features of each text; None for empty (or whitespace-only) documents, which are skipped."""
        stats = Stats(documents=len(texts))
        keep = [i for i, t in enumerate(texts) if t.strip()]
        docs = self.annotator.annotate([texts[i] for i in keep])
        out: list[np.ndarray | None] = [None] * len(texts)
        for i, doc in zip(keep, docs):
            features = self.align(texts[i], doc)
            if features.shape[1] == 1:  # text that normalises to nothing (e.g. control chars only)
                continue
            out[i] = features
            stats.words += doc.num_words
            stats.pieces += features.shape[1] - 1
        stats.empty_documents = sum(o is None for o in out)
        return out, stats


def check_invariants(features: np.ndarray, vocab_sizes: Sequence[int]) -> None:
    """Raises ValueError if a row breaks an invariant of the cache format."""
    if features.ndim != 2 or features.shape[0] != len(vocab_sizes):
        raise ValueError(f"features must have shape [{len(vocab_sizes)}, L], got {features.shape}")
    for name, row, size in zip(FEATURES, features, vocab_sizes):
        if (row == 0).any():
            raise ValueError(f"{name}: id 0 (PAD) inside a document")
        if (row < 0).any() or (row >= size).any():
            raise ValueError(f"{name}: id outside vocabulary of size {size}")
