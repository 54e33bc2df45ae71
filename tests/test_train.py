"""Trainer tests on a tiny LIME model over a synthetic cache (real loader, model, Orbax, optax).

Golden numbers: tests/golden/train_tiny_lime.json. After an intended numerical change, rerun
with UPDATE_GOLDEN=1 to rewrite it (and say why in the change).
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import gin
import numpy as np
import pytest

from lime_jax.cli import train as cli_train
from lime_jax.data import cache
from lime_jax.ids import EOS_ID, EOS_TAG_ID, NUM_RESERVED_TAGS
from lime_jax.trainer import checkpoint as ckpt_lib
from lime_jax.trainer import gin_config
from lime_jax.trainer import metrics as metrics_lib
from lime_jax.trainer import optim
from lime_jax.trainer import step as step_lib
from lime_jax.trainer import train as train_lib
from lime_jax.trainer.config import ConfigError
from lime_jax.trainer.loop import TrainingError
from lime_jax.trainer.state import TrainState

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "train_tiny_lime.json")
VOCAB = 64
STEPS = 30
K = 5


def _write_cache(out_dir, n_docs, seed):
    """Documents from a noisy deterministic successor rule, so a tiny model can learn them."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(8, 60))
        toks = np.empty(n, np.int64)
        toks[0] = rng.integers(2, VOCAB)
        for i in range(1, n):
            follow = rng.random() < 0.8
            toks[i] = (toks[i - 1] * 5 + 3) % (VOCAB - 2) + 2 if follow else rng.integers(2, VOCAB)
        toks[-1] = EOS_ID
        tags = np.stack([NUM_RESERVED_TAGS + toks % 50, NUM_RESERVED_TAGS + toks % 37])  # labels
        tags[:, -1] = EOS_TAG_ID
        docs.append(np.concatenate([toks[None], tags]).astype(np.int32))
    shards = [cache.write_shard(out_dir, i, docs[i::2]) for i in range(2)]
    cache.write_manifest(out_dir, {
        "format": cache.FORMAT, "features": list(cache.DEFAULT_FEATURES), "shards": shards,
        "vocab_sizes": {"targets": VOCAB, "targets_pos": 53, "targets_ner": 40}})


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    _write_cache(str(root / "train"), 64, seed=0)
    _write_cache(str(root / "eval"), 16, seed=1)
    return str(root / "train"), str(root / "eval")


def _bindings(model_dir, caches, **extra):
    train_dir, eval_dir = caches
    b = [
        f"MODEL_DIR = '{model_dir}'", f"TRAIN_STEPS = {STEPS}", f"CACHE_DIR = '{train_dir}'",
        f"EVAL_CACHE_DIR = '{eval_dir}'", "SEQ_LEN = 32", "BATCH_SIZE = 8",
        "CHECKPOINT_EVERY = 10", "EVAL_EVERY = 10",
        f"ModelConfig.vocab_size = {VOCAB}", "ModelConfig.d_model = 32", "ModelConfig.d_ff = 64",
        "ModelConfig.n_layers = 2", "ModelConfig.n_heads = 4", "ModelConfig.n_kv_heads = 2",
        # f32 compute keeps cross-mesh and golden comparisons tight.
        "ModelConfig.dtype = 'float32'",
        "OptimizerConfig.warmup_steps = 5", "TrainConfig.log_every = 1", "TrainConfig.progress = False",
        "DataConfig.read_threads = 1",
    ]
    return b + [f"{k} = {v}" for k, v in extra.items()]


def _train_losses(model_dir):
    rows = metrics_lib.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def full_run(caches, tmp_path_factory):
    # A second held-out set: the eval cache's documents labelled as re-tagged by `prefix` (the
    # same tags, so its metrics must equal the main set's).
    relabelled = str(tmp_path_factory.mktemp("eval_relabelled"))
    _write_cache(relabelled, 16, seed=1)
    manifest = cache.load_manifest(relabelled)
    cache.write_manifest(relabelled, {**manifest, "tag_source": "prefix"})
    model_dir = str(tmp_path_factory.mktemp("full"))
    summary = train_lib.train(["runs/lime.gin"], _bindings(
        model_dir, caches, **{"DataConfig.extra_eval_cache_dirs": repr({"prefix": relabelled})}))
    return model_dir, summary


