"""INIT_FROM_HF: a new training run starts from a Hugging Face Gemma checkpoint.

    lime-jax annotate --input ... --spm HF_DIR/tokenizer.model --out CACHE   # the checkpoint's tokenizer
    lime-jax train --gin_file runs/lime.gin --gin.INIT_FROM_HF=HF_DIR --gin.CACHE_DIR=CACHE ...

The ModelConfig must describe the checkpoint (`check_config` lists every field that differs with
the binding that would match). The training loop calls `init_from_hf(cfg)` while it builds the
run, so a checkpoint that does not fit fails before anything compiles, and applies what it returns
to the fresh TrainState of a run without a checkpoint: parameters from the checkpoint with the
metadata tables zero (so at step 0 the LIME model computes the checkpoint's logits exactly), and
optimizer state built over them. A run that resumes keeps its own checkpoint.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import gin
import jax
import numpy as np

from lime_jax.hf import gemma
from lime_jax.trainer.config import ConfigError

log = logging.getLogger(__name__)


def load_params(hf_dir: str, cfg) -> dict[str, np.ndarray]:
    """The checkpoint's parameters as ours (flat, `gemma.flat_params` keys), checked against `cfg`."""
    gemma.check_config(gemma.read_config(hf_dir), cfg, os.path.join(hf_dir, "config.json"))
    tensors, source = gemma.read_tensors(hf_dir)
    return gemma.from_hf(cfg, tensors, source)


@gin.configurable
def init_from_hf(cfg, hf_dir: str | None = None) -> Callable | None:
    """None without a checkpoint (gin: `init_from_hf.hf_dir = %INIT_FROM_HF`), else
    `apply(state, tx) -> state` that puts its parameters into a fresh TrainState."""
    if hf_dir is None:
        return None
    try:
        gemma.check_config(gemma.read_config(hf_dir), cfg, os.path.join(hf_dir, "config.json"))
    except gemma.HFError as e:
        raise ConfigError(f"INIT_FROM_HF: {e}") from None
    return functools.partial(_apply, hf_dir, cfg)


def _apply(hf_dir: str, cfg, state, tx):
    try:
        flat = load_params(hf_dir, cfg)
    except gemma.HFError as e:
        raise ConfigError(f"INIT_FROM_HF: {e}") from None
    if cfg.scan_layers:
        flat = gemma.stack_layers(flat, cfg.n_layers)

    kept = []

    def put(path, fresh: jax.Array) -> jax.Array:
        key = "/".join(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))
        value = flat.get(key)
        if value is None:  # a module Gemma has no counterpart of (a tag-prediction head): new, like the tables
            kept.append(key)
            return fresh
        if value.shape != fresh.shape or value.dtype != fresh.dtype:
            raise ConfigError(f"INIT_FROM_HF: {hf_dir}: parameter {key} converts to {value.dtype}"
                              f"{list(value.shape)}, the model has {fresh.dtype}{list(fresh.shape)}")
        # Each process reads the whole checkpoint and places its own shards.
        return jax.make_array_from_callback(value.shape, fresh.sharding, lambda index: value[index])

    params = jax.tree_util.tree_map_with_path(put, state.params)
    log.info("INIT_FROM_HF: parameters from %s; metadata tables zero%s", hf_dir,
             f"; freshly initialised: {kept}" if kept else "")
    opt_state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda x: x.sharding, state.opt_state))(params)
    return state.replace(params=params, opt_state=opt_state)
