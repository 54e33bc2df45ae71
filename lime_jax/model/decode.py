"""Incremental decoding with a KV cache under `jax.jit`, built from the Decoder's submodules.

    inc = IncrementalDecoder(model)
    cache = inc.init_cache(batch_size=2, max_len=64)
    logits_BxTxV, cache = inc.extend(cache, prompt_BxT, metadata, valid_BxT)   # prefill
    logits_Bx1xV, cache = inc.extend(cache, next_Bx1, metadata_Bx1)            # one step
    logits, head_logits, cache = inc.extend(cache, next_Bx1, metadata_Bx1, heads=True)  # + tag heads

`extend` writes T new positions into the cache and returns their logits; it computes exactly
what `Decoder.__call__` computes for those positions given everything before them. Prompts of
different lengths are left-padded: `valid_BxT` is False on padding, which is never attended to
and does not advance a row's RoPE position, so each row sees positions 0, 1, ... as in training.

Sampling (`sample`): greedy (temperature 0), temperature, top-k and top-p (nucleus).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx


def init_cache(cfg, batch_size: int, max_len: int) -> dict[str, jax.Array]:
    """An empty cache for `max_len` positions (prompt, padding and new tokens together).

    k/v: [n_layers, B, S, K, H] in the compute dtype; `valid` [B, S] marks written non-padding
    slots; `index` is the next slot to write; `pos` [B] the next RoPE position per row.
    """
    shape = (cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)
    return {
        "k": jnp.zeros(shape, cfg.jnp_dtype),
        "v": jnp.zeros(shape, cfg.jnp_dtype),
        "valid": jnp.zeros((batch_size, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
        "pos": jnp.zeros((batch_size,), jnp.int32),
    }


def extend(model, cache: dict[str, jax.Array], tokens_BxT: jax.Array, metadata: Mapping[str, jax.Array],
           valid_BxT: jax.Array, heads: bool = False):
    """Runs T new positions through `model` (a Decoder) against the cache; returns (logits, cache),
    or (logits, tag-head logits {head id: [B, T, tags]}, cache) when `heads`."""
    dt = model.cfg.jnp_dtype
    B, T = tokens_BxT.shape
    S = cache["valid"].shape[1]
    start = cache["index"]
    valid_BxT = valid_BxT.astype(bool)
    steps_BxT = jnp.cumsum(valid_BxT.astype(jnp.int32), axis=1)
    positions_BxT = jnp.where(valid_BxT, cache["pos"][:, None] + steps_BxT - 1, 0)

    key_valid_BxS = jax.lax.dynamic_update_slice(cache["valid"], valid_BxT, (0, start))
    slot_T = start + jnp.arange(T)
    causal_TxS = jnp.arange(S)[None, :] <= slot_T[:, None]
    mask_Bx1x1xTxS = (key_valid_BxS[:, None, :] & causal_TxS[None])[:, None, None]

    x_BxTxD = model.embed(tokens_BxT, metadata)
    ks, vs = [], []
    for layer, block in enumerate(model.blocks):
        q, k, v = block.attn.project_qkv(block.attn_norm(x_BxTxD), positions_BxT)
        k_BxSxKxH = jax.lax.dynamic_update_slice(cache["k"][layer], k.astype(dt), (0, start, 0, 0))
        v_BxSxKxH = jax.lax.dynamic_update_slice(cache["v"][layer], v.astype(dt), (0, start, 0, 0))
        ks.append(k_BxSxKxH)
        vs.append(v_BxSxKxH)
        o_BxTxNxH = block.attn.attend(q, k_BxSxKxH, v_BxSxKxH, mask_Bx1x1xTxS)
        x_BxTxD = x_BxTxD + jnp.einsum("blnh,nhd->bld", o_BxTxNxH, block.attn.wo[...].astype(dt))
        x_BxTxD = x_BxTxD + block.mlp(block.mlp_norm(x_BxTxD))
    x_BxTxD = model.final_norm(x_BxTxD)
    logits_BxTxV = model.lm_logits(x_BxTxD).astype(jnp.float32)
    new_cache = {
        "k": jnp.stack(ks), "v": jnp.stack(vs), "valid": key_valid_BxS,
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
    """Jitted `extend` and `sample` over one model's parameters (split once)."""

    def __init__(self, model):
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self._extend = jax.jit(self._extend_fn, donate_argnums=(1,), static_argnames=("heads",))
        self._sample = jax.jit(sample, static_argnames=("temperature", "top_k", "top_p"))

    def _extend_fn(self, state, cache, tokens_BxT, metadata, valid_BxT, heads=False):
        return extend(nnx.merge(self.graphdef, state), cache, tokens_BxT, metadata, valid_BxT, heads)

    def init_cache(self, batch_size: int, max_len: int) -> dict[str, jax.Array]:
        return init_cache(self.cfg, batch_size, max_len)

    def extend(self, cache, tokens_BxT, metadata: Mapping[str, jax.Array] | None = None, valid_BxT=None,
               heads: bool = False):
        tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
        if tokens_BxT.ndim != 2 or tokens_BxT.shape[0] != cache["valid"].shape[0]:
            raise ValueError(f"tokens: expected [batch={cache['valid'].shape[0]}, T], got {tokens_BxT.shape}")
        if int(cache["index"]) + tokens_BxT.shape[1] > cache["valid"].shape[1]:
            raise ValueError(f"KV cache full: {int(cache['index'])} + {tokens_BxT.shape[1]} positions > "
                             f"max_len {cache['valid'].shape[1]}")
        valid_BxT = jnp.ones(tokens_BxT.shape, bool) if valid_BxT is None else jnp.asarray(valid_BxT, bool)
        metadata = {k: jnp.asarray(v, jnp.int32) for k, v in (metadata or {}).items()}
        return self._extend(self.state, cache, tokens_BxT, metadata, valid_BxT, heads=heads)

    @functools.wraps(sample)
    def sample(self, logits_BxV, key, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
        return self._sample(logits_BxV, key, temperature=float(temperature), top_k=int(top_k),
                            top_p=float(top_p))