def test_short_run_learns_and_writes_artifacts(full_run):
    model_dir, summary = full_run
    losses = _train_losses(model_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)]) < losses[1] - 1.0
    assert summary["step"] == STEPS and summary["eval_loss"] < math.log(VOCAB)
    assert 0 < summary["eval_accuracy"] <= 1 and summary["tokens_per_s"] > 0
    # Orbax keeps the last 3 complete checkpoints.
    assert ckpt_lib.Checkpointer(model_dir, read_only=True).all_steps() == [10, 20, 30]
    # TensorBoard events parse back with the same values as the JSONL log.
    events = metrics_lib.read_event_scalars(os.path.join(model_dir, "tb"))
    assert [s for s, _ in events["train/loss"]] == list(range(1, STEPS + 1))
    assert events["train/loss"][-1][1] == pytest.approx(losses[STEPS], rel=1e-6)
    assert [s for s, _ in events["eval/accuracy"]] == [10, 20, 30]
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s",
                "train/checkpoint_save_s", "eval/perplexity"):
        assert tag in events, tag
    config = open(os.path.join(model_dir, "config.gin")).read()
    assert "ModelConfig.metadata = (('pos', 53), ('ner', 40))" in config and "TrainConfig.train_steps" in config
    # Extra held-out sets are evaluated at the same steps, and every set's tag source is recorded.
    assert [v for _, v in events["eval_prefix/accuracy"]] == [v for _, v in events["eval/accuracy"]]
    assert summary["extra_evals"]["eval_prefix"]["accuracy"] == summary["eval_accuracy"]
    with open(os.path.join(model_dir, "tag_sources.json")) as f:
        assert json.load(f) == {"train": "oracle", "eval": "oracle", "eval_prefix": "prefix"}


def test_golden_first_steps(full_run):
    model_dir, _ = full_run
    losses = _train_losses(model_dir)
    got = {"losses": [losses[s] for s in range(1, 6)]}
    if os.environ.get("UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump(got, f, indent=1)
            f.write("\n")
        pytest.skip(f"rewrote {GOLDEN}")
    with open(GOLDEN) as f:
        want = json.load(f)
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=2e-5, err_msg=(
        f"first-step losses differ from {GOLDEN}; if the change is intended, rerun with UPDATE_GOLDEN=1"))


def test_resume_is_exact(full_run, caches, tmp_path):
    full_dir, _ = full_run
    model_dir = str(tmp_path / "resumed")
    first = train_lib.train(["runs/lime.gin"], _bindings(model_dir, caches), stop_after_steps=K)
    assert first["step"] == K
    assert ckpt_lib.Checkpointer(model_dir, read_only=True).latest_step() == K
    second = train_lib.train(["runs/lime.gin"], _bindings(model_dir, caches))
    assert second["start_step"] == K and second["step"] == STEPS
    assert _train_losses(model_dir) == _train_losses(full_dir)  # bitwise, every step


def test_mesh_2x2x2_matches_8x1x1(full_run, caches, tmp_path):
    full_dir, _ = full_run
    model_dir = str(tmp_path / "mesh222")
    train_lib.train(["runs/lime.gin"], _bindings(model_dir, caches, **{
        "TrainConfig.mesh_shape": "(2, 2, 2)", "CheckpointConfig.keep": 2, "CheckpointConfig.keep_best": True}))
    a, b = _train_losses(full_dir), _train_losses(model_dir)
    evals = {r["step"]: r["eval/loss"] for r in metrics_lib.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
             if "eval/loss" in r}
    best = min(evals, key=evals.get)
    assert ckpt_lib.Checkpointer(model_dir, read_only=True).all_steps() == sorted({best, STEPS - 10, STEPS})
    np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)], rtol=2e-4)


