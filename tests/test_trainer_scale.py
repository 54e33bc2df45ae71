"""TrainConfig's accelerator-scale fields through the real trainer (tiny model, synthetic annotated
cache): profile_steps, compilation_cache_dir, and the mesh and batch checks."""
import glob
import os

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from lime_jax.data import cache
from lime_jax.ids import EOS_ID, EOS_TAG_ID, NUM_RESERVED_TAGS
from lime_jax.trainer import metrics as metrics_lib
from lime_jax.trainer import train as train_lib
from lime_jax.trainer.config import ConfigError

VOCAB = 64


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache"))
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(16):
        toks = rng.integers(2, VOCAB, int(rng.integers(8, 40)))
        toks[-1] = EOS_ID
        tags = np.stack([NUM_RESERVED_TAGS + toks % 50, NUM_RESERVED_TAGS + toks % 37])
        tags[:, -1] = EOS_TAG_ID
        docs.append(np.concatenate([toks[None], tags]).astype(np.int32))
    cache.write_cache(out, docs, {"targets": VOCAB, "targets_pos": 53, "targets_ner": 40})
    return out


def _train(model_dir, cache_dir, steps, *extra):
    return train_lib.train(["runs/lime.gin"], [
        f"MODEL_DIR = '{model_dir}'", f"TRAIN_STEPS = {steps}", f"CACHE_DIR = '{cache_dir}'",
        "SEQ_LEN = 16", "BATCH_SIZE = 8", "CHECKPOINT_EVERY = 100",
        f"ModelConfig.vocab_size = {VOCAB}", "ModelConfig.d_model = 16", "ModelConfig.d_ff = 32",
        "ModelConfig.n_layers = 1", "ModelConfig.n_heads = 2", "ModelConfig.n_kv_heads = 1",
        "ModelConfig.dtype = 'float32'", "TrainConfig.progress = False", "DataConfig.read_threads = 1",
        "CheckpointConfig.async_save = False", *extra])


@pytest.fixture
def restore_cache_config():
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {n: getattr(jax.config, n) for n in names}
    yield
    for n, v in before.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()


@pytest.mark.slow
def test_profile_trace_and_compilation_cache(tmp_path, cache_dir, restore_cache_config):
    # One run exercises both (each compile here costs seconds on 2 cores).
    cache_path = str(tmp_path / "xla_cache")
    binding = f"TrainConfig.compilation_cache_dir = '{cache_path}'"
    model_dir = str(tmp_path / "first")
    assert _train(model_dir, cache_dir, 3, binding, "TrainConfig.profile_steps = (2, 2)")["step"] == 3
    traces = glob.glob(os.path.join(model_dir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1  # one window, one trace
    with open(traces[0], "rb") as f:
        assert b"jit_step" in f.read()  # it holds the train step's execution
    # The trace was stopped (another can start), and training went on after it.
    jax.profiler.start_trace(str(tmp_path / "again"))
    jax.profiler.stop_trace()
    assert max(r["step"] for r in metrics_lib.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))) == 3

    entries = sorted(os.listdir(cache_path))
    # The train step compiles in well under JAX's default 1 s floor here: cached anyway.
    assert any(e.startswith("jit_step-") for e in entries), entries
    # A fresh run (in-memory executables dropped, as in a new process) loads the programs the
    # first run cached.
    jax.clear_caches()
    hits = []
    def listener(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(listener)
    try:
        _train(str(tmp_path / "second"), cache_dir, 3, binding)
    finally:
        jax.monitoring.unregister_event_listener(listener)
    assert len(hits) >= len(entries)
    # Programs this process compiled before the cache was on (other tests') may be added now;
    # the train step is not compiled again.
    added = set(os.listdir(cache_path)) - set(entries)
    assert not any(e.startswith("jit_step-") for e in added), added


def test_bad_profile_window_names_the_field(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=r"TrainConfig.profile_steps must be \(first, last\)"):
        _train(str(tmp_path / "bad"), cache_dir, 4, "TrainConfig.profile_steps = (3, 2)")


def test_meshes_and_batches_that_do_not_fit_are_refused_before_compiling(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=r"TrainConfig.mesh_shape=\(1, 2, 1\) covers 2 devices, there are 8"):
        _train(str(tmp_path / "a"), cache_dir, 1, "TrainConfig.mesh_shape = (1, 2, 1)")
    with pytest.raises(ConfigError, match=r"DataConfig.batch_size=12 does not split into 1 micro-batches .* "
                                          r"over the 8 batch shards of mesh \(1, 8, 1\)"):
        _train(str(tmp_path / "b"), cache_dir, 1, "BATCH_SIZE = 12", "TrainConfig.mesh_shape = (1, -1, 1)")
    # One process is one slice: no mesh axis can span two.
    with pytest.raises(ConfigError, match=r"TrainConfig.dcn_mesh_shape=\(2, 1, 1\) covers 2 slices"):
        _train(str(tmp_path / "c"), cache_dir, 1, "TrainConfig.dcn_mesh_shape = (2, 1, 1)")


def test_accelerator_settings_train_like_the_defaults(tmp_path, cache_dir):
    """Flash attention (Pallas, interpreted here), full remat, scanned layers, the chunked loss and
    bf16-free gathers change memory and speed, never the numbers: same losses step by step."""
    def losses(name, *extra):
        model_dir = str(tmp_path / name)
        _train(model_dir, cache_dir, 4, "TrainConfig.log_every = 1", *extra)
        return [r["train/loss"] for r in metrics_lib.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
                if "train/loss" in r]

    reference = losses("reference")
    scaled = losses("scaled", "ModelConfig.attention = 'pallas_gpu'", "ModelConfig.remat_policy = 'full'",
                    "ModelConfig.scan_layers = True", "ModelConfig.loss_chunk_size = 5",
                    "ModelConfig.gather_params_in_compute_dtype = True")
    assert len(reference) == 4
    np.testing.assert_allclose(scaled, reference, rtol=2e-5)


def test_attention_kernels_that_cannot_train_are_refused_first(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=r"ModelConfig.attention='cudnn'.*segment ids"):
        _train(str(tmp_path / "cudnn"), cache_dir, 1, "ModelConfig.attention = 'cudnn'")
    # A sequence length the kernel cannot tile is named before any data is read.
    with pytest.raises(ConfigError, match=r"ModelConfig.attention='splash' needs a sequence length that is a "
                                          r"multiple of 128.*L=16.*DataConfig.seq_len"):
        _train(str(tmp_path / "splash"), cache_dir, 1, "ModelConfig.attention = 'splash'")
