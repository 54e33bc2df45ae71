"""A SeqIO feature converter that packs LIME metadata in lockstep with the tokens.

SeqIO's stock decoder-only converters keep only `targets`. `LimeLMFeatureConverter` takes the
task features `targets` and `targets_<tag>` (same length per example, tags unshifted) and emits
the batch contract of docs/architecture.md: the `LMFeatureConverter` features plus
`decoder_input_<tag>`, the tags of target token `i - 1 + shift` of the same segment (NONE
outside it). Same rules as the Grain loader (`packing.py`): an example longer than the sequence
length is split into pieces, each its own segment, and the shift is applied within a piece.
With `pack=True` SeqIO's own packer fills rows in order; `seqio_source.seqio_batches` instead
packs unpacked pieces with the Grain loader's packer, so both training inputs batch alike.

Imports seqio (TensorFlow): the cache training path (the Grain loader) never imports it; a run
that names a SeqIO task or mixture (`seqio_source.py`) does.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from lime_jax.ids import NONE_ID

_SPEC = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)


def input_tags_tf(tags_N: tf.Tensor, shift: int) -> tf.Tensor:
    """`packing.input_tags` in TF, the same rule: input i sees the tags of target `i - 1 + shift`
    of the segment, i.e. `[NONE] + tags` (BOS carries NONE) shifted by `shift`, NONE outside."""
    n = tf.size(tags_N)
    with_bos = tf.concat([[NONE_ID], tags_N], axis=0)
    idx = tf.range(n) + shift
    inside = (idx >= 0) & (idx <= n)
    return tf.where(inside, tf.gather(with_bos, tf.clip_by_value(idx, 0, n)), NONE_ID)


def split_examples(ds: tf.data.Dataset, length: int,
                   sequence_features: Sequence[str] = ("targets",)) -> tf.data.Dataset:
    """Splits each example's `sequence_features` (equal lengths) into pieces of <= length.

    Every piece becomes its own example; other features are copied to each piece.
    """
    names = list(sequence_features)

    def split(ex):
        n = tf.size(ex[names[0]])
        checks = [tf.debugging.assert_equal(
            tf.size(ex[k]), n, message=f"features {k} and {names[0]} differ in length")
            for k in names[1:]]
        with tf.control_dependencies(checks):
            row_lengths = tf.concat(
                [tf.fill([n // length], length), tf.reshape(n % length, [1])], axis=0)
            row_lengths = tf.boolean_mask(row_lengths, row_lengths > 0)
        num = tf.size(row_lengths)
        pieces = {k: tf.RaggedTensor.from_row_lengths(ex[k], row_lengths) for k in names}
        for k, v in ex.items():
            if k not in pieces:
                pieces[k] = tf.repeat(tf.expand_dims(v, 0), num, axis=0)
        return tf.data.Dataset.from_tensor_slices(pieces)

    return ds.flat_map(split)


class LimeLMFeatureConverter(seqio.LMFeatureConverter):
    """`LMFeatureConverter` + metadata inputs `decoder_input_<tag>` with a LIME shift.

    Args:
      tags: tag names; task feature `targets_<tag>` becomes model feature `decoder_input_<tag>`.
      shift: 0 LIME, +1 LIME+1, -1 leakage control.
      pack, **kwargs: as `seqio.LMFeatureConverter`.
    """

    def __init__(self, tags: Sequence[str] = ("pos", "ner"), shift: int = 0, pack: bool = True,
                 **kwargs):
        self._tags = tuple(tags)
        self._shift = int(shift)
        # Per instance: which features exist depends on the tags.
        self.TASK_FEATURES = {"targets": _SPEC, **{f"targets_{t}": _SPEC for t in self._tags}}
        self.MODEL_FEATURES = {
            **seqio.LMFeatureConverter.MODEL_FEATURES,
            **{f"decoder_input_{t}": _SPEC for t in self._tags},
        }
        super().__init__(pack=pack, **kwargs)

    @property
    def shift(self) -> int:
        return self._shift

    @property
    def tags(self) -> tuple[str, ...]:
        return self._tags

    def _shift_piece(self, ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = {"targets": ex["targets"]}
        for t in self._tags:
            out[f"input_{t}"] = input_tags_tf(ex[f"targets_{t}"], self._shift)
        return out

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        d = dict(super()._convert_example(features))
        for t in self._tags:
            d[f"decoder_input_{t}"] = features[f"input_{t}"]
        return d

    def __call__(self, ds: tf.data.Dataset,
                 task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        """Splits long examples into pieces, then runs SeqIO's checked conversion.

        Splitting comes before SeqIO's input validation (examples may be longer than the
        sequence length: they are split, not trimmed). Tag lengths default to the targets'.
        """
        length = task_feature_lengths["targets"]
        lengths = dict(task_feature_lengths)
        for t in self._tags:
            lengths.setdefault(f"targets_{t}", length)
            if lengths[f"targets_{t}"] != length:
                raise ValueError(f"task_feature_lengths: 'targets_{t}' must equal 'targets' "
                                 f"({task_feature_lengths})")
        return super().__call__(split_examples(ds, length, self.TASK_FEATURES), lengths)

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        length = task_feature_lengths["targets"]
        ds = ds.map(self._shift_piece, num_parallel_calls=tf.data.AUTOTUNE)
        lengths = {"targets": length, **{f"input_{t}": length for t in self._tags}}
        ds = self._pack_or_pad(ds, lengths)
        return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                  ) -> dict[str, int]:
        lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
        for t in self._tags:
            lengths[f"decoder_input_{t}"] = task_feature_lengths["targets"]
        return lengths