def test_restore_params_alone(full_run):
    model_dir, _ = full_run
    from lime_jax.model import ModelConfig, abstract_model

    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, d_ff=64, metadata=(("pos", 53), ("ner", 40)))
    _, abstract = abstract_model(cfg)
    params, step = ckpt_lib.restore_params(model_dir, abstract)
    assert step == STEPS
    assert params["embed"]["token"].shape == (VOCAB, 32)


def test_nan_loss_stops_naming_step_and_keeps_good_checkpoint(caches, tmp_path):
    model_dir = str(tmp_path / "nan")
    # An f32-overflowing learning rate (finite in gin/Python) blows the parameters up.
    bindings = _bindings(model_dir, caches, **{
        "CHECKPOINT_EVERY": 1, "OptimizerConfig.learning_rate": 1e39,
        "OptimizerConfig.warmup_steps": 0, "OptimizerConfig.clip_norm": None})
    with pytest.raises(TrainingError, match=r"non-finite .* at step (\d+)") as err:
        train_lib.train(["runs/lime.gin"], bindings)
    bad_step = int(str(err.value).split("at step ")[1].split()[0])
    steps = ckpt_lib.Checkpointer(model_dir, read_only=True).all_steps()
    assert bad_step not in steps and all(s < bad_step for s in steps)
    assert f"last good checkpoint is step {max(steps) if steps else None}" in str(err.value)


def test_gin_typo_and_missing_macro_name_the_binding(caches, tmp_path):
    good = _bindings(str(tmp_path / "m"), caches)
    with pytest.raises(ValueError, match="bach_size"):
        gin_config.parse_gin(["runs/lime.gin"], good + ["DataConfig.bach_size = 4"])
    with pytest.raises(ValueError, match="ModelConfg"):
        gin_config.parse_gin(["runs/lime.gin"], good + ["ModelConfg.d_model = 4"])
    with pytest.raises(ConfigError, match="MODEL_DIR"):
        gin_config.parse_gin(["runs/lime.gin"], [b for b in good if not b.startswith("MODEL_DIR")])
    assert cli_train.main(["--gin_file", "runs/lime.gin", "--gin.TRAIN_STEPS=3"]) == 2
    assert not os.listdir(tmp_path)  # failed before any work


def test_binding_a_macro_nothing_reads_fails_naming_the_closest(caches, tmp_path):
    good = _bindings(str(tmp_path / "m"), caches)
    with pytest.raises(ConfigError, match=r"'TRAN_STEPS = 3' sets macro TRAN_STEPS, which no config "
                                          r"references, so it would do nothing; did you mean TRAIN_STEPS\?"):
        gin_config.parse_gin(["runs/quickstart.gin"], good + [gin_config.binding_from_flag("TRAN_STEPS", "3")])
    flags = [a for b in good for a in ("--gin_bindings", b)]
    assert cli_train.main(["--gin_file", "runs/quickstart.gin", *flags, "--gin.TRAN_STEPS=3"]) == 2
    assert not os.listdir(tmp_path)  # failed before any work


@gin.configurable
def _never_called(every: int = 1):
    return every


def test_binding_a_parameter_the_run_never_uses_fails_before_step_1(caches, tmp_path):
    model_dir = tmp_path / "m"
    with pytest.raises(ConfigError, match=r"'_never_called.every = 5' does nothing: this run never calls "
                                          r"_never_called; did you mean EvalConfig.every"):
        train_lib.train(["runs/lime.gin"], _bindings(str(model_dir), caches) + ["_never_called.every = 5"])
    # Called, but with that argument passed by the trainer: as useless.
    with pytest.raises(ConfigError, match="process_dataset is called with seed passed by the code"):
        train_lib.train(["runs/lime.gin"], _bindings(str(model_dir), caches) + ["process_dataset.seed = 5"])
    assert not model_dir.exists()  # nothing written, nothing trained
    gin_config.check_bindings_used(["DataConfig.read_threads = 1"])  # a used binding passes


