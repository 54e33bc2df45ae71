"""Tag vocabularies with stable, reserved ids.

Every integer feature reserves 0 for PAD (SeqIO packing treats 0 as padding). Tag vocabularies
also reserve 1 for NONE: positions with no word (BOS, whitespace-only pieces, outside a
segment), and 2 for EOS: the EOS piece that ends a document, so the tag streams stay aligned
with `targets` and a LIME+1 guide can say "stop here" (lime_jax.ids). Labels follow from id 3
in a fixed order, and the vocabulary is saved next to the data it describes so that a
different spaCy model cannot silently remap ids.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from lime_jax.ids import EOS_TAG_ID, NONE_ID, NUM_RESERVED_TAGS, PAD_ID

PAD = "<pad>"
NONE = "<none>"
EOS = "<eos>"
RESERVED = (PAD, NONE, EOS)  # tokens of ids PAD_ID, NONE_ID, EOS_TAG_ID
NUM_RESERVED = NUM_RESERVED_TAGS

# spaCy's OntoNotes entity types (en_core_web_* pipelines).
ONTONOTES_TYPES = (
    "CARDINAL", "DATE", "EVENT", "FAC", "GPE", "LANGUAGE", "LAW", "LOC", "MONEY", "NORP",
    "ORDINAL", "ORG", "PERCENT", "PERSON", "PRODUCT", "QUANTITY", "TIME", "WORK_OF_ART",
)
NER_SCHEMES = ("bio", "types")


class UnknownTagError(ValueError):
    """A tag that the vocabulary does not hold."""


@dataclasses.dataclass(frozen=True)
class TagVocab:
    """An ordered tag set: id 0 = PAD, 1 = NONE, 2 = EOS, labels from 3."""

    name: str
    labels: tuple[str, ...]

    def __post_init__(self):
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"vocabulary {self.name!r} has duplicate labels")
        reserved = [t for t in self.labels if t in RESERVED]
        if reserved:
            raise ValueError(f"vocabulary {self.name!r} must not list the reserved {reserved}")
        object.__setattr__(self, "_ids", {t: i + NUM_RESERVED for i, t in enumerate(self.labels)})

    @property
    def size(self) -> int:
        return len(self.labels) + NUM_RESERVED

    @property
    def tokens(self) -> tuple[str, ...]:
        return RESERVED + self.labels

    def id(self, tag: str) -> int:
        try:
            return self._ids[tag]
        except KeyError:
            raise UnknownTagError(
                f"unknown {self.name} tag {tag!r}; vocabulary {self.name!r} holds "
                f"{', '.join(self.labels)}"
            ) from None

    def ids(self, tags: Iterable[str]) -> np.ndarray:
        return np.fromiter((self.id(t) for t in tags), dtype=np.int32)

    def tag(self, i: int) -> str:
        if not 0 <= i < self.size:
            raise UnknownTagError(f"{self.name} id {i} outside vocabulary of size {self.size}")
        return self.tokens[i]

    def to_json(self) -> dict:
        return {"name": self.name, "pad_id": PAD_ID, "none_id": NONE_ID, "eos_id": EOS_TAG_ID,
                "tokens": list(self.tokens)}

    @classmethod
    def from_json(cls, obj: dict, source: str = "<json>") -> "TagVocab":
        try:
            tokens = obj["tokens"]
            name = obj["name"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source}: not a tag vocabulary (missing field {e})") from None
        if tokens[:NUM_RESERVED] != list(RESERVED):
            # Before cache format v2 labels started at id 2, where EOS now is.
            old = (" (written before EOS had its own tag id: rebuild the cache with `lime-jax annotate`, "
                   "retrain a tagger)" if tokens[:2] == [PAD, NONE] else "")
            raise ValueError(f"{source}: field 'tokens' must start with {', '.join(map(repr, RESERVED))}, "
                             f"got {tokens[:NUM_RESERVED]}{old}")
        return cls(name, tuple(tokens[NUM_RESERVED:]))

    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TagVocab":
        with open(path, encoding="utf-8") as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON ({e})") from None
        return cls.from_json(obj, str(path))


def pos_vocab(labels: Sequence[str]) -> TagVocab:
    """Fine POS tags (spaCy `token.tag_`) in the tagger's own label order."""
    return TagVocab("pos", tuple(labels))


def ner_vocab(types: Sequence[str] = ONTONOTES_TYPES, scheme: str = "bio") -> TagVocab:
    """`O` then `B-T`, `I-T` per type (scheme "bio"), or `O` then the bare types ("types")."""
    if scheme == "bio":
        labels = ("O",) + tuple(f"{p}-{t}" for t in types for p in ("B", "I"))
    elif scheme == "types":
        labels = ("O",) + tuple(types)
    else:
        raise ValueError(f"unknown NER scheme {scheme!r}; choose one of {NER_SCHEMES}")
    return TagVocab("ner", labels)


def ner_label(iob: str, ent_type: str, scheme: str) -> str:
    """The NER label of one word from spaCy's `ent_iob_` and `ent_type_`."""
    if iob in ("", "O") or not ent_type:
        return "O"
    return ent_type if scheme == "types" else f"{iob}-{ent_type}"
