"""Where the POS/NER tags a model sees come from: the tag source, named everywhere.

- `oracle`: spaCy over the whole document (the paper's recipe, and the annotation cache). It
  leaks: spaCy's tok2vec sees about four words of right context, NER is a sentence-level
  transition system, and a word's tags are repeated on all its pieces.
- `prefix`: the tags of piece i come from spaCy over the decoded text of pieces 0..i, nothing
  after it; exactly what re-annotating the decoded prefix gives during generation.
- `tagger:DIR`: the causal tagger saved in DIR (lime_jax.tagger), which reads pieces <= i only.

Every source has one call shape: `tags(seqs)` maps id sequences (the pieces as the model sees
them) to int32 [2, L] arrays, rows `TAG_ROWS` (pos, ner) in the annotator's vocabularies.
Pieces map to words by character offsets in the decoded text (a piece takes the tags of the
word holding its first non-space character; pieces of whitespace only get NONE), so any
segmentation, cached or generated, can be tagged.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np

from lime_jax.annotation import align
from lime_jax.annotation.annotator import AnnotatedDoc, Annotator
from lime_jax.annotation.pipeline import FEATURES
from lime_jax.annotation.spm import Tokenizer

# `self`: the model's own forecast of the tags it is fed (a run with tag heads, model/heads.py);
# only evaluation and generation, which have the model, can use it.
KINDS = ("oracle", "prefix", "tagger", "self")
TAG_ROWS = ("pos", "ner")
# spaCy runs once per piece over a prefix of the document: O(n^2) characters per document.
DEFAULT_MAX_PIECES = 512
# Written by the trainer into a model dir: {"train": source, "eval": source, "eval_<name>": ...}.
TAG_SOURCES_NAME = "tag_sources.json"

TagFn = Callable[[Sequence[Sequence[int]]], list[np.ndarray]]


@dataclasses.dataclass(frozen=True)
class TagSource:
    kind: str  # one of KINDS
    path: str | None = None  # the tagger's directory (kind "tagger" only)

    def __str__(self) -> str:
        return f"tagger:{self.path}" if self.kind == "tagger" else self.kind

    @property
    def honest(self) -> bool:
        """True when the tags of piece i depend on pieces <= i only (honest for a LIME run)."""
        return is_honest(str(self), 0)

    def describe(self) -> str:
        return {
            "oracle": "spaCy over the whole text (sees the text after each piece)",
            "prefix": "spaCy over the text up to and including each piece",
            "tagger": f"causal tagger {self.path} (pieces up to and including each piece)",
            "self": "the model's own forecast from the pieces before each position (tag heads)",
        }[self.kind]


def is_honest(source: str, shift: int) -> bool:
    """Whether a model reading tags from `source` (`oracle`, `prefix`, `tagger:DIR`) with metadata
    shift `shift` never sees tags computed from text after the piece it predicts: an honest
    source for LIME (0) or the previous-piece arm (-1). LIME+1 (+1) reads the tags of the very
    piece it predicts, so no external source is honest for it; its own forecast (`self`, made
    before the piece was seen) is honest for every shift (the one rule for results and reports)."""
    kind = source.split(":", 1)[0]
    return kind == "self" or (kind in ("prefix", "tagger") and shift <= 0)


ORACLE = TagSource("oracle")
PREFIX = TagSource("prefix")


def parse_tag_source(text: str, flag: str = "--tags", allow_self: bool = False) -> TagSource:
    """`oracle`, `prefix`, `tagger:DIR` (or `self` where `allow_self`) -> TagSource; DIR must be
    an existing directory."""
    kind, sep, path = text.strip().partition(":")
    choices = "oracle, prefix, tagger:DIR" + (" or self" if allow_self else "")
    if kind not in KINDS:
        raise ValueError(f"{flag}: unknown tag source {text!r}; choose {choices}")
    if kind == "self" and not allow_self:
        raise ValueError(f"{flag}: `self` tags are a trained model's forecast (a run with tag heads): "
                         "`lime-jax generate --tags self` uses them, and `lime-jax eval` reports them as mode "
                         f"`self` of such runs; choose {choices}")
    if kind != "tagger":
        if sep:
            raise ValueError(f"{flag}: tag source {kind!r} takes no ':{path}' (only tagger:DIR does)")
        return TagSource(kind)
    if not path:
        raise ValueError(f"{flag}: tagger:DIR needs the directory of a trained causal tagger, e.g. tagger:runs/tagger")
    if not os.path.isdir(path):
        raise ValueError(f"{flag}: tagger directory {path!r} does not exist")
    return TagSource("tagger", path)


def write_tags(tags: Sequence[np.ndarray], feats: Sequence[np.ndarray]) -> None:
    """Writes a source's [2, L] tags (rows TAG_ROWS) into pipeline features ([4, L], rows
    `pipeline.FEATURES`) in place."""
    rows = [FEATURES.index(f"targets_{n}") for n in TAG_ROWS]
    for t, f in zip(tags, feats):
        f[rows] = t


def source_from_flags(tags: str, tagger: str | None) -> TagSource:
    """The source of a command's `--tags SOURCE` and its `--tagger DIR` shorthand."""
    if tagger is None:
        return parse_tag_source(tags, "--tags")
    if tags != "oracle":
        raise ValueError("give --tags or --tagger, not both")
    return parse_tag_source(f"tagger:{tagger}", "--tagger")