def test_data_source_is_a_cache_or_a_seqio_task_not_both(caches, tmp_path):
    good = _bindings(str(tmp_path / "m"), caches)
    with pytest.raises(ConfigError, match="exactly one training data source.*both are set"):
        train_lib.train(["runs/lime.gin"], good + ["MIXTURE_OR_TASK_NAME = 'sotu_lime'"])
    with pytest.raises(ConfigError, match="exactly one training data source.*neither is set"):
        train_lib.train(["runs/lime.gin"], [b for b in good if not b.startswith("CACHE_DIR")])
    assert not os.listdir(tmp_path)


def test_flag_values_become_gin_literals():
    files, bindings = cli_train.parse_flags(
        ["--gin_file", "runs/lime.gin", "--gin.MODEL_DIR=/tmp/x", "--gin.TRAIN_STEPS=10",
         "--gin.TrainConfig.mesh_shape=(2,2,2)", "--gin_bindings", "SEED = 3"])
    assert files == ["runs/lime.gin"]
    assert bindings == ["SEED = 3", "MODEL_DIR = '/tmp/x'", "TRAIN_STEPS = 10", "TrainConfig.mesh_shape = (2,2,2)"]


def test_weight_decay_skips_norms_and_embeddings():
    from flax import nnx

    from lime_jax.model import ModelConfig, abstract_model

    cfg = ModelConfig(metadata=(("pos", 53),), metadata_weight="learned", tie_embeddings=False)
    _, abstract = abstract_model(cfg)
    mask = {"/".join(map(str, p)): bool(v.get_value()) for p, v in nnx.to_flat_state(optim.decay_mask(abstract))}
    assert not any(mask[k] for k in mask if k.startswith("embed/") or k.endswith("scale"))
    assert mask["head"] and mask["blocks/0/attn/wq"] and mask["blocks/1/mlp/w_down"]


def test_schedule_warmup_then_cosine():
    cfg = optim.OptimizerConfig(learning_rate=1.0, warmup_steps=10, end_lr_ratio=0.1)
    sched = optim.make_schedule(cfg, 100)
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
    assert float(sched(100)) == pytest.approx(0.1) and float(sched(5)) == pytest.approx(0.5)


