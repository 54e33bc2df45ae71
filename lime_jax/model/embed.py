"""LimeEmbed: token table plus one small table per metadata type (LIME, arXiv 2512.07522).

    E(t_i) = E_tok(t_i) + sum_d w_d * E_d(a_{i,d})

With no metadata tables this is exactly a plain token embedding, so the baseline runs the same
code. Metadata is input-only: `attend` (the tied LM head) reads the token table alone.
Tag id 0 (PAD) adds nothing: training only puts it on padding, which no loss or real token
sees, and evaluation and generation use it for "no metadata here" (unguided LIME+1 steps).

Out-of-range ids (negative ones included) are never clipped or wrapped. Three layers of
defence, cheapest first:
  1. arrays that are concrete (eager calls) are range-checked on the host: ValueError naming
     the feature;
  2. under `jax.jit` the gather fills NaN for any id outside [0, size), so a bad id poisons
     the loss (a NaN the training loop reports) instead of silently reading another row;
  3. `ModelConfig.check_ids` (debugging runs) adds the same range check to traced code as a
     host callback (`jax.debug.callback`): the jitted call raises an error naming the feature.
     It costs three reductions and a host round trip per id array per call, so it is off
     by default. A callback rather than checkify because it needs nothing from the caller: the
     trainer's step, evaluation and decoding get it from the config alone.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lime_jax.ids import PAD_ID
from lime_jax.model.config import ModelConfig
from lime_jax.model.sharding import Rules, constrain, init_param, resolve_rules


def _raise_if_out_of_range(feature: str, size: int, num_bad, lo, hi) -> None:
    if int(num_bad):
        raise ValueError(f"{feature}: {int(num_bad)} id(s) outside [0, {size}) (min {int(lo)}, max "
                         f"{int(hi)}); the table has {size} rows")


def check_ids(feature: str, ids: jax.Array, size: int, shape: tuple[int, ...] | None = None, *,
              traced: bool = False) -> None:
    """Validates dtype, shape and range of an id array; see the module docstring.

    Concrete arrays are range-checked on the host; traced ones only when `traced`
    (`ModelConfig.check_ids`), by a host callback that raises when the jitted call runs.
    """
    if not hasattr(ids, "dtype") or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(
            f"{feature}: expected an integer array, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if shape is not None and tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{feature}: expected shape {tuple(shape)} (like the tokens), got {tuple(ids.shape)}")
    if shape is None and ids.ndim != 2:
        raise ValueError(f"{feature}: expected shape [batch, length], got {tuple(ids.shape)}")
    if isinstance(ids, jax.core.Tracer):
        if traced and ids.size:
            num_bad = jnp.sum((ids < 0) | (ids >= size))
            jax.debug.callback(functools.partial(_raise_if_out_of_range, feature, size),
                               num_bad, jnp.min(ids), jnp.max(ids))
        return
    if not getattr(ids, "is_fully_addressable", True):
        return  # a multi-host global array: only jit (NaN fill or `check_ids`) can see it all
    host = np.asarray(ids)
    if host.size:
        _raise_if_out_of_range(feature, size, np.sum((host < 0) | (host >= size)), host.min(), host.max())


def _lookup(table_VxD: jax.Array, ids_BxL: jax.Array) -> jax.Array:
    # An id outside [0, V) reads NaN rather than a clipped, valid-looking row; numpy-style
    # wrapping would make -1 read row V-1, so it is turned off.
    return table_VxD.at[ids_BxL].get(mode="fill", fill_value=jnp.nan, wrap_negative_indices=False)


# Folded into the token table's key to start the metadata tables' stream (any fixed constant).
_METADATA_STREAM = 0x11E7A


def metadata_key(token_key: jax.Array, table_index: int) -> jax.Array:
    """The init key of metadata table `table_index`: independent of every key drawn from `rngs`."""
    return jax.random.fold_in(jax.random.fold_in(token_key, _METADATA_STREAM), table_index)


class LimeEmbed(nnx.Module):
    """Token embedding plus weighted metadata embeddings; see the module docstring."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules: Rules | None = None):
        self.cfg = cfg
        self.rules = resolve_rules(rules)
        # std 1/sqrt(d): rows have norm ~1, and the sqrt(d) input scale in __call__ gives unit
        # rms activations; the tied head then starts with unit-scale logits.
        std, pdt = 1.0 / math.sqrt(cfg.d_model), cfg.param_dtype
        token_key = rngs.params()
        self.token = init_param(token_key, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt, std=std)
        # Metadata tables use the token table's initializer (docs/design.md section 1) and are
        # replicated. Their keys come from a stream of their own (folded from the token table's
        # key) and take nothing from `rngs`: a LIME model and the baseline with the same seed start
        # from identical other weights, so a comparison is paired.
        self.tables = nnx.Dict({
            name: init_param(metadata_key(token_key, k), (size, cfg.d_model), ("tags", None), pdt, std=std)
            for k, (name, size) in enumerate(cfg.metadata)})
        if cfg.metadata_weight == "learned":
            self.weights = nnx.Dict({
                name: init_param(None, (), (), pdt, fill=cfg.metadata_weight_init)
                for name in cfg.metadata_names})
        else:
            self.weights = None

    def __call__(self, ids_BxL: jax.Array, metadata: Mapping[str, jax.Array] | None = None) -> jax.Array:
        cfg = self.cfg
        check_ids("tokens", ids_BxL, cfg.vocab_size, traced=cfg.check_ids)
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
            check_ids(f"metadata {name!r}", tags_BxL, size, shape=ids_BxL.shape, traced=cfg.check_ids)
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
