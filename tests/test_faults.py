"""Faults that really happen to training runs, done for real on the tiny model.

SIGKILL at random moments (also mid async save), damaged checkpoints, corrupt caches, a full
disk during a save, and model dirs holding planted pickles. Each checks that nothing is lost
and nothing wrong is loaded.
"""
import ast
import gc
import glob
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lime_jax.cli import batch_log
from lime_jax.trainer import checkpoint as ckpt_lib
from lime_jax.trainer import metrics as metrics_lib
from lime_jax.cli import train as cli_train
from lime_jax.trainer import train as train_lib
from lime_jax.data import cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
STEPS = 24
CKPT_EVERY = 3


@pytest.fixture(autouse=True)
def _propagating_logs():
    """`train.main` gives the package logger its own handler and stops propagation; undo that
    so caplog sees lime_jax records whatever ran before."""
    pkg = logging.getLogger("lime_jax")
    saved = pkg.handlers[:], pkg.propagate
    pkg.handlers, pkg.propagate = [], True
    yield
    pkg.handlers, pkg.propagate = saved


@pytest.fixture(autouse=True)
def _outside_the_repo(tmp_path, monkeypatch):
    # gin resolves `include 'runs/x.gin'` as a Python package first: a stray `runs/` directory
    # in the working directory (e.g. a quickstart output) would break parsing.
    monkeypatch.chdir(tmp_path)


def _docs(n, seed):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        toks = rng.integers(2, VOCAB, int(rng.integers(6, 50)))
        toks[-1] = 1
        docs.append(np.stack([toks, 2 + toks % 50, 2 + toks % 37]).astype(np.int32))
    return docs


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "train")
    cache.write_cache(out, _docs(96, 0), {"targets": VOCAB, "targets_pos": 53, "targets_ner": 40},
                      docs_per_shard=32)
    return out


def _bindings(model_dir, cache_dir, **extra):
    b = {"MODEL_DIR": repr(str(model_dir)), "TRAIN_STEPS": STEPS, "CACHE_DIR": repr(cache_dir),
         "SEQ_LEN": 32, "BATCH_SIZE": 8, "CHECKPOINT_EVERY": CKPT_EVERY, "EVAL_EVERY": 1000,
         "OptimizerConfig.warmup_steps": 5, "TrainConfig.log_every": 1, "TrainConfig.progress": False,
         "DataConfig.read_threads": 1, "CheckpointConfig.keep": 3, "ModelConfig.vocab_size": VOCAB}
    b.update(extra)
    return [f"{k} = {v}" for k, v in b.items()]


GIN_FILES = ["runs/lime.gin", "models/tiny.gin"]


def _argv(bindings):
    argv = [a for f in GIN_FILES for a in ("--gin_file", f)]
    return argv + [a for b in bindings for a in ("--gin_bindings", b)]


def _final_params(model_dir):
    from lime_jax.model import ModelConfig, abstract_model

    cfg = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      dtype="float32", metadata=(("pos", 53), ("ner", 40)))
    _, abstract = abstract_model(cfg)
    params, step = ckpt_lib.restore_params(model_dir, abstract)
    return step, params


def _assert_params_bitwise_equal(a, b):
    import jax

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def _losses(model_dir):
    """Train loss per step."""
    rows = metrics_lib.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory):
    """An uninterrupted run through the same CLI hook: its batch order, losses and params."""
    model_dir = tmp_path_factory.mktemp("reference")
    log_path = str(model_dir / "batches.log")
    proc = _spawn(_bindings(model_dir, cache_dir), log_path, str(model_dir / "stderr"))
    assert proc.wait(timeout=300) == 0, open(model_dir / "stderr").read()[-3000:]
    return str(model_dir), open(log_path).read().split()