def test_grad_accumulation_matches_full_batch(full_run, caches):
    import jax

    from lime_jax.data import loader
    from lime_jax.model import ModelConfig, abstract_model

    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, d_ff=64, dtype="float32",
                      metadata=(("pos", 53), ("ner", 40)))
    graphdef, abstract = abstract_model(cfg)
    params, _ = ckpt_lib.restore_params(full_run[0], abstract)  # trained weights: no init compile
    batch = next(iter(loader.build_dataset(caches[0], seq_len=32, batch_size=8, shard_index=0, shard_count=1)))
    out = []
    for accum in (1, 4):
        tx, sched = optim.make_optimizer(optim.OptimizerConfig(warmup_steps=0), 10)
        step = jax.jit(step_lib.make_train_step(graphdef, tx, sched, accum))
        state = TrainState(params=params, opt_state=tx.init(params), step=jax.numpy.zeros((), "int32"),
                           rng=jax.random.key_data(jax.random.key(0)))
        new_state, m = step(state, batch)
        assert int(new_state.step) == 1
        out.append((jax.device_get(m), jax.device_get(new_state.params)))
    (m1, p1), (m4, p4) = out
    assert m1["loss"] == pytest.approx(m4["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-4)
    # Adam's first step moves a weight by ~lr * g / (|g| + eps): where g is near eps, summation-order
    # noise in g shows in the step, so weights are compared within a few % of lr (3e-3).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), p1, p4)


def test_grad_accumulation_with_tag_heads_matches_full_batch(caches):
    """Each head's loss is a mean over its own targets: accumulation weights it by them, exactly."""
    import jax
    from flax import nnx

    from lime_jax.data import loader
    from lime_jax.model import Decoder, ModelConfig

    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, d_ff=64, dtype="float32", metadata=(("pos", 53),),
                      tag_heads=(("pos", 53, 1, 0.7), ("ner", 40, 2, 1.3)))
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    batch = next(iter(loader.build_dataset(caches[0], seq_len=32, batch_size=8, shard_index=0, shard_count=1,
                                           tags=("pos",), heads=[("pos", 1), ("ner", 2)])))
    out = []
    for accum in (1, 4):
        tx, sched = optim.make_optimizer(optim.OptimizerConfig(warmup_steps=0), 10)
        step = jax.jit(step_lib.make_train_step(graphdef, tx, sched, accum))
        state = TrainState(params=params, opt_state=tx.init(params), step=jax.numpy.zeros((), "int32"),
                           rng=jax.random.key_data(jax.random.key(0)))
        out.append(jax.device_get(step(state, batch)))
    (s1, m1), (s4, m4) = out
    for key in ("loss", "total_loss", "grad_norm", "pos_ahead1/loss", "ner_ahead2/accuracy"):
        assert m1[key] == pytest.approx(m4[key], rel=1e-4), key
    # As above: Adam normalises a near-zero gradient, so weights are compared within 3% of lr.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), s1.params, s4.params)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(caches, tmp_path):
    model_dir = str(tmp_path / "term")
    argv = ["--gin_file", "runs/lime.gin"] + [
        a for b in _bindings(model_dir, caches, **{"TRAIN_STEPS": 100000, "CHECKPOINT_EVERY": 100000,
                                                   "EVAL_EVERY": 100000})
        for a in ("--gin_bindings", b)]
    proc = subprocess.Popen([sys.executable, "-m", "lime_jax.cli.train", *argv], stderr=subprocess.PIPE, text=True)
    jsonl = os.path.join(model_dir, "metrics.jsonl")
    deadline = time.time() + 120
    while not (os.path.exists(jsonl) and len(open(jsonl).readlines()) >= 3):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    latest = ckpt_lib.Checkpointer(model_dir, read_only=True).latest_step()
    assert latest is not None and latest >= 3
    assert "SIGTERM" in err
    # The checkpoint is of the step it was at (CHECKPOINT_EVERY is far away), and resume
    # continues from there.
    assert latest == max(_train_losses(model_dir))
    resumed = train_lib.train(["runs/lime.gin"], _bindings(model_dir, caches, **{
        "TRAIN_STEPS": 100000, "CHECKPOINT_EVERY": 100000, "EVAL_EVERY": 100000}), stop_after_steps=2)
    assert resumed["start_step"] == latest and resumed["step"] == latest + 2


def test_resumed_metrics_drop_rows_of_lost_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 1.0 / s} for s in range(1, 9)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "train/lo')  # cut by a kill
    writer = metrics_lib.MetricsWriter(str(tmp_path), resume_step=5)
    writer.write(6, {"loss": 0.5}, prefix="train/")
    writer.close()
    got = metrics_lib.read_jsonl(str(path))
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6] and got[-1]["train/loss"] == 0.5
    assert got[:5] == rows[:5]


