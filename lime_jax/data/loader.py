"""Grain input pipeline over a lime_jax cache: shuffle, per-process shard, pack, batch.

    ds = build_dataset(cache_dir, seq_len=512, batch_size=8, shift=0, seed=0)
    it = iter(ds)           # a grain DatasetIterator; trainer.data_state checkpoints its state
    batch = next(it)        # dict of int32 [batch_size, seq_len], the batch contract's keys

Stages (each document is one ArrayRecord record, docs/architecture.md):
  records -> process shard (record i goes to process i % shard_count) -> seeded shuffle
  (reshuffled every epoch) -> repeat -> read + decode in `read_threads` threads -> split into
  pieces of <= seq_len, shift tags within each piece -> first-fit packing (grain) -> batch ->
  optional `worker_count` prefetch processes.

This module does not import jax itself (grain 0.2.18 does); the process index/count are read
only when not passed in.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from grain.experimental import (FirstFitPackIterDataset, FlatMapIterDataset,
                                FlatMapTransform, batch_and_pad)

from lime_jax.data import cache, packing
from lime_jax.features import target_feature

PACKED_FEATURE = "columns"  # the single packed feature: [L, 2 + K] int32, see packing.piece_columns


@dataclasses.dataclass(frozen=True)
class _PieceAndShift(FlatMapTransform):
    """A decoded document -> its pieces as [N, 2 + K] column arrays (shift applied per piece)."""

    seq_len: int
    tag_rows: tuple[int, ...]
    shift: int
    head_rows: tuple[tuple[int, int], ...] = ()
    max_fan_out: int = 1 << 30  # long documents make many pieces; grain checks it only on maps

    def flat_map(self, doc_FxL):
        return [{PACKED_FEATURE: packing.piece_columns(piece, list(self.tag_rows), self.shift, list(self.head_rows))}
                for piece in packing.split_document(doc_FxL, self.seq_len)]


def _decode(record: bytes, num_features: int) -> np.ndarray:
    return cache.read_document(record, num_features)


def _to_contract(packed: Mapping[str, np.ndarray], tag_names: tuple[str, ...], head_features: tuple[str, ...]):
    return packing.columns_to_batch(packed[PACKED_FEATURE], packed[f"{PACKED_FEATURE}_segment_ids"],
                                    packed[f"{PACKED_FEATURE}_positions"], list(tag_names), list(head_features))


def _process_index_and_count() -> tuple[int, int]:
    import jax  # lazily: importing this module must not import jax

    return jax.process_index(), jax.process_count()


def _mark_absl_flags_parsed() -> None:
    # Grain's worker processes read absl flags; in a plain script nobody parsed them.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def tag_feature_names(manifest: Mapping[str, Any]) -> list[str]:
    """The cache's tag features (`targets_pos` -> `pos`), in manifest order."""
    return [f[len("targets_"):] for f in manifest["features"][1:] if f.startswith("targets_")]