def _spawn(bindings, log_path, stderr_path):
    env = dict(os.environ, **{batch_log.ENV_VAR: log_path},
               # Later lives reuse the compiled step: the kills land in training, not compiling.
               JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(os.path.dirname(log_path)), "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    with open(stderr_path, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "lime_jax.cli.batch_log", *_argv(bindings)],
                                cwd=os.path.dirname(log_path), env=env, stdout=subprocess.DEVNULL, stderr=err)


def _newest_sealed(model_dir):
    steps = [int(n) for n in os.listdir(os.path.join(model_dir, "checkpoints")) if n.isdigit()
             and os.path.exists(os.path.join(model_dir, "checkpoints", n, ckpt_lib.SEAL_NAME))] \
        if os.path.isdir(os.path.join(model_dir, "checkpoints")) else []
    return max(steps, default=0)


def _lines(path):
    return open(path).read().split() if os.path.exists(path) else []


def _resumed_step(stderr_text):
    marker = "at step "
    lines = [line for line in stderr_text.splitlines() if "resumed from" in line]
    return int(lines[-1].rsplit(marker, 1)[1].split()[0]) if lines else 0


@pytest.mark.slow
def test_sigkill_five_times_then_resume_is_exact(reference, cache_dir, tmp_path):
    ref_dir, ref_batches = reference
    assert len(ref_batches) == STEPS
    model_dir = tmp_path / "killed"
    model_dir.mkdir()
    rng = random.Random(8)
    lives = []  # (resumed step, batch hashes taken by that process)
    mid_save_kills = 0
    pending_saves = str(model_dir / "checkpoints" / "*.orbax-checkpoint-tmp*")
    for life in range(6):
        log_path, err_path = str(model_dir / f"batches.{life}"), str(model_dir / f"stderr.{life}")
        sealed_at_start = _newest_sealed(model_dir)
        proc = _spawn(_bindings(model_dir, cache_dir), log_path, err_path)
        if life < 5:
            mode = ("startup", "steps", "save", "steps", "save")[life]
            deadline = time.time() + 240
            if mode == "startup":  # anywhere in imports, restore, compile or the first steps
                time.sleep(rng.uniform(1.0, 8.0))
            else:
                target = rng.randint(2, 6)
                while len(_lines(log_path)) < target and proc.poll() is None:
                    assert time.time() < deadline, "no training progress"
                    time.sleep(0.01)
            if mode == "steps":  # after this life committed a checkpoint of its own
                while _newest_sealed(model_dir) <= sealed_at_start and proc.poll() is None:
                    assert time.time() < deadline, "no checkpoint committed"
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.2))
            elif mode == "save":  # the moment an async save has files on disk, uncommitted
                while proc.poll() is None and not glob.glob(pending_saves):
                    assert time.time() < deadline
                    time.sleep(0.002)
                mid_save_kills += bool(glob.glob(pending_saves))
            assert proc.poll() is None, f"life {life} ended before its kill: {open(err_path).read()[-2000:]}"
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        else:
            assert proc.wait(timeout=300) == 0, open(err_path).read()[-3000:]
        lives.append((_resumed_step(open(err_path).read()), _lines(log_path)))

    assert mid_save_kills >= 1
    # Each process read exactly the batches the uninterrupted run read from its resumed step
    # on: the restored iterator position matches the restored state, nothing skipped or doubled.
    for start, batches in lives:
        assert batches == ref_batches[start:start + len(batches)]
    # Consecutive lives overlap or touch (a resume never starts past what was trained).
    for (s0, b0), (s1, _) in zip(lives, lives[1:]):
        assert s1 <= s0 + len(b0)
    assert lives[-1][0] + len(lives[-1][1]) == STEPS
    assert max(s for s, _ in lives) > 0  # some process really resumed from a checkpoint
    step, params = _final_params(str(model_dir))
    ref_step, ref_params = _final_params(ref_dir)
    assert step == ref_step == STEPS
    _assert_params_bitwise_equal(params, ref_params)
    assert _losses(str(model_dir)) == _losses(ref_dir)
    # Rows of steps lost at a kill were dropped on resume: each step is logged once.
    rows = metrics_lib.read_jsonl(str(model_dir / "metrics.jsonl"))
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == sorted(set(train_steps))



