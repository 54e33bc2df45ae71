"""Multi-process training on one machine: 2 processes x 4 CPU devices (gloo collectives over
loopback) against 1 process x 8 devices, on the tiny model and a hand-made cache.

Comparison: both runs set `process_dataset.data_shards = 2`, so the single process reads the
two data shards the two processes read and concatenates their rows in the same order: the
global batches are identical, and the losses must agree to float tolerance (only the order
of cross-device reductions may differ). The same holds across a resume on another process
count (the data position is saved per shard) and across a SIGTERM sent to one process.
"""
import os
import re
import shutil
import signal
import sys
import time
import types

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
STEPS, EVERY = 12, 4  # checkpoints at 4, 8, 12
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
        "SEQ_LEN = 32", "BATCH_SIZE = 8", f"CHECKPOINT_EVERY = {EVERY}",
        f"ModelConfig.vocab_size = {VOCAB}", "OptimizerConfig.warmup_steps = 2",
        "TrainConfig.log_every = 1", "TrainConfig.progress = False", "DataConfig.read_threads = 1",
        "process_dataset.data_shards = 2",
    ]


def _losses(model_dir):
    rows = metrics_lib.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice: only process 0 may write logs"
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _eval_loss(model_dir):
    return [r for r in metrics_lib.read_jsonl(os.path.join(model_dir, "metrics.jsonl")) if "eval/loss" in r][-1][
        "eval/loss"]


def _spawn_two(model_dir, run, log_dir, env=None):
    argv = [sys.executable, "-m", "lime_jax.cli.train"]
    for f in GIN_FILES:
        argv += ["--gin_file", f]
    for b in _bindings(model_dir, run.cache_dir, run.eval_dir):
        argv += ["--gin_bindings", b]
    return distributed.spawn_local(argv, num_processes=2, devices_per_process=4, log_dir=log_dir, env=env)


def _logs(log_dir):
    return [open(os.path.join(log_dir, f"process_{i}.log")).read() for i in range(2)]


def _fail_with_logs(what, codes, log_dir):
    pytest.fail(f"{what}: exit codes {codes}\n" + "\n".join(
        f"--- process {i}\n{text[-3000:]}" for i, text in enumerate(_logs(log_dir))))


def _wait_for(what, condition, procs, log_dir, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            _fail_with_logs(f"ended or timed out waiting for {what}", distributed.wait_all(procs, 10), log_dir)
        time.sleep(0.05)


def _checkpoints_up_to(src_dir, dst_dir, step):
    """A model dir holding `src_dir`'s checkpoints up to `step` (saved by the same code as a run
    stopped at `step` saves), without its logs."""
    src = str(ckpt_lib.checkpoint_dir(src_dir))
    shutil.copytree(src, ckpt_lib.checkpoint_dir(dst_dir), ignore=lambda d, names: [
        n for n in names if os.path.abspath(d) == src and n.isdigit() and int(n) > step])


def _train_one_process(model_dir, run, drop=()):
    gin.clear_config()
    try:
        return train_lib.train(GIN_FILES, [b for b in _bindings(model_dir, run.cache_dir, run.eval_dir)
                                           if not b.startswith(drop)])
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    run = types.SimpleNamespace(cache_dir=str(root / "cache"), eval_dir=str(root / "heldout"),
                                two_dir=str(root / "two"), one_dir=str(root / "one"), log_dir=str(root / "logs"))
    _write_cache(run.cache_dir, 64, seed=0)
    # Processes read every other document: process 0 gets the long ones and packs many more eval
    # batches; process 1 must pad to match (else the collective eval step hangs).
    eval_docs = _write_cache(run.eval_dir, 16, seed=1, lengths=((150, 200), (8, 12)))
    run.eval_tokens = sum(d.shape[1] for d in eval_docs)
    codes = distributed.wait_all(_spawn_two(run.two_dir, run, run.log_dir), timeout_s=300)
    if codes != [0, 0]:
        _fail_with_logs("2-process run", codes, run.log_dir)
    run.summary = _train_one_process(run.one_dir, run)
    return run


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    assert jax.device_count() == 8 and runs.summary["step"] == STEPS
    two, one = _losses(runs.two_dir), _losses(runs.one_dir)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)
    # Evaluation covered every held-out token once in both runs, however each process packed.
    for run_dir in (runs.two_dir, runs.one_dir):
        evals = [r for r in metrics_lib.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "eval/loss" in r]
        assert [r["step"] for r in evals] == [STEPS] and evals[0]["eval/num_tokens"] == runs.eval_tokens
    # Only process 0 logs INFO lines (the model summary).
    chief, other = _logs(runs.log_dir)
    assert "params" in chief and "lime_jax.trainer.loop: model" in chief
    assert "lime_jax.trainer.loop: model" not in other


