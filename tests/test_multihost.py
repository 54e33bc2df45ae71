"""Multi-process training on one machine: 2 processes x 4 CPU devices (gloo collectives over
loopback) against 1 process x 8 devices, on the tiny model and a hand-made cache.

Comparison: both runs set `process_dataset.data_shards = 2`, so the single process reads the
two data shards the two processes read and concatenates their rows in the same order: the
global batches are identical, and the losses must agree to float tolerance (only the order
of cross-device reductions may differ).
"""
import os
import sys

import gin
import jax
import numpy as np
import pytest

from lime_jax.cli import train as cli_train
from lime_jax.trainer import checkpoint as ckpt_lib
from lime_jax.trainer import distributed
from lime_jax.trainer import gin_config
from lime_jax.trainer import metrics as metrics_lib
from lime_jax.trainer import state as state_lib
from lime_jax.trainer import train as train_lib
from lime_jax.data import cache
from lime_jax.model import ModelConfig, abstract_model, sharding

VOCAB = 64
STEPS = 6
GIN_FILES = ["runs/lime.gin", "models/tiny.gin"]


def _write_cache(out_dir, n_docs, seed, lengths=((8, 50),)):
    """Random documents, document i with a length drawn from `lengths[i % len(lengths)]`."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        low, high = lengths[i % len(lengths)]
        toks = rng.integers(2, VOCAB, size=int(rng.integers(low, high)))
        toks[-1] = 1  # EOS
        docs.append(np.stack([toks, 2 + toks % 50, 2 + toks % 37]).astype(np.int32))
    cache.write_cache(out_dir, docs, {"targets": VOCAB, "targets_pos": 53, "targets_ner": 40},
                      docs_per_shard=n_docs // 2)
    return docs


def _bindings(model_dir, cache_dir, eval_dir=None):
    return [
        f"MODEL_DIR = '{model_dir}'", f"TRAIN_STEPS = {STEPS}", f"CACHE_DIR = '{cache_dir}'",
        f"EVAL_CACHE_DIR = {eval_dir!r}", f"EVAL_EVERY = {STEPS}", "EvalConfig.batches = None",
        "SEQ_LEN = 32", "BATCH_SIZE = 8", "CHECKPOINT_EVERY = 3",
        f"ModelConfig.vocab_size = {VOCAB}", "OptimizerConfig.warmup_steps = 2",
        "TrainConfig.log_every = 1", "TrainConfig.progress = False", "DataConfig.read_threads = 1",
        "process_dataset.data_shards = 2",
    ]


def _losses(model_dir):
    rows = metrics_lib.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice: only process 0 may write logs"
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    cache_dir, eval_dir = str(root / "cache"), str(root / "heldout")
    _write_cache(cache_dir, 64, seed=0)
    # Processes read every other document: process 0 gets the long ones and packs many more eval
    # batches; process 1 must pad to match (else the collective eval step hangs).
    eval_docs = _write_cache(eval_dir, 16, seed=1, lengths=((150, 200), (8, 12)))
    two_dir, one_dir = str(root / "two"), str(root / "one")

    argv = [sys.executable, "-m", "lime_jax.cli.train"]
    for f in GIN_FILES:
        argv += ["--gin_file", f]
    for b in _bindings(two_dir, cache_dir, eval_dir):
        argv += ["--gin_bindings", b]
    procs = distributed.spawn_local(argv, num_processes=2, devices_per_process=4,
                                    log_dir=str(root / "logs"))
    codes = distributed.wait_all(procs, timeout_s=240)
    if codes != [0, 0]:
        logs = "\n".join(f"--- process {i}\n" + open(root / "logs" / f"process_{i}.log").read()[-3000:]
                         for i in range(2))
        pytest.fail(f"2-process run exit codes {codes}\n{logs}")

    gin.clear_config()
    summary = train_lib.train(GIN_FILES, _bindings(one_dir, cache_dir, eval_dir))
    gin.clear_config()
    eval_tokens = sum(d.shape[1] for d in eval_docs)
    return two_dir, one_dir, summary, str(root / "logs"), eval_tokens


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    two_dir, one_dir, summary, log_dir, eval_tokens = runs
    assert jax.device_count() == 8 and summary["step"] == STEPS
    two, one = _losses(two_dir), _losses(one_dir)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)
    # Evaluation covered every held-out token once in both runs, however each process packed.
    for run_dir in (two_dir, one_dir):
        evals = [r for r in metrics_lib.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "eval/loss" in r]
        assert [r["step"] for r in evals] == [STEPS] and evals[0]["eval/num_tokens"] == eval_tokens
    # Only process 0 logs INFO lines (the model summary).
    chief, other = (open(os.path.join(log_dir, f"process_{i}.log")).read() for i in range(2))
    assert "params" in chief and "lime_jax.trainer.loop: model" in chief
    assert "lime_jax.trainer.loop: model" not in other


@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one_process(runs):
    two_dir, one_dir, *_ = runs
    # Every process saved its data-iterator state into the same checkpoint.
    data_dir = os.path.join(ckpt_lib.checkpoint_dir(two_dir), str(STEPS), "data")
    assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]

    gin_config.parse_gin(GIN_FILES, _bindings(two_dir, "unused"))
    cfg = ModelConfig()
    rules = sharding.sharding_rules()
    mesh = sharding.make_mesh((1, 8, 1))  # another layout than training used: resharded on read
    _, abstract = abstract_model(cfg, rules)
    target = state_lib.with_shardings(abstract, sharding.state_shardings(abstract, mesh, rules))
    two_params, step = ckpt_lib.restore_params(two_dir, target)
    one_params, _ = ckpt_lib.restore_params(one_dir, target)
    assert step == STEPS
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(two_params),
                                 jax.tree_util.tree_leaves_with_path(one_params)):
        assert a.sharding.mesh.shape == mesh.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_resolve_settings():
    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.resolve(env=env) == {"coordinator_address": "127.0.0.1:1234",
                                            "num_processes": 2, "process_id": 1}
    # Flags win over the environment.
    assert distributed.resolve(process_id=0, env=env)["process_id"] == 0
    assert distributed.resolve(env={}) is None
    assert distributed.resolve(env={"JAX_NUM_PROCESSES": "1"}) is None
    assert distributed.resolve(mode="off", env=env) is None
    assert distributed.resolve(mode="on", env={}) == {}  # JAX auto-detects (e.g. TPU metadata)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}
    assert distributed.resolve(env=slurm) == {}
    assert distributed.resolve(env=dict(slurm, SLURM_NTASKS="1")) is None
    assert distributed.resolve(env={"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == {}
    with pytest.raises(distributed.DistributedError, match="JAX_PROCESS_ID='x'"):
        distributed.resolve(env=dict(env, JAX_PROCESS_ID="x"))
    with pytest.raises(distributed.DistributedError, match=r"process_id 2 is not in \[0, 2\)"):
        distributed.resolve(process_id=2, env=env)
    with pytest.raises(distributed.DistributedError, match="process_id missing"):
        distributed.resolve(env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(distributed.DistributedError, match="HOST:PORT"):
        distributed.resolve(coordinator_address="localhost", num_processes=2, process_id=0, env={})


def test_train_flags_become_bindings():
    _, bindings = cli_train.parse_flags(["--gin_file", "runs/lime.gin", "--coordinator_address",
                                         "10.0.0.1:8476", "--num_processes", "4", "--process_id", "3"])
    assert bindings == ["distributed_setup.coordinator_address = '10.0.0.1:8476'",
                        "distributed_setup.num_processes = 4", "distributed_setup.process_id = 3"]


def test_data_shards_give_the_same_global_batch(tmp_path):
    _write_cache(str(tmp_path), 40, seed=1)
    kw = dict(seq_len=16, shuffle=True, seed=3, read_threads=1)
    one = next(iter(distributed.process_dataset(str(tmp_path), 8, data_shards=2, process_index=0,
                                                process_count=1, **kw)))
    parts = [next(iter(distributed.process_dataset(str(tmp_path), 4, data_shards=2, process_index=p,
                                                   process_count=2, **kw))) for p in range(2)]
    for k in one:
        np.testing.assert_array_equal(one[k], np.concatenate([p[k] for p in parts]), err_msg=k)
    with pytest.raises(distributed.DistributedError, match="multiple of the process count"):
        distributed.process_dataset(str(tmp_path), 4, data_shards=3, process_index=0, process_count=2, **kw)
