"""The training data iterator's position, saved per data shard so a run resumes on any process count.

A run reads its records as S data shards (`process_dataset.data_shards`, default one per
process); the global batch sequence depends only on S. Each process reads S/n of them and
checkpoints each shard's Grain iterator state as `data/shard_<j>-of-<S>.json`, so a run saved
on n processes resumes on any n' that divides S: each process loads the shards it now reads.
A different S would read other batches and is refused, naming `process_dataset.data_shards`.
A SeqIO input (`as_sharded`) reads one shard per process, S = n always: it resumes only on the
process count that saved it.

Checkpoints written before this layout hold one `data/process_<i>-of-<n>.json` per process
(Grain's own handler); they restore on the same process count.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lime_jax.trainer.config import ConfigError

_SHARD_FILE = re.compile(r"shard_(\d+)-of-(\d+)\.json")
_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class ShardedIterator:
    """This process's batches: the rows of its data shards' batches, concatenated in shard order.

    `shards` maps global shard index -> that shard's Grain `DatasetIterator`; the process reads
    them all, `num_shards` is S over all processes. `reshardable`: S is set by
    `process_dataset.data_shards` (the cache loader), not fixed to the process count (SeqIO).
    """

    def __init__(self, shards: Mapping[int, Iterator], num_shards: int, *, reshardable: bool = True):
        if not shards or not all(0 <= j < num_shards for j in shards):
            raise ValueError(f"shards {sorted(shards)} are not a non-empty subset of [0, {num_shards})")
        self.shards = dict(sorted(shards.items()))
        self.num_shards = num_shards
        self.reshardable = reshardable

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(it) for it in self.shards.values()]
        if len(batches) == 1:
            return batches[0]
        return {k: np.concatenate([b[k] for b in batches], axis=0) for k in batches[0]}

    def start_prefetch(self) -> None:
        for it in self.shards.values():
            it.start_prefetch()


def as_sharded(data_iter: Any, process_index: int, process_count: int) -> ShardedIterator:
    """`data_iter` itself, or an iterator that is one process's whole share (one shard per
    process, as SeqIO's `seqio_batches`)."""
    if isinstance(data_iter, ShardedIterator):
        return data_iter
    return ShardedIterator({process_index: data_iter}, process_count, reshardable=False)


class ShardStateHandler(ocp.CheckpointHandler):
    """Orbax handler of the `data` item: one JSON file of Grain iterator state per data shard.

    Synchronous (the states are small): the files are written before Orbax's `save` returns,
    while the iterator sits at the saved position.
    """

    def save(self, directory: epath.Path, args: ShardStateSave):
        it = args.item
        for j, shard_it in it.shards.items():
            path = directory / f"shard_{j}-of-{it.num_shards}.json"
            path.write_text(json.dumps(shard_it.get_state(), indent=1))

    def restore(self, directory: epath.Path, args: ShardStateRestore) -> ShardedIterator:
        it = args.item
        names = [p.name for p in directory.iterdir()]
        counts = {int(m[2]) for m in map(_SHARD_FILE.fullmatch, names) if m}
        if not counts:
            states = _states_from_process_files(directory, names, it)
        else:
            if counts != {it.num_shards}:
                if not it.reshardable:
                    raise ConfigError(
                        f"{directory} holds the data state of {max(counts)} data shards; this run's SeqIO "
                        f"input (MIXTURE_OR_TASK_NAME) reads one shard per process, {it.num_shards} here, "
                        f"which would train on other batches: resume on {max(counts)} process(es) "
                        "(process_dataset.data_shards applies to a CACHE_DIR input only)")
                raise ConfigError(
                    f"{directory} holds the data state of {max(counts)} data shards; this run reads "
                    f"{it.num_shards} (shards {list(it.shards)} of them on this process), which would train "
                    f"on other batches: set process_dataset.data_shards = {max(counts)} (a multiple of the "
                    "process count) to resume on this process count, or resume on the saved one")
            states = {}
            for j in it.shards:
                path = directory / f"shard_{j}-of-{it.num_shards}.json"
                if not path.exists():
                    raise ConfigError(f"{path} is missing: the checkpoint holds no state for data shard {j}")
                states[j] = json.loads(path.read_text())
        for j, shard_it in it.shards.items():
            shard_it.set_state(states[j])
        it.start_prefetch()
        return it

    def metadata(self, directory: epath.Path) -> None:
        return None


def _states_from_process_files(directory: epath.Path, names: list[str], it: ShardedIterator) -> dict[int, Any]:
    """Shard states from the per-process files of older checkpoints (same process count only):
    process p's file holds its k shards' states, as Grain's zip of them (`parents`) when k > 1."""
    found = {(int(m[1]), int(m[2])) for m in map(_PROCESS_FILE.fullmatch, names) if m}
    if not found:
        raise ConfigError(f"{directory} holds no data iterator state (shard_<j>-of-<S>.json files)")
    saved_procs = max(n for _, n in found)
    k = len(it.shards)  # process p reads shards p*k .. p*k+k-1
    process = min(it.shards) // k
    path = directory / f"process_{process}-of-{saved_procs}.json"
    if it.num_shards != saved_procs * k or (process, saved_procs) not in found:
        raise ConfigError(
            f"{directory} holds the data state per process (process_<i>-of-{saved_procs}.json, written "
            f"before lime_jax saved it per data shard): resume it on {saved_procs} process(es)"
            + (" with the process_dataset.data_shards it was written with" if it.reshardable else ""))
    state = json.loads(path.read_text())
    if k == 1:
        return {process: state}
    parents = state.get("parents") if isinstance(state, dict) else None
    if not isinstance(parents, list) or len(parents) != k:
        raise ConfigError(f"{path} is not the state of {k} data shards: resume with the "
                          "process_dataset.data_shards it was written with")
    return {process * k + i: s for i, s in enumerate(parents)}


@ocp.args.register_with_handler(ShardStateHandler, for_save=True)
@dataclasses.dataclass
class ShardStateSave(ocp.args.CheckpointArgs):
    item: ShardedIterator


@ocp.args.register_with_handler(ShardStateHandler, for_restore=True)
@dataclasses.dataclass
class ShardStateRestore(ocp.args.CheckpointArgs):
    item: ShardedIterator
