"""Training batches from a registered SeqIO task or mixture (T5X's MIXTURE_OR_TASK_NAME).

    import tasks  # or any module that registers the task/mixture
    it = seqio_batches("sotu_and_addition_lime", split="train", seq_len=512, batch_size=8,
                       shift=0, tags=("pos", "ner"), seed=0, shard_index=0, shard_count=1,
                       shuffle=True, num_epochs=None)
    batch = next(it)  # the Grain loader's keys, dtypes and shapes (docs/architecture.md)

Stages: `seqio.get_dataset` with `LimeLMFeatureConverter(pack=False)` (the task's or mixture's
own preprocessing and sampling, this process's shard, seeded shuffle, epochs; the converter
splits long examples into pieces and applies the shift) -> each piece without its padding, in
the loader's column layout -> `loader.pack_and_batch`, the Grain loader's packer. SeqIO's own
packer fills rows in another order; sharing the packer makes a cache read as a task give the
same batches as the loader when unshuffled (shuffled, SeqIO's buffer shuffle and Grain's global
permutation order documents differently).

The iterator is a grain `DatasetIterator`: its state is JSON and is saved into Orbax
checkpoints by the same handler as the loader's (`trainer.data_state`, as the one data shard of
this process: a resume needs the same process count). tf.data cannot export its position as
JSON, so the state counts the examples read and a restore rebuilds the deterministic SeqIO
pipeline and skips that many (a resume re-reads them).

Imports seqio/TensorFlow when called; nothing here runs on the cache-only training path.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from lime_jax.data import loader

log = logging.getLogger("lime_jax.data.seqio_source")


class _SeqIOPiecesIterator(grain.DatasetIterator):
    """Unpacked converter examples -> loader pieces `{PACKED_FEATURE: int32 [N, 2 + K]}`."""

    def __init__(self, make_dataset: Callable[[], Any], columns: Sequence[str]):
        super().__init__()
        self._make_dataset = make_dataset
        self._columns = list(columns)
        self._consumed = 0
        self._examples = None  # built on first use, after any set_state

    def __next__(self) -> dict[str, np.ndarray]:
        if self._examples is None:
            self._examples = self._make_dataset().skip(self._consumed).as_numpy_iterator()
        ex = next(self._examples)
        self._consumed += 1
        n = int(ex["decoder_loss_weights"].sum())  # the converter pads each piece to seq_len
        piece_NxC = np.stack([ex[k][:n] for k in self._columns], axis=1)
        return {loader.PACKED_FEATURE: piece_NxC.astype(np.int32)}

    def get_state(self) -> dict[str, Any]:
        return {"examples_read": self._consumed}

    def set_state(self, state: dict[str, Any]) -> None:
        self._consumed = int(state["examples_read"])
        self._examples = None


class _SeqIOPieces(grain.IterDataset):
    def __init__(self, make_dataset: Callable[[], Any], columns: Sequence[str]):
        super().__init__()
        self._make_dataset = make_dataset
        self._columns = tuple(columns)

    def __iter__(self) -> _SeqIOPiecesIterator:
        return _SeqIOPiecesIterator(self._make_dataset, self._columns)


def _hide_gpus_from_tensorflow(tf) -> None:
    # As T5X does: TensorFlow only feeds data here and must not reserve accelerator memory
    # that JAX needs. Possible only before TensorFlow first touches its devices.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:
        log.warning("could not hide GPUs from TensorFlow (%s); it may hold GPU memory", e)


def seqio_batches(mixture_or_task_name: str, *, split: str, seq_len: int, batch_size: int,
                  shift: int, tags: Sequence[str], seed: int, shard_index: int,
                  shard_count: int, shuffle: bool, num_epochs: int | None
                  ) -> grain.DatasetIterator:
    """An iterator of packed batches (dict of int32 [batch_size, seq_len]) from a SeqIO task.

    Args:
      mixture_or_task_name: a registered SeqIO task or mixture whose examples have `targets`
        and `targets_<tag>` for every tag in `tags` (unshifted, EOS/NONE last).
      split: the dataset split ("train", "validation", ...).
      seq_len, batch_size: batch shape; batch_size is per process.
      shift: 0 LIME, +1 LIME+1, -1 leakage control (docs/architecture.md, "Batches").
      tags: tag names to feed the model; `()` for the baseline.
      seed, shuffle: SeqIO's seeded shuffle (and mixture sampling); same seed, same batches.
      shard_index, shard_count: this process's share of every task's examples.
      num_epochs: None repeats forever; otherwise the last batch is padded (segment id 0,
        loss weight 0), as the loader does.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    import seqio
    import tensorflow as tf

    from lime_jax.data.seqio_features import LimeLMFeatureConverter

    _hide_gpus_from_tensorflow(tf)
    try:
        provider = seqio.get_mixture_or_task(mixture_or_task_name)
    except ValueError as e:
        raise ValueError(f"MIXTURE_OR_TASK_NAME {mixture_or_task_name!r} is not registered; "
                         f"import the module that registers it first (e.g. `tasks`): {e}") from None
    if split not in provider.splits:
        raise ValueError(f"{mixture_or_task_name!r} has no split {split!r}; it has "
                         f"{sorted(provider.splits)}")
    tags = tuple(tags)
    have = provider.output_features
    missing = [f for f in ["targets"] + [f"targets_{t}" for t in tags] if f not in have]
    if missing:
        raise ValueError(f"{mixture_or_task_name!r}: the run needs features {missing}, the task "
                         f"has {sorted(have)}")
    converter = LimeLMFeatureConverter(tags=tags, shift=shift, pack=False)

    def make_dataset():
        return seqio.get_dataset(
            provider, {"targets": seq_len}, converter, dataset_split=split, shuffle=shuffle,
            num_epochs=num_epochs, shard_info=seqio.ShardInfo(shard_index, shard_count),
            seed=seed, verbose=False)

    columns = ["decoder_target_tokens", "decoder_input_tokens"] + [
        f"decoder_input_{t}" for t in tags]
    batches = loader.pack_and_batch(_SeqIOPieces(make_dataset, columns), seq_len, batch_size,
                                    tags, seed=seed, padded_last_batch=num_epochs is not None)
    return iter(batches)
