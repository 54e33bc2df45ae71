"""Gemma/Llama-style decoder: RMSNorm, RoPE, gated MLP, grouped-query causal attention.

Packed batches: `segment_ids` (1.. per document, 0 = padding) keep documents from attending to
each other, and `positions` restart at 0 per document (RoPE reads them, never the array index).
Params are stored in `param_dtype` (f32) and cast to the compute `dtype` (bf16) at use;
attention softmax and logits are f32.

Attention keeps projection (`project_qkv`) and the attention math (`attend`) in separate
methods so an incremental decode step can project one new token, append k/v to a cache and
call `attend` against the cache.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from lime_jax.model import sharding
from lime_jax.model.config import ModelConfig
from lime_jax.model.embed import LimeEmbed
from lime_jax.model.heads import TagHeads


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, axes: tuple, cfg: ModelConfig) -> nnx.Param:
    return sharding.init_param(rngs.params(), shape, axes, cfg.param_dtype, std=1.0 / math.sqrt(fan_in))


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.scale = sharding.init_param(None, (cfg.d_model,), ("embed",), cfg.param_dtype, fill=1.0)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(self.cfg.jnp_dtype)


def rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (rotate-half form), computed in f32."""
    half = x_BxLxNxH.shape[-1] // 2
    freq_H2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxLx1xH2 = (positions_BxL.astype(jnp.float32)[:, :, None] * freq_H2)[:, :, None, :]
    sin, cos = jnp.sin(angle_BxLx1xH2), jnp.cos(angle_BxLx1xH2)
    x = x_BxLxNxH.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxNxH.dtype)


def attention_mask(segment_ids_BxL: jax.Array) -> jax.Array:
    """[B, 1, 1, L, S] bool: causal and within one segment (padding only sees padding)."""
    L = segment_ids_BxL.shape[1]
    causal_LxS = jnp.arange(L)[:, None] >= jnp.arange(L)[None, :]
    same_BxLxS = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return (causal_LxS[None] & same_BxLxS)[:, None, None]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rules: sharding.Rules, *, rngs: nnx.Rngs):
        self.cfg, self.rules = cfg, rules
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        self.wq = _param(rngs, (D, N, H), D, ("embed", "heads", "kv"), cfg)
        self.wk = _param(rngs, (D, K, H), D, ("embed", "heads", "kv"), cfg)
        self.wv = _param(rngs, (D, K, H), D, ("embed", "heads", "kv"), cfg)
        self.wo = _param(rngs, (N, H, D), N * H, ("heads", "kv", "embed"), cfg)

    def project_qkv(self, x_BxLxD: jax.Array, positions_BxL: jax.Array):
        """q [B,L,N,H] (pre-scaled by 1/sqrt(H)), k and v [B,L,K,H]; RoPE applied to q and k."""
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        q = jnp.einsum("bld,dnh->blnh", x_BxLxD, self.wq[...].astype(dt))
        k = jnp.einsum("bld,dkh->blkh", x_BxLxD, self.wk[...].astype(dt))
        v = jnp.einsum("bld,dkh->blkh", x_BxLxD, self.wv[...].astype(dt))
        q_BxLxNxH = rope(q, positions_BxL, cfg.rope_theta) * (cfg.resolved_head_dim ** -0.5)
        k_BxLxKxH = rope(k, positions_BxL, cfg.rope_theta)
        axes = ("batch", "length", "heads", "kv")
        return (sharding.constrain(q_BxLxNxH, axes, self.rules), sharding.constrain(k_BxLxKxH, axes, self.rules),
                sharding.constrain(v, axes, self.rules))

    def attend(self, q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1x1xLxS) -> jax.Array:
        """Grouped-query attention with an f32 softmax; returns [B, L, N, H]."""
        B, L, N, H = q_BxLxNxH.shape
        K = k_BxSxKxH.shape[2]
        q_BxLxKxGxH = q_BxLxNxH.reshape(B, L, K, N // K, H)
        s_BxKxGxLxS = jnp.einsum("blkgh,bskh->bkgls", q_BxLxKxGxH, k_BxSxKxH,
                                 preferred_element_type=jnp.float32)
        s_BxKxGxLxS = jnp.where(mask_Bx1x1xLxS, s_BxKxGxLxS, jnp.finfo(jnp.float32).min)
        p_BxKxGxLxS = jax.nn.softmax(s_BxKxGxLxS, axis=-1).astype(v_BxSxKxH.dtype)
        o_BxLxKxGxH = jnp.einsum("bkgls,bskh->blkgh", p_BxKxGxLxS, v_BxSxKxH)
        return o_BxLxKxGxH.reshape(B, L, N, H)

    def __call__(self, x_BxLxD, positions_BxL, mask_Bx1x1xLxS) -> jax.Array:
        q, k, v = self.project_qkv(x_BxLxD, positions_BxL)
        o_BxLxNxH = self.attend(q, k, v, mask_Bx1x1xLxS)
        return jnp.einsum("blnh,nhd->bld", o_BxLxNxH, self.wo[...].astype(self.cfg.jnp_dtype))


class GatedMLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rules: sharding.Rules, *, rngs: nnx.Rngs):
        self.cfg, self.rules = cfg, rules
        D, F = cfg.d_model, cfg.d_ff
        self.w_gate = _param(rngs, (D, F), D, ("embed", "mlp"), cfg)
        self.w_up = _param(rngs, (D, F), D, ("embed", "mlp"), cfg)
        self.w_down = _param(rngs, (F, D), F, ("mlp", "embed"), cfg)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        dt = self.cfg.jnp_dtype
        act = jax.nn.gelu if self.cfg.mlp_activation == "gelu" else jax.nn.silu
        gate_BxLxF = act(x_BxLxD @ self.w_gate[...].astype(dt))
        h_BxLxF = sharding.constrain(gate_BxLxF * (x_BxLxD @ self.w_up[...].astype(dt)),
                                     ("batch", "length", "mlp"), self.rules)
        return h_BxLxF @ self.w_down[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rules: sharding.Rules, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg)
        self.attn = Attention(cfg, rules, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg)
        self.mlp = GatedMLP(cfg, rules, rngs=rngs)

    def __call__(self, x_BxLxD, positions_BxL, mask_Bx1x1xLxS) -> jax.Array:
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), positions_BxL, mask_Bx1x1xLxS)
        return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))