def build_dataset(
    cache_dir: str,
    seq_len: int,
    batch_size: int,
    *,
    shift: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 4,
    read_threads: int = 4,
    read_buffer_size: int = 256,
    tags: Sequence[str] | None = None,
    heads: Sequence[tuple[str, int]] = (),
    expected_vocab_sizes: Mapping[str, int] | None = None,
    num_packing_bins: int | None = None,
) -> grain.IterDataset:
    """A Grain IterDataset of packed batches (dict of int32 [batch_size, seq_len]).

    Args:
      cache_dir: a directory written by `lime_jax.data.cache` (manifest + shards).
      seq_len, batch_size: batch shape; batch_size is per process.
      shift: 0 LIME, +1 LIME+1, -1 leakage control (docs/architecture.md, "Batches").
      seed, shuffle: seeded record shuffle, a different order every epoch.
      num_epochs: None repeats forever; otherwise the last batch is padded (segment id 0,
        loss weight 0) so no example is dropped.
      shard_index, shard_count: this process's share of the records; default
        `jax.process_index()` / `jax.process_count()`.
      worker_count: >0 runs the pipeline in that many prefetch processes (the batch order then
        depends on worker_count, deterministically).
      read_threads, read_buffer_size: grain ReadOptions (its defaults are slow here).
      tags: tag names to feed the model (`pos`, `ner`); default all tags in the cache;
        `()` for the baseline.
      heads: `(tag name, ahead)` of each tag head (model/heads.py): adds its target feature
        `decoder_target_<name>_ahead<k>`.
      expected_vocab_sizes: `{feature: size}` the config asks for; a cache built with other
        sizes raises CacheError before any batch.
      num_packing_bins: first-fit bins (more bins: less padding); default max(batch_size, 32).

    The manifest, each shard's size and record count are checked first; shards are not hashed
    (annotation hashed them once; `lime-jax verify-cache` checks the hashes).
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
    manifest = cache.verify_cache(cache_dir, expected_vocab_sizes, check_hashes=False)
    features = manifest["features"]
    available = tag_feature_names(manifest)
    tag_names = tuple(available if tags is None else tags)
    missing = [t for t in tag_names + tuple(n for n, _ in heads) if t not in available]
    if missing:
        raise cache.CacheError(
            f"{os.path.join(cache_dir, cache.MANIFEST_NAME)}: field 'features': the config "
            f"asks for tags {missing}, the cache has {available}")
    tag_rows = tuple(features.index(f"targets_{t}") for t in tag_names)
    head_rows = tuple((features.index(f"targets_{n}"), a) for n, a in heads)

    if shard_index is None or shard_count is None:
        auto_index, auto_count = _process_index_and_count()
        shard_index = auto_index if shard_index is None else shard_index
        shard_count = auto_count if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")

    paths = cache.shard_paths(cache_dir, manifest)
    if not sum(s["num_records"] for s in manifest["shards"]):
        raise cache.CacheError(f"{os.path.join(cache_dir, cache.MANIFEST_NAME)}: field "
                               "'shards': the cache holds no documents")
    source = grain.sources.ArrayRecordDataSource(paths)  # opens readers for random access
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) == 0:
        raise cache.CacheError(f"{cache_dir}: {len(source)} documents cannot feed "
                               f"{shard_count} processes (process {shard_index} gets none)")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map(functools.partial(_decode, num_features=len(features)))
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                               prefetch_buffer_size=read_buffer_size))
    pieces = FlatMapIterDataset(ids, _PieceAndShift(seq_len, tag_rows, shift, head_rows))
    out = pack_and_batch(pieces, seq_len, batch_size, tag_names, seed=seed,
                         head_features=[target_feature(n, a) for n, a in heads],
                         padded_last_batch=num_epochs is not None,
                         num_packing_bins=num_packing_bins)
    if worker_count > 0:
        _mark_absl_flags_parsed()
        out = out.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
    return out


def pack_and_batch(pieces: grain.IterDataset, seq_len: int, batch_size: int,
                   tag_names: Sequence[str], *, seed: int, padded_last_batch: bool,
                   num_packing_bins: int | None = None, head_features: Sequence[str] = ()) -> grain.IterDataset:
    """Pieces (`{"columns": [N, 2 + K + H]}`, see `packing.piece_columns`) -> contract batches.

    First-fit packing into `num_packing_bins` rows at a time, then batches of `batch_size` rows;
    `padded_last_batch` pads a final short batch instead of dropping it. Shared by this loader
    and `seqio_source`, so both inputs pack the same pieces into the same rows.
    """
    packed = FirstFitPackIterDataset(
        pieces, length_struct={PACKED_FEATURE: seq_len},
        num_packing_bins=num_packing_bins or max(batch_size, 32),
        seed=seed, shuffle_bins=False)
    if padded_last_batch:
        batched = packed.batch(batch_size, batch_fn=functools.partial(
            batch_and_pad, batch_size=batch_size))
    else:
        batched = packed.batch(batch_size, drop_remainder=True)
    return batched.map(functools.partial(_to_contract, tag_names=tuple(tag_names),
                                         head_features=tuple(head_features)))