def test_metadata_dropout_masks_whole_positions_reproducibly():
    import jax

    shape = (64, 128)
    rng = np.random.default_rng(0)
    batch = {"decoder_input_tokens": rng.integers(2, 50, shape), "decoder_target_tokens": rng.integers(2, 50, shape),
             "decoder_input_pos": rng.integers(1, 53, shape), "decoder_input_ner": rng.integers(1, 40, shape)}
    key = jax.random.key_data(jax.random.key(0))
    assert step_lib.drop_metadata(batch, key, 3, 0.0) is batch
    out = {k: np.asarray(v) for k, v in step_lib.drop_metadata(batch, key, 3, 0.25).items()}
    dropped = out["decoder_input_pos"] == 0
    np.testing.assert_array_equal(dropped, out["decoder_input_ner"] == 0)  # a position loses all its tags
    assert 0.23 < dropped.mean() < 0.27
    np.testing.assert_array_equal(out["decoder_input_pos"][~dropped], batch["decoder_input_pos"][~dropped])
    for k in ("decoder_input_tokens", "decoder_target_tokens"):
        np.testing.assert_array_equal(out[k], batch[k])
    again = np.asarray(step_lib.drop_metadata(batch, key, 3, 0.25)["decoder_input_pos"])
    other_step = np.asarray(step_lib.drop_metadata(batch, key, 4, 0.25)["decoder_input_pos"])
    np.testing.assert_array_equal(again, out["decoder_input_pos"])  # resume: same step, same mask
    assert (other_step != again).any()


def test_metadata_dropout_step_trains_on_the_masked_batch(full_run, caches):
    import jax

    from lime_jax.data import loader
    from lime_jax.model import ModelConfig, abstract_model

    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, d_ff=64, dtype="float32",
                      metadata=(("pos", 53), ("ner", 40)))
    graphdef, abstract = abstract_model(cfg)
    params, _ = ckpt_lib.restore_params(full_run[0], abstract)
    batch = next(iter(loader.build_dataset(caches[0], seq_len=32, batch_size=8, shard_index=0, shard_count=1)))
    tx, sched = optim.make_optimizer(optim.OptimizerConfig(warmup_steps=0), 10)
    state = TrainState(params=params, opt_state=tx.init(params), step=jax.numpy.array(7, "int32"),
                       rng=jax.random.key_data(jax.random.key(0)))
    with_dropout = jax.jit(step_lib.make_train_step(graphdef, tx, sched, 1, metadata_dropout=0.5))
    plain = jax.jit(step_lib.make_train_step(graphdef, tx, sched, 1))
    masked = step_lib.drop_metadata(batch, state.rng, state.step, 0.5)
    _, m_drop = with_dropout(state, batch)
    _, m_masked = plain(state, masked)
    _, m_plain = plain(state, batch)
    assert float(m_drop["loss"]) == pytest.approx(float(m_masked["loss"]), rel=1e-6)
    assert float(m_drop["loss"]) != pytest.approx(float(m_plain["loss"]), rel=1e-4)


def test_tag_heads_train_log_and_evaluate(caches, tmp_path):
    """The aux arm (baseline inputs + next-token tag heads): head losses fall, accuracies are logged
    for training and held-out data, and the LM loss is the objective's other part."""
    model_dir = str(tmp_path / "aux")
    summary = train_lib.train(["runs/aux.gin"], _bindings(model_dir, caches))
    rows = metrics_lib.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
    train = [r for r in rows if "train/pos_ahead1/loss" in r]
    assert len(train) == STEPS
    for head in ("pos_ahead1", "ner_ahead1"):
        assert train[-1][f"train/{head}/loss"] < train[0][f"train/{head}/loss"]
        assert 0.0 <= train[-1][f"train/{head}/accuracy"] <= 1.0
    # The objective: LM cross entropy plus each head's weighted loss (lambda = 1 in aux.gin).
    last = train[-1]
    assert last["train/total_loss"] == pytest.approx(
        last["train/loss"] + last["train/pos_ahead1/loss"] + last["train/ner_ahead1/loss"], rel=1e-5)
    evals = [r for r in rows if "eval/pos_ahead1/accuracy" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert summary["eval_loss"] is not None


def test_a_head_that_would_see_its_target_is_a_config_error(caches, tmp_path):
    with pytest.raises(ConfigError, match="would see the tags they predict"):
        train_lib.train(["runs/lime_plus1.gin"], _bindings(
            str(tmp_path / "leaky"), caches, **{"ModelConfig.tag_heads": '(("pos", 53, 1, 1.0),)'}))
