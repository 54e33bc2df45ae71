"""LimeEmbed: token table plus one small table per metadata type (LIME, arXiv 2512.07522).

    E(t_i) = E_tok(t_i) + sum_d w_d * E_d(a_{i,d})

With no metadata tables this is exactly a plain token embedding, so the baseline runs the same
code. Metadata is input-only: `attend` (the tied LM head) reads the token table alone.
Tag id 0 (PAD) adds nothing: training only puts it on padding, which no loss or real token
sees, and evaluation and generation use it for "no metadata here" (unguided LIME+1 steps).

Out-of-range ids are never clipped. Three layers of defence, cheapest first:
  1. arrays that are concrete (eager calls) are range-checked on the host: ValueError naming
     the feature;
  2. under `jax.jit` the gather uses mode="fill" with NaN, so a bad id poisons the loss
     (a NaN the training loop reports) instead of silently reading another row;
  3. `checked(fn)` wraps any function that calls the model with `jax.experimental.checkify`,
     turning the same range checks into a runtime error under jit, at the price of one
     reduction per table and an error value to inspect (`err.throw()`). We chose checkify over
     a host callback because it stays inside XLA and costs nothing when not requested.
"""
from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import checkify

from lime_jax.ids import PAD_ID
from lime_jax.model.config import ModelConfig
from lime_jax.model.sharding import Rules, constrain, init_param, resolve_rules

_JIT_CHECKS = contextvars.ContextVar("lime_jax_jit_checks", default=False)


def checked(fn: Callable) -> Callable:
    """Returns `fn'(*args) -> (checkify.Error, fn(*args))` with id range checks active under jit.

    Usage: `err, out = jax.jit(checked(step))(state, batch); err.throw()`.
    """

    def with_checks(*args, **kwargs):
        token = _JIT_CHECKS.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _JIT_CHECKS.reset(token)

    return functools.wraps(fn)(checkify.checkify(with_checks, errors=checkify.user_checks))


def check_ids(feature: str, ids: jax.Array, size: int, shape: tuple[int, ...] | None = None) -> None:
    """Validates dtype, shape and range of an id array; see the module docstring."""
    if not hasattr(ids, "dtype") or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(
            f"{feature}: expected an integer array, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if shape is not None and tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{feature}: expected shape {tuple(shape)} (like the tokens), got {tuple(ids.shape)}")
    if shape is None and ids.ndim != 2:
        raise ValueError(f"{feature}: expected shape [batch, length], got {tuple(ids.shape)}")
    if isinstance(ids, jax.core.Tracer):
        if _JIT_CHECKS.get():
            checkify.check(
                jnp.all((ids >= 0) & (ids < size)),
                f"{feature}: ids outside [0, {size}) (min {{lo}}, max {{hi}})",
                lo=jnp.min(ids), hi=jnp.max(ids))
        return
    if not getattr(ids, "is_fully_addressable", True):
        return  # a multi-host global array: only jit (NaN fill or `checked`) can see it all
    host = np.asarray(ids)
    bad = (host < 0) | (host >= size)
    if bad.any():
        raise ValueError(
            f"{feature}: {int(bad.sum())} id(s) outside [0, {size}) (min {host.min()}, max "
            f"{host.max()}); the table has {size} rows")


def _lookup(table_VxD: jax.Array, ids_BxL: jax.Array) -> jax.Array:
    # mode="fill": an out-of-range id reads NaN rather than a clipped, valid-looking row.
    return jnp.take(table_VxD, ids_BxL, axis=0, mode="fill", fill_value=jnp.nan)


class LimeEmbed(nnx.Module):
    """Token embedding plus weighted metadata embeddings; see the module docstring."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules: Rules | None = None):
        self.cfg = cfg
        self.rules = resolve_rules(rules)
        # std 1/sqrt(d): rows have norm ~1, and the sqrt(d) input scale in __call__ gives unit
        # rms activations; the tied head then starts with unit-scale logits.
        std, pdt = 1.0 / math.sqrt(cfg.d_model), cfg.param_dtype
        self.token = init_param(rngs.params(), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt, std=std)
        # Metadata tables use the token table's initializer (DESIGN.md) and are replicated.
        self.tables = nnx.Dict({
            name: init_param(rngs.params(), (size, cfg.d_model), ("tags", None), pdt, std=std)
            for name, size in cfg.metadata})
        if cfg.metadata_weight == "learned":
            self.weights = nnx.Dict({
                name: init_param(None, (), (), pdt, fill=cfg.metadata_weight_init)
                for name in cfg.metadata_names})
        else:
            self.weights = None

    def __call__(self, ids_BxL: jax.Array, metadata: Mapping[str, jax.Array] | None = None) -> jax.Array:
        cfg = self.cfg
        check_ids("tokens", ids_BxL, cfg.vocab_size)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping name -> [B, L] tag ids, got {type(metadata).__name__}")
        missing = [n for n in cfg.metadata_names if n not in metadata]
        unexpected = [n for n in metadata if n not in cfg.metadata_names]
        if missing:
            raise ValueError(
                f"metadata feature(s) {missing} missing: the model config has tables "
                f"{list(cfg.metadata_names)} (batch features decoder_input_<name>)")
        if unexpected:
            raise ValueError(
                f"unexpected metadata feature(s) {unexpected}: the model config has tables "
                f"{list(cfg.metadata_names)}; a baseline model has none")

        # FSDP-style: gather the table's fsdp-sharded feature dim before the lookup, so the
        # partitioner sees a vocab-sharded gather (else it fully rematerialises the output).
        token_VxD = constrain(self.token[...], ("vocab", None), self.rules)
        x_BxLxD = _lookup(token_VxD, ids_BxL)
        for name, size in cfg.metadata:
            tags_BxL = metadata[name]
            check_ids(f"metadata {name!r}", tags_BxL, size, shape=ids_BxL.shape)
            table_TxD = self.tables[name][...].at[PAD_ID].set(0)
            e_BxLxD = _lookup(table_TxD, tags_BxL)
            if self.weights is not None:
                e_BxLxD = e_BxLxD * self.weights[name][...]
            elif cfg.metadata_weight_init != 1.0:
                e_BxLxD = e_BxLxD * cfg.metadata_weight_init
            x_BxLxD = x_BxLxD + e_BxLxD
        return (x_BxLxD * math.sqrt(cfg.d_model)).astype(cfg.jnp_dtype)

    def attend(self, x_BxLxD: jax.Array) -> jax.Array:
        """Tied LM head: f32 logits from the token table only (never the metadata tables)."""
        table_VxD = self.token[...].astype(self.cfg.jnp_dtype)
        return jnp.einsum("bld,vd->blv", x_BxLxD, table_VxD, preferred_element_type=jnp.float32)

    def param_counts(self) -> tuple[int, int]:
        """(metadata params, all embedding params); works on abstract modules too."""
        meta = sum(math.prod(p.shape) for _, p in nnx.iter_graph(self.tables) if isinstance(p, nnx.Param))
        if self.weights is not None:
            meta += len(self.cfg.metadata)
        return meta, meta + math.prod(self.token.shape)

    def param_overhead(self, total_params: int | None = None) -> float:
        """Metadata params / total params (of the embedding alone unless `total_params` given)."""
        meta, own = self.param_counts()
        return meta / (own if total_params is None else total_params)
