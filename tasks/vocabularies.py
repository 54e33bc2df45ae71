"""A SeqIO vocabulary for tag features: id 0 = PAD, 1 = NONE, 2 = EOS, labels from 3.

`add_eos` features append the EOS tag to the tag streams exactly where SentencePiece appends
EOS to `targets`, so the streams stay aligned and match the cache (lime_jax.ids).
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import seqio
import tensorflow as tf

from lime_jax.annotation.vocab import TagVocab
from lime_jax.ids import EOS_TAG_ID, PAD_ID


class TagVocabulary(seqio.Vocabulary):
    """Wraps a `lime_jax.annotation.vocab.TagVocab`. Text form: labels joined by spaces."""

    def __init__(self, tag_vocab: TagVocab):
        super().__init__(extra_ids=0)
        self.tag_vocab = tag_vocab
        self._tokens = list(tag_vocab.tokens)
        self._ids = {t: i for i, t in enumerate(self._tokens)}

    @property
    def name(self) -> str:
        return self.tag_vocab.name

    @property
    def eos_id(self) -> int:
        return EOS_TAG_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> None:
        return None

    @property
    def _base_vocab_size(self) -> int:
        return len(self._tokens)

    def _encode(self, s: str) -> Sequence[int]:
        try:
            return [self._ids[t] for t in s.split()]
        except KeyError as e:
            raise ValueError(f"unknown {self.name} tag {e.args[0]!r}") from None

    def _decode(self, ids: Iterable[int]) -> str:
        return " ".join(self._tokens[i] for i in ids)

    @functools.cached_property
    def _table(self):
        keys = tf.constant(self._tokens)
        values = tf.range(len(self._tokens), dtype=tf.int32)
        return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), -1)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        ids = self._table.lookup(tf.strings.split(s))
        with tf.control_dependencies([tf.debugging.assert_non_negative(
                ids, message=f"unknown {self.name} tag")]):
            return tf.identity(ids)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        return tf.strings.reduce_join(tf.gather(tf.constant(self._tokens), ids), axis=-1,
                                      separator=" ")

    def __eq__(self, other) -> bool:
        return isinstance(other, TagVocabulary) and self._tokens == other._tokens

    def __hash__(self) -> int:
        return hash(tuple(self._tokens))

    def __repr__(self) -> str:
        return f"TagVocabulary({self.name}, size={self.vocab_size})"