def _decoded_prefixes(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """decode(ids[:k]) for k = 0..n; piece k spans [len(texts[k]), len(texts[k + 1])) of the
    text of every sequence that starts with ids[:k + 1]."""
    return [tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]


def _align(tokenizer: Tokenizer, text: str, ids: np.ndarray, begins: np.ndarray, ends: np.ndarray,
           doc: AnnotatedDoc) -> np.ndarray:
    tags, _ = align.align_plain(text, begins, ends, tokenizer.has_content[ids], doc.starts, doc.ends,
                                [doc.pos, doc.ner])
    return np.stack(tags).astype(np.int32)


def sequence_tags(tokenizer: Tokenizer, annotator: Annotator, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """[2, L] tags of every piece of each sequence, from spaCy over the sequence's decoded text.

    Over a whole document this is the `oracle` source (the cache's oracle rows come from the
    original text; they differ only where decoding changes it, e.g. a newline between words of
    `lime` tokenization decodes as a space: 99.9% equal on held-out text). Over a prefix
    ending at piece i, its last column is the `prefix` tag of piece i: generation re-annotates
    this way after each step.
    """
    prefixes = [_decoded_prefixes(tokenizer, ids) for ids in seqs]
    docs = annotator.annotate([p[-1] for p in prefixes])
    out = []
    for ids, texts, doc in zip(seqs, prefixes, docs):
        bounds = np.array([len(t) for t in texts], np.int64)
        out.append(_align(tokenizer, texts[-1], np.asarray(ids, np.int64), bounds[:-1], bounds[1:], doc))
    return out


def check_budget(seqs: Sequence[Sequence[int]], max_pieces: int) -> None:
    longest = max((len(s) for s in seqs), default=0)
    if longest > max_pieces:
        raise ValueError(
            f"tag source prefix: a sequence has {longest} pieces, over max_pieces={max_pieces} (spaCy runs "
            f"once per piece over the text before it, O(n^2)); split documents into windows of at most "
            f"{max_pieces} pieces (tags then see only their window) or raise max_pieces")


def prefix_tags(tokenizer: Tokenizer, annotator: Annotator, seqs: Sequence[Sequence[int]],
                max_pieces: int = DEFAULT_MAX_PIECES) -> list[np.ndarray]:
    """[2, L] tags where column i comes from spaCy over the decoded text of pieces 0..i.

    All prefixes of all sequences go through one `annotator.annotate` call (spaCy's nlp.pipe).
    Raises ValueError before any work when a sequence is longer than `max_pieces`.
    """
    check_budget(seqs, max_pieces)
    prefixes = [_decoded_prefixes(tokenizer, ids) for ids in seqs]
    docs = iter(annotator.annotate([t for texts in prefixes for t in texts[1:]]))
    out = []
    for ids, texts in zip(seqs, prefixes):
        ids = np.asarray(ids, np.int64)
        tags = np.empty((len(TAG_ROWS), len(ids)), np.int32)
        for i in range(len(ids)):
            begin, end = np.array([len(texts[i])]), np.array([len(texts[i + 1])])
            tags[:, i] = _align(tokenizer, texts[i + 1], ids[i:i + 1], begin, end, next(docs))[:, 0]
        out.append(tags)
    return out


def tag_function(source: TagSource, tokenizer: Tokenizer, annotator: Annotator, *, tagger=None,
                 max_pieces: int = DEFAULT_MAX_PIECES) -> TagFn:
    """`tags(seqs)` for `source`. A `tagger:DIR` source needs the loaded tagger (an object with
    `tag(seqs)`, e.g. lime_jax.tagger.infer.CausalTagger.load(DIR)): annotation does not import it."""
    if source.kind == "oracle":
        return lambda seqs: sequence_tags(tokenizer, annotator, seqs)
    if source.kind == "prefix":
        return lambda seqs: prefix_tags(tokenizer, annotator, seqs, max_pieces)
    if tagger is None:
        raise ValueError(f"tag source {source}: pass the loaded tagger (lime_jax.tagger.infer.CausalTagger.load)")
    return tagger.tag