class Decoder(nnx.Module):
    """`model(tokens_BxL, metadata={...}, segment_ids=..., positions=...)` -> f32 logits [B, L, V].

    `rules` (logical -> mesh axes) drive the activation constraints; None takes the gin-bound
    `sharding.sharding_rules()`. Constraints apply only under a mesh (`jax.set_mesh`).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules: sharding.Rules | None = None):
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"Decoder needs a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.rules = sharding.resolve_rules(rules)
        # Read, not drawn: heads fold their keys from the stream's base key, so the other
        # weights are the same with and without heads.
        base_key = rngs.params.key[...]
        self.embed = LimeEmbed(cfg, rngs=rngs, rules=self.rules)
        self.blocks = nnx.List([Block(cfg, self.rules, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg)
        self.head = None if cfg.tie_embeddings else _param(
            rngs, (cfg.d_model, cfg.vocab_size), cfg.d_model, ("embed", "vocab"), cfg)
        self.tag_heads = TagHeads(cfg, base_key) if cfg.tag_heads else None

    def __call__(
        self,
        tokens_BxL: jax.Array,
        metadata: Mapping[str, jax.Array] | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        return self.lm_logits(self.trunk(tokens_BxL, metadata, segment_ids, positions))

    def forward(self, tokens_BxL, metadata=None, segment_ids=None, positions=None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(LM logits [B, L, V], tag-head logits {head id: [B, L, T]}), from one trunk pass."""
        x_BxLxD = self.trunk(tokens_BxL, metadata, segment_ids, positions)
        return self.lm_logits(x_BxLxD), self.head_logits(x_BxLxD)

    def head_logits(self, x_BxLxD: jax.Array) -> dict[str, jax.Array]:
        return {} if self.tag_heads is None else self.tag_heads(x_BxLxD)

    def trunk(
        self,
        tokens_BxL: jax.Array,
        metadata: Mapping[str, jax.Array] | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """The final-normed hidden state [B, L, D] that the LM head and the tag heads read."""
        cfg, rules = self.cfg, self.rules
        # The embedding validates tokens and metadata (dtype, shape, range) first.
        x_BxLxD = sharding.constrain(self.embed(tokens_BxL, metadata), ("batch", "length", None), rules)
        if segment_ids is None:
            if positions is not None:
                raise ValueError("positions given without segment_ids; pass both for packed batches")
            segment_ids = jnp.ones(tokens_BxL.shape, jnp.int32)
            positions = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1], dtype=jnp.int32), tokens_BxL.shape)
        elif positions is None:
            raise ValueError("segment_ids given without positions: packed documents need positions "
                             "restarting at 0 per document (decoder_positions)")
        for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
            if not hasattr(arr, "dtype") or not jnp.issubdtype(arr.dtype, jnp.integer):
                raise TypeError(f"{name}: expected an integer array, got {getattr(arr, 'dtype', type(arr).__name__)}")
            if tuple(arr.shape) != tuple(tokens_BxL.shape):
                raise ValueError(f"{name}: expected shape {tuple(tokens_BxL.shape)} (like the tokens), "
                                 f"got {tuple(arr.shape)}")

        mask_Bx1x1xLxS = attention_mask(segment_ids)
        for block in self.blocks:
            x_BxLxD = sharding.constrain(block(x_BxLxD, positions, mask_Bx1x1xLxS), ("batch", "length", None), rules)
        return self.final_norm(x_BxLxD)

    def lm_logits(self, x_BxLxD: jax.Array) -> jax.Array:
        if self.head is None:
            logits_BxLxV = self.embed.attend(x_BxLxD)
        else:
            logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, self.head[...].astype(self.cfg.jnp_dtype),
                                      preferred_element_type=jnp.float32)
        return sharding.constrain(logits_BxLxV, ("batch", "length", "vocab"), self.rules)

    def param_count(self) -> int:
        """All parameters; works on abstract models (`sharding.abstract_model`) too."""
        return _count_params(self)

    def param_overhead(self) -> float:
        """Metadata params (tables and tag heads) / all params (0.0 for the baseline)."""
        meta, _ = self.embed.param_counts()
        if self.tag_heads is not None:
            meta += _count_params(self.tag_heads)
        return meta / self.param_count()


def _count_params(module: nnx.Module) -> int:
    return sum(math.prod(p.shape) for _, p in nnx.iter_graph(module) if isinstance(p, nnx.Param))


def create_sharded_model(
    cfg, mesh: jax.sharding.Mesh, rules: sharding.Rules | None = None, seed: int = 0
) -> tuple[nnx.GraphDef, nnx.State]:
    """`Decoder(cfg)` with parameters created sharded on `mesh`; merge with `nnx.merge`."""
    rules = sharding.resolve_rules(rules)
    return sharding.create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(seed), rules=rules), mesh, rules)


def abstract_model(cfg, rules: sharding.Rules | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """Graphdef and abstract (ShapeDtypeStruct) state of `Decoder(cfg)`: no FLOPs, no memory."""
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), rules=sharding.resolve_rules(rules))))