@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one_process(runs):
    two_dir, one_dir = runs.two_dir, runs.one_dir
    # Every process saved the data-iterator state of the shard it reads into the same checkpoint.
    data_dir = os.path.join(ckpt_lib.checkpoint_dir(two_dir), str(STEPS), "data")
    assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
        "shard_0-of-2.json", "shard_1-of-2.json"]

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


@pytest.mark.slow
def test_two_process_run_resumes_on_one_process_with_the_same_batches(runs, tmp_path):
    model_dir, k = str(tmp_path / "resumed"), 2 * EVERY
    _checkpoints_up_to(runs.two_dir, model_dir, k)
    # Another number of data shards would read other batches: refused, naming the setting.
    with pytest.raises(ckpt_lib.CheckpointError, match=r"2 data shards; this run reads 1 .*"
                                                        r"process_dataset.data_shards = 2"):
        _train_one_process(model_dir, runs, drop="process_dataset.data_shards")
    summary = _train_one_process(model_dir, runs)
    assert summary["start_step"] == k and summary["step"] == STEPS
    one, resumed = _losses(runs.one_dir), _losses(model_dir)
    assert sorted(resumed) == list(range(k + 1, STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in resumed], [one[s] for s in resumed], rtol=1e-5)
    assert _eval_loss(model_dir) == pytest.approx(_eval_loss(runs.one_dir), rel=1e-5)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(runs, tmp_path):
    """A 1-process checkpoint resumes on 2 processes; SIGTERM to process 0 alone stops both at
    one step with a checkpoint and exit 0; that resumes on 1 process to the end. Every step's
    loss equals the uninterrupted 1-process run's.

    Deterministic, although the runtime notices SIGTERM up to a second late (longer than the
    steps left may take): process 1 is paused (SIGSTOP) once restored, before its first step,
    until process 0's runtime has the notice. Process 0 cannot finish a step without process 1,
    and from the notice on it holds its step count until process 1 joins the agreement: both
    agree within the first few steps."""
    model_dir, log_dir, k = str(tmp_path / "term"), str(tmp_path / "logs"), EVERY
    _checkpoints_up_to(runs.one_dir, model_dir, k)
    # C++ INFO logs: process 0's says when its runtime has the notice.
    procs = _spawn_two(model_dir, runs, log_dir, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0"))
    # Process 0 logs this after the restore's last collective, which process 1 has reached too.
    _wait_for("the restore", lambda: "lime_jax.trainer.loop: resumed from" in _logs(log_dir)[0], procs, log_dir)
    procs[1].send_signal(signal.SIGSTOP)
    try:
        procs[0].send_signal(signal.SIGTERM)
        _wait_for("the preemption notice", lambda: "Received preemption notice" in _logs(log_dir)[0], procs,
                  log_dir, timeout_s=30)
    finally:
        procs[1].send_signal(signal.SIGCONT)
    codes = distributed.wait_all(procs, timeout_s=120)
    if codes != [0, 0]:
        _fail_with_logs("2-process run after SIGTERM to process 0", codes, log_dir)
    saved = [re.findall(r"SIGTERM: saved a checkpoint at step (\d+)", text) for text in _logs(log_dir)]
    assert len(saved[0]) == len(saved[1]) == 1 and saved[0] == saved[1], saved
    stop = int(saved[0][0])
    assert k < stop < STEPS
    assert ckpt_lib.Checkpointer(model_dir, read_only=True).latest_step() == stop
    data_dir = os.path.join(ckpt_lib.checkpoint_dir(model_dir), str(stop), "data")
    assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == ["shard_0-of-2.json",
                                                                              "shard_1-of-2.json"]
    one, two = _losses(runs.one_dir), _losses(model_dir)
    assert sorted(two) == list(range(k + 1, stop + 1))

    summary = _train_one_process(model_dir, runs)
    assert summary["start_step"] == stop and summary["step"] == STEPS and not summary["preempted"]
    resumed = _losses(model_dir)
    assert sorted(resumed) == list(range(k + 1, STEPS + 1))
    assert all(resumed[s] == two[s] for s in two)  # rows of the 2-process part are kept
    np.testing.assert_allclose([resumed[s] for s in resumed], [one[s] for s in resumed], rtol=1e-5)
    assert _eval_loss(model_dir) == pytest.approx(_eval_loss(runs.one_dir), rel=1e-5)


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
