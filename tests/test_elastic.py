"""Data iterator state per data shard: a position saved by n processes restores on n' processes.

Processes are simulated by their index (`process_dataset(process_index=p, process_count=n)`);
each writes its shards' states through the trainer's Orbax handler into one `data` directory,
as the processes of a real run do (tests/test_multihost.py runs them for real). The global
batch is the processes' rows concatenated in process order.
"""
import grain
import grain.checkpoint
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from grain.experimental import ZipIterDataset

from lime_jax.data import loader
from lime_jax.trainer import data_state, distributed
from lime_jax.trainer.config import ConfigError
from test_multihost import _write_cache

BATCH = 8
KW = dict(seq_len=16, shuffle=True, seed=3, read_threads=1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("elastic_cache"))
    _write_cache(d, 40, seed=2)
    return d


def _processes(cache_dir, n, shards):
    return [distributed.process_dataset(cache_dir, BATCH // n, data_shards=shards, process_index=p,
                                        process_count=n, **KW) for p in range(n)]


def _global(its):
    batches = [next(it) for it in its]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _save(directory, its):
    for it in its:  # each process writes the files of the shards it reads
        data_state.ShardStateHandler().save(directory, data_state.ShardStateSave(it))


def _restore(directory, its):
    for it in its:
        data_state.ShardStateHandler().restore(directory, data_state.ShardStateRestore(it))


@pytest.mark.parametrize("saved,resumed", [(2, 1), (1, 2), (4, 2)])
def test_position_saved_on_n_processes_resumes_on_another_count(cache_dir, tmp_path, saved, resumed):
    shards, k = 4, 3
    one = _processes(cache_dir, 1, shards)
    reference = [_global(one) for _ in range(k + 3)]
    writers = _processes(cache_dir, saved, shards)
    for step in range(k):
        batch = _global(writers)
        for key in batch:
            np.testing.assert_array_equal(batch[key], reference[step][key], err_msg=key)
    directory = epath.Path(tmp_path)
    _save(directory, writers)
    assert sorted(p.name for p in directory.iterdir()) == [f"shard_{j}-of-4.json" for j in range(4)]
    readers = _processes(cache_dir, resumed, shards)
    _restore(directory, readers)
    for step in range(k, k + 3):
        batch = _global(readers)
        for key in batch:
            np.testing.assert_array_equal(batch[key], reference[step][key], err_msg=f"step {step} {key}")


def test_another_number_of_shards_is_refused_naming_data_shards(cache_dir, tmp_path):
    directory = epath.Path(tmp_path)
    two = _processes(cache_dir, 2, None)  # the default: one shard per process, S = 2
    _global(two)
    _save(directory, two)
    with pytest.raises(ConfigError, match=r"2 data shards; this run reads 1 .*process_dataset.data_shards = 2"):
        _restore(directory, _processes(cache_dir, 1, None))
    (directory / "shard_1-of-2.json").unlink()
    with pytest.raises(ConfigError, match="shard_1-of-2.json is missing"):
        _restore(directory, _processes(cache_dir, 1, 2))


@pytest.mark.parametrize("per_process", [1, 2])
def test_per_process_state_of_older_checkpoints_restores_on_the_same_count(cache_dir, tmp_path, per_process):
    # The layout before per-shard state: Grain's handler wrote the process's whole iterator, a
    # zip of its shards' iterators when it read several.
    parts = [loader.build_dataset(cache_dir, batch_size=BATCH // per_process, shard_index=j,
                                  shard_count=per_process, **KW) for j in range(per_process)]
    old: grain.IterDataset = parts[0] if per_process == 1 else ZipIterDataset(parts)
    it = iter(old)
    next(it)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mgr:
        mgr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    expected = next(it)
    if per_process > 1:
        expected = {k: np.concatenate([b[k] for b in expected]) for k in expected[0]}
    fresh = distributed.process_dataset(cache_dir, BATCH, data_shards=per_process, process_index=0,
                                        process_count=1, **KW)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mgr:
        mgr.restore(1, args=ocp.args.Composite(data=data_state.ShardStateRestore(fresh)))
    batch = next(fresh)
    for key in batch:
        np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
    # On another process count the per-process files cannot say which shards they hold.
    other = _processes(cache_dir, 2, 2)
    with pytest.raises(ConfigError, match=r"resume it on 1 process\(es\)"):
        _restore(epath.Path(tmp_path / "ckpt" / "1" / "data"), other[:1])
