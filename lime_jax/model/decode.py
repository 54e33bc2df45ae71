"""Incremental decoding with a KV cache under `jax.jit`, through the Decoder's own layer code.

    inc = IncrementalDecoder(model)
    cache = inc.init_cache(batch_size=2, max_len=64)
    logits_BxTxV, cache = inc.extend(cache, prompt_BxT, metadata, valid_BxT)   # prefill
    logits_Bx1xV, cache = inc.extend(cache, next_Bx1, metadata_Bx1)            # one step
    logits, head_logits, cache = inc.extend(cache, next_Bx1, metadata_Bx1, heads=True)  # + tag heads

`extend` writes T new positions into the cache and returns their logits; it computes exactly
what `Decoder.__call__` computes for those positions given everything before them. Prompts of
different lengths are left-padded: `valid_BxT` is False on padding, which is never attended to
and does not advance a row's RoPE position, so each row sees positions 0, 1, ... as in training.
The layers are `decoder.apply_blocks` with a `decoder.KVCache`: each layer writes its k/v into
the donated [n_layers, B, S, K, H] cache in place (stacked `scan_layers` params too). After
`init_cache`, `extend` moves nothing between host and device: the cache keeps its fill level
on the host too, and tokens, metadata and `valid` may be device arrays.

Sampling (`sample`): greedy (temperature 0), temperature, top-k and top-p (nucleus).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from lime_jax.model import decoder, sharding

_HOST_INDEX = "host_index"  # the cache's fill level as a Python int (never passed to jit)
# Logical axes of the cache arrays. Layers and slots stay whole: each step writes and reads them
# at a dynamic index.
CACHE_AXES = {"k": (None, "batch", None, "heads", "kv"), "v": (None, "batch", None, "heads", "kv"),
              "valid": ("batch", None), "index": (), "pos": ("batch",)}


def _cache_arrays(cfg, batch_size: int, max_len: int) -> dict[str, tuple]:
    """name -> (shape, dtype) of each cache array."""
    kv = ((cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.resolved_head_dim), cfg.jnp_dtype)
    return {"k": kv, "v": kv, "valid": ((batch_size, max_len), jnp.bool_), "index": ((), jnp.int32),
            "pos": ((batch_size,), jnp.int32)}


def cache_shardings(cfg, batch_size: int, max_len: int, mesh: jax.sharding.Mesh,
                    rules: sharding.Rules | None = None) -> dict[str, NamedSharding]:
    """Where each cache array lives on `mesh`: by `rules` (`CACHE_AXES`; k/v heads are the KV
    heads), each dim whose mesh axes do not divide it (a batch too small to split, KV heads
    fewer than the tensor devices) left whole on that dim."""
    rules = sharding.resolve_rules(rules)
    out = {}
    for name, (shape, _) in _cache_arrays(cfg, batch_size, max_len).items():
        axes = tuple(a if a is None or shape[i] % sharding.axis_size(mesh, rules, a) == 0 else None
                     for i, a in enumerate(CACHE_AXES[name]))
        out[name] = NamedSharding(mesh, sharding.logical_to_pspec(axes, rules, shape, mesh))
    return out


def init_cache(cfg, batch_size: int, max_len: int, *, mesh: jax.sharding.Mesh | None = None,
               rules: sharding.Rules | None = None) -> dict:
    """An empty cache for `max_len` positions (prompt, padding and new tokens together).

    k/v: [n_layers, B, S, K, H] in the compute dtype; `valid` [B, S] marks written non-padding
    slots; `index` is the next slot to write (on device; `host_index` on the host); `pos` [B]
    the next RoPE position per row. With `mesh`, each array is created in its shards there
    (`cache_shardings` by `rules`); else on the default device.
    """
    where = (dict.fromkeys(CACHE_AXES) if mesh is None
             else cache_shardings(cfg, batch_size, max_len, mesh, rules))
    arrays = _cache_arrays(cfg, batch_size, max_len)
    return {**{name: jnp.zeros(shape, dtype, device=where[name]) for name, (shape, dtype) in arrays.items()},
            _HOST_INDEX: 0}


def extend(model, cache: dict[str, jax.Array], tokens_BxT: jax.Array, metadata: Mapping[str, jax.Array],
           valid_BxT: jax.Array | None, heads: bool = False):
    """Runs T new positions through `model` (a Decoder) against the cache (its device arrays);
    returns (logits, cache), or (logits, tag-head logits {head id: [B, T, tags]}, cache) when
    `heads`. `valid_BxT` None: every new position is a token."""
    B, T = tokens_BxT.shape
    S = cache["valid"].shape[1]
    start = cache["index"]
    valid_BxT = jnp.ones((B, T), bool) if valid_BxT is None else valid_BxT.astype(bool)
    steps_BxT = jnp.cumsum(valid_BxT.astype(jnp.int32), axis=1)
    positions_BxT = jnp.where(valid_BxT, cache["pos"][:, None] + steps_BxT - 1, 0)

    key_valid_BxS = jax.lax.dynamic_update_slice(cache["valid"], valid_BxT, (0, start))
    slot_T = start + jnp.arange(T)
    causal_TxS = jnp.arange(S)[None, :] <= slot_T[:, None]
    mask_Bx1x1xTxS = (key_valid_BxS[:, None, :] & causal_TxS[None])[:, None, None]

    x_BxTxD = model.embed(tokens_BxT, metadata)
    kv = decoder.KVCache(cache["k"], cache["v"], mask_Bx1x1xTxS, start)
    x_BxTxD, kv = decoder.apply_blocks(model.blocks, model.cfg, model.rules, x_BxTxD, positions_BxT, cache=kv)
    x_BxTxD = model.final_norm(x_BxTxD)
    logits_BxTxV = model.lm_logits(x_BxTxD).astype(jnp.float32)
    new_cache = {
        "k": kv.k_YxBxSxKxH, "v": kv.v_YxBxSxKxH, "valid": key_valid_BxS,
        "index": start + T, "pos": cache["pos"] + steps_BxT[:, -1],
    }
    if heads:
        return logits_BxTxV, model.head_logits(x_BxTxD), new_cache
    return logits_BxTxV, new_cache


def sample(logits_BxV: jax.Array, key: jax.Array, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """Next ids [B]: argmax when temperature <= 0, else a draw from the filtered softmax.

    top_k > 0 keeps the k largest logits; top_p < 1 keeps the smallest set of largest-probability
    tokens whose mass reaches top_p (the most likely token always stays).
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    if temperature <= 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth_Bx1 = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, neg, logits_BxV)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        # The cutoff is the smallest kept logit: a token is kept if the mass before it < top_p.
        cutoff_Bx1 = jnp.min(jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, neg, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


class IncrementalDecoder:
    """Jitted `extend` and `sample` over one model's parameters (split once).

    With `mesh` (the one the parameters live on), the KV cache is made in its shards there
    (`cache_shardings` by the model's rules) and every `extend` returns it sharded alike: XLA
    writes a donated cache in place only into an output sharded as the input.
    """

    def __init__(self, model, mesh: jax.sharding.Mesh | None = None):
        self.cfg, self.mesh, self.rules = model.cfg, mesh, model.rules
        self.graphdef, self.state = nnx.split(model)
        self._extend = jax.jit(self._extend_fn, donate_argnums=(1,), static_argnames=("heads",))
        self._sample = jax.jit(sample, static_argnames=("temperature", "top_k", "top_p"))

    def _extend_fn(self, state, cache, tokens_BxT, metadata, valid_BxT, heads=False):
        *out, new_cache = extend(nnx.merge(self.graphdef, state), cache, tokens_BxT, metadata, valid_BxT, heads)
        if self.mesh is not None:
            shardings = cache_shardings(self.cfg, *cache["valid"].shape, self.mesh, self.rules)
            new_cache = jax.lax.with_sharding_constraint(new_cache, shardings)
        return (*out, new_cache)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        return init_cache(self.cfg, batch_size, max_len, mesh=self.mesh, rules=self.rules)

    def extend(self, cache, tokens_BxT, metadata: Mapping[str, jax.Array] | None = None, valid_BxT=None,
               heads: bool = False):
        """`extend` above, jitted with the cache donated; device arrays in, device arrays out."""
        tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
        if tokens_BxT.ndim != 2 or tokens_BxT.shape[0] != cache["valid"].shape[0]:
            raise ValueError(f"tokens: expected [batch={cache['valid'].shape[0]}, T], got {tokens_BxT.shape}")
        used, T = cache[_HOST_INDEX], tokens_BxT.shape[1]
        if used + T > cache["valid"].shape[1]:
            raise ValueError(f"KV cache full: {used} + {T} positions > max_len {cache['valid'].shape[1]}")
        valid_BxT = None if valid_BxT is None else jnp.asarray(valid_BxT, bool)
        metadata = {k: jnp.asarray(v, jnp.int32) for k, v in (metadata or {}).items()}
        on_device = {k: v for k, v in cache.items() if k != _HOST_INDEX}
        *out, new_cache = self._extend(self.state, on_device, tokens_BxT, metadata, valid_BxT, heads=heads)
        return (*out, {**new_cache, _HOST_INDEX: used + T})

    @functools.wraps(sample)
    def sample(self, logits_BxV, key, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
        return self._sample(logits_BxV, key, temperature=float(temperature), top_k=int(top_k),
                            top_p=float(top_p))