# --- damaged checkpoints ---------------------------------------------------------------------

def _biggest_file(d):
    files = [f for f in glob.glob(os.path.join(d, "**"), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _biggest_file(os.path.join(step_dir, "params"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _edit_iterator_state(step_dir):
    # Valid JSON with another position: Orbax and Grain would load it and skip examples.
    path = glob.glob(os.path.join(step_dir, "data", "*.json"))[0]
    text = open(path).read()
    digit = next(i for i, c in enumerate(text) if c.isdigit())
    with open(path, "w") as f:
        f.write(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1:])


DAMAGE = {
    "truncated_file": _truncate,
    "edited_iterator_state": _edit_iterator_state,
    "missing_item": lambda d: shutil.rmtree(os.path.join(d, "opt_state")),
    "missing_seal": lambda d: os.remove(os.path.join(d, ckpt_lib.SEAL_NAME)),
}


@pytest.fixture(scope="module")
def short_run(cache_dir, tmp_path_factory):
    """Checkpoints at steps 3 and 6 of an uninterrupted 6-step run (in process)."""
    model_dir = str(tmp_path_factory.mktemp("short"))
    train_lib.train(GIN_FILES, _bindings(model_dir, cache_dir, TRAIN_STEPS=6))
    return model_dir


def _restore_newest(model_dir, cache_dir):
    """Checkpointer-level resume, as the trainer does it, without compiling a step."""
    from lime_jax.trainer import optim
    from lime_jax.trainer.state import abstract_train_state
    from lime_jax.data import loader
    from lime_jax.model import ModelConfig, abstract_model

    cfg = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      dtype="float32", metadata=(("pos", 53), ("ner", 40)))
    _, abstract = abstract_model(cfg)
    tx, _ = optim.make_optimizer(optim.OptimizerConfig(), 6)
    data_iter = iter(loader.build_dataset(cache_dir, seq_len=32, batch_size=8, shard_index=0, shard_count=1))
    ckpt = ckpt_lib.Checkpointer(model_dir)
    try:
        return ckpt.restore_newest_intact(abstract_train_state(abstract, tx), data_iter)
    finally:
        ckpt.close()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_with_warning(short_run, cache_dir, tmp_path, caplog, damage):
    model_dir = str(tmp_path / "m")
    shutil.copytree(short_run, model_dir)
    DAMAGE[damage](os.path.join(model_dir, "checkpoints", "6"))
    with caplog.at_level(logging.WARNING, logger="lime_jax.trainer.checkpoint"):
        step, state = _restore_newest(model_dir, cache_dir)
    assert step == 3 and int(state.step) == 3
    damaged = os.path.join(model_dir, "checkpoints", "6")
    assert any(damaged in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    # Moved aside, not deleted, so the run can save step 6 again.
    assert not os.path.exists(damaged)
    assert len(glob.glob(os.path.join(model_dir, ckpt_lib.DAMAGED_SUBDIR, "6-*"))) == 1


def test_uncommitted_step_dir_is_never_listed(short_run, cache_dir, tmp_path):
    model_dir = str(tmp_path / "m")
    shutil.copytree(short_run, model_dir)
    ckpts = os.path.join(model_dir, "checkpoints")
    os.rename(os.path.join(ckpts, "6"), os.path.join(ckpts, "6.orbax-checkpoint-tmp"))  # killed mid-save
    assert _restore_newest(model_dir, cache_dir)[0] == 3


def test_no_intact_checkpoint_is_a_clear_error(short_run, cache_dir, tmp_path, capfd):
    model_dir = str(tmp_path / "m")
    shutil.copytree(short_run, model_dir)
    _truncate(os.path.join(model_dir, "checkpoints", "6"))
    DAMAGE["missing_item"](os.path.join(model_dir, "checkpoints", "3"))
    with pytest.raises(ckpt_lib.NoIntactCheckpointError, match=r"no intact checkpoint .*step 6: file params/.* bytes.*step 3: item 'opt_state' is missing"):
        _restore_newest(model_dir, cache_dir)
    # The CLI says so and exits 1 before any step; restore_params (eval, generate) refuses too.
    capfd.readouterr()
    assert cli_train.main(_argv(_bindings(model_dir, cache_dir, TRAIN_STEPS=6))) == 1
    assert "ERROR lime_jax.cli.train: no intact checkpoint" in capfd.readouterr().err
    with pytest.raises(ckpt_lib.NoIntactCheckpointError):
        _final_params(model_dir)


def test_trainer_resumes_from_the_intact_checkpoint_and_matches(short_run, cache_dir, tmp_path, caplog):
    model_dir = str(tmp_path / "m")
    shutil.copytree(short_run, model_dir)
    _edit_iterator_state(os.path.join(model_dir, "checkpoints", "6"))
    with caplog.at_level(logging.WARNING, logger="lime_jax.trainer.checkpoint"):
        summary = train_lib.train(GIN_FILES, _bindings(model_dir, cache_dir, TRAIN_STEPS=6))
    assert summary["start_step"] == 3 and summary["step"] == 6
    assert "checkpoints/6 is damaged" in caplog.text
    _assert_params_bitwise_equal(_final_params(model_dir)[1], _final_params(short_run)[1])


# --- damaged caches: a size or manifest mismatch fails before step 1, naming the file; a
# same-size corruption is found by `lime-jax verify-cache` (training start hashes nothing) ---

def _flip_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _edit_shard_entry(cache_dir, **fields):
    path = os.path.join(cache_dir, "manifest.json")
    manifest = cache.load_manifest(cache_dir)
    manifest["shards"][1].update(fields)
    with open(path, "w") as f:
        json.dump(manifest, f)


START_DAMAGE = {
    "truncated_shard": (lambda d: open(os.path.join(d, "shard-00001.array_record"), "r+b").truncate(100),
                        "100 bytes, manifest field 'shards[1].bytes'"),
    "manifest_records": (lambda d: _edit_shard_entry(d, num_records=31),
                         "holds 32 records, manifest field 'shards[1].num_records' says 31"),
}


@pytest.mark.parametrize("damage", sorted(START_DAMAGE))
def test_damaged_cache_fails_before_step_1_naming_the_file(cache_dir, tmp_path, capfd, damage):
    bad_cache = str(tmp_path / "cache")
    shutil.copytree(cache_dir, bad_cache)
    edit, expected = START_DAMAGE[damage]
    edit(bad_cache)
    model_dir = tmp_path / "m"
    capfd.readouterr()
    assert cli_train.main(_argv(_bindings(model_dir, bad_cache))) == 1
    err = capfd.readouterr().err
    assert f"ERROR lime_jax.cli.train: {os.path.join(bad_cache, 'shard-00001.array_record')}: {expected}" in err
    assert not os.path.exists(model_dir / "checkpoints") and not os.path.exists(model_dir / "metrics.jsonl")


HASH_DAMAGE = {
    "corrupt_shard": lambda d: _flip_byte(os.path.join(d, "shard-00001.array_record")),
    "manifest_hash": lambda d: _edit_shard_entry(d, sha256="0" * 64),
}


@pytest.mark.parametrize("damage", sorted(HASH_DAMAGE))
def test_same_size_damage_is_found_by_verify_cache(cache_dir, tmp_path, capfd, damage):
    from lime_jax import cli

    bad_cache = str(tmp_path / "cache")
    shutil.copytree(cache_dir, bad_cache)
    HASH_DAMAGE[damage](bad_cache)
    capfd.readouterr()
    assert cli.main(["verify-cache", bad_cache]) == 1
    out, err = capfd.readouterr()
    shard = os.path.join(bad_cache, "shard-00001.array_record")
    assert f"MISMATCH {shard}: sha256" in out and f"OK       {os.path.join(bad_cache, 'shard-00000.array_record')}" in out
    assert shard in err


# --- a full disk during a save ---------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


@pytest.mark.slow
def test_full_disk_during_save_stops_clearly_and_keeps_the_last_checkpoint(cache_dir, small_disk, capfd):
    model_dir = str(small_disk / "m")
    bindings = _bindings(model_dir, cache_dir, TRAIN_STEPS=12)
    train_lib.train(GIN_FILES, bindings, stop_after_steps=3)
    # Fill the disk but for room enough for metric lines, not for a checkpoint.
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    with open(small_disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - 64 * 1024, 0))
    capfd.readouterr()
    assert cli_train.main(_argv(bindings)) == 1
    err = capfd.readouterr().err
    assert "ERROR lime_jax.cli.train: saving checkpoint step 6" in err and "No space left on device" in err
    ckpt = ckpt_lib.Checkpointer(model_dir, read_only=True)
    assert ckpt.all_steps() == [3]
    assert ckpt_lib.check_step_dir(ckpt.step_dir(3)) is None
    assert _final_params(model_dir)[0] == 3


# --- loading a model dir from someone else runs no code from it ------------------------------

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}


def test_library_has_no_unpickling_or_eval():
    """No load path can unpickle or eval: the library never imports a pickler or calls eval/exec."""
    offenders = []
    # Python 3.11's AST builder fails if a finalizer runs inside it (e.g. of Orbax futures
    # left over from the full-disk test): collect first, no collection while parsing.
    gc.collect()
    gc.disable()
    try:
        trees = [(path, ast.parse(open(path, encoding="utf-8").read(), path))
                 for path in glob.glob(os.path.join(REPO, "lime_jax", "**", "*.py"), recursive=True)]
    finally:
        gc.enable()
    for path, tree in trees:
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            if PICKLE_MODULES & set(names):
                offenders.append(f"{path}:{node.lineno} imports {names}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                offenders.append(f"{path}:{node.lineno} calls {node.func.id}()")
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle" and not (
                    isinstance(node.value, ast.Constant) and node.value.value is False):
                offenders.append(f"{path}:{node.lineno} passes allow_pickle")
    assert not offenders, offenders


class _Planted:
    """Unpickling this creates the marker file: proof that someone unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickles_in_a_model_dir_are_never_opened(short_run, cache_dir, tmp_path):
    import pickle

    model_dir = str(tmp_path / "m")
    shutil.copytree(short_run, model_dir)
    marker = str(tmp_path / "executed")
    payload = pickle.dumps(_Planted(marker))
    step_dir = os.path.join(model_dir, "checkpoints", "6")
    for rel in ("checkpoint", "params/checkpoint", "params.pkl", "opt_state/state.pickle",
                "data/process_0-of-1.pkl", "train/checkpoint.msgpack"):
        with open(os.path.join(step_dir, rel), "wb") as f:
            f.write(payload)
    for rel in ("config.pkl", "model.pkl", "checkpoints/checkpoint"):
        with open(os.path.join(model_dir, rel), "wb") as f:
            f.write(payload)
    # Files added after the seal make step 6 damaged: resume and restore_params take step 3.
    assert _restore_newest(model_dir, cache_dir)[0] == 3
    assert _final_params(model_dir)[0] == 3
    assert not os.path.exists(marker)


def test_config_gin_of_a_model_dir_imports_nothing(tmp_path, monkeypatch):
    from lime_jax.inference import model_dir as model_dir_lib

    code_dir = tmp_path / "code"
    code_dir.mkdir()
    marker = tmp_path / "executed"
    (code_dir / "lime_planted_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(code_dir))  # e.g. the model dir is the working directory
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.gin").write_text("import lime_planted_module\nrun.seq_len = 8\nrun.batch_size = 2\n")
    try:
        model_dir_lib.read_run_config(str(model_dir))
    except model_dir_lib.ModelDirError:
        pass  # refusing the file is fine; running its imports is not
    assert not marker.exists()
