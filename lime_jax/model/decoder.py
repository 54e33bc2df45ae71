"""Gemma/Llama-style decoder: RMSNorm, RoPE, gated MLP, grouped-query causal attention.

Packed batches: `segment_ids` (1.. per document, 0 = padding) keep documents from attending to
each other, and `positions` restart at 0 per document (RoPE reads them, never the array index).
Params are stored in `param_dtype` (f32) and cast to the compute `dtype` (bf16) at use;
attention softmax and logits are f32.

Layers (`cfg.scan_layers`): False keeps `blocks` as a list of Blocks (params `blocks/0/attn/wq`);
True stacks them into one Block whose params carry a leading "layers" axis (`blocks/attn/wq`
[n_layers, D, N, H]) run by one `jax.lax.scan`, so the layer compiles once. Both are built from
the same per-layer Blocks, so a seed gives the same weights either way.
Rematerialisation (`cfg.remat_policy`): each Block is the remat unit; the projections carry
MaxText's checkpoint names, which the policies save or recompute (`REMAT_SAVED_NAMES`).
Decoding: `Attention`, `Block` and `apply_blocks` take an optional `KVCache` (the whole
[n_layers, B, S, K, H] cache, written in place), so decode.py reuses this layer code.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lime_jax.model import attention, sharding
from lime_jax.model.config import REMAT_POLICIES, ModelConfig
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


# What each `ModelConfig.remat_policy` keeps from the forward pass (MaxText's names and mapping);
# everything else in a Block is recomputed in the backward pass. "none" runs no jax.checkpoint.
_SAVE_DOT_EXCEPT_MLP = ("query_proj", "value_proj", "key_proj", "out_proj")
REMAT_SAVED_NAMES = {
    "save_dot_except_mlp": _SAVE_DOT_EXCEPT_MLP,
    "save_dot_except_mlpwi": _SAVE_DOT_EXCEPT_MLP + ("mlpwo",),
    "save_dot_with_context_except_mlp": _SAVE_DOT_EXCEPT_MLP + ("context",),
    "save_qkv_proj": ("query_proj", "key_proj", "value_proj"),
}


def remat_policy(name: str):
    """The jax.checkpoint policy of a `ModelConfig.remat_policy`; None for "none".

    "full" saves nothing; "minimal" saves the outputs of matmuls without batch dims: the
    projections and the MLP, not the [B, K, G, L, S] attention scores (MaxText's choice).
    """
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "minimal":
        return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    if name in REMAT_SAVED_NAMES:
        return jax.checkpoint_policies.save_only_these_names(*REMAT_SAVED_NAMES[name])
    raise ValueError(f"ModelConfig.remat_policy must be one of {REMAT_POLICIES}, got {name!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The KV cache as one decode step sees it (Y = layers, S = cache slots, T = new positions).

    k/v hold every layer; `Attention` writes its T new keys and values at slot `index` of layer
    `layer` (a dynamic_update_slice, in place when the cache is donated) and attends over the
    layer's S slots under `mask` (which slots each new position sees: causal and not padding).
    """
    k_YxBxSxKxH: jax.Array
    v_YxBxSxKxH: jax.Array
    mask_Bx1x1xTxS: jax.Array
    index: jax.Array  # int32 scalar: the first slot the new positions write
    layer: jax.Array | int = 0

    def write(self, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array) -> KVCache:
        at = (self.layer, 0, self.index, 0, 0)
        return dataclasses.replace(
            self, k_YxBxSxKxH=jax.lax.dynamic_update_slice(self.k_YxBxSxKxH, k_BxTxKxH[None], at),
            v_YxBxSxKxH=jax.lax.dynamic_update_slice(self.v_YxBxSxKxH, v_BxTxKxH[None], at))

    def layer_kv(self) -> tuple[jax.Array, jax.Array]:
        """This layer's keys and values, [B, S, K, H] each."""
        return (jax.lax.dynamic_index_in_dim(self.k_YxBxSxKxH, self.layer, keepdims=False),
                jax.lax.dynamic_index_in_dim(self.v_YxBxSxKxH, self.layer, keepdims=False))


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
        q = checkpoint_name(jnp.einsum("bld,dnh->blnh", x_BxLxD, self.wq[...].astype(dt)), "query_proj")
        k = checkpoint_name(jnp.einsum("bld,dkh->blkh", x_BxLxD, self.wk[...].astype(dt)), "key_proj")
        v = checkpoint_name(jnp.einsum("bld,dkh->blkh", x_BxLxD, self.wv[...].astype(dt)), "value_proj")
        q_BxLxNxH = rope(q, positions_BxL, cfg.rope_theta) * (cfg.resolved_head_dim ** -0.5)
        k_BxLxKxH = rope(k, positions_BxL, cfg.rope_theta)
        axes = ("batch", "length", "heads", "kv")
        return (sharding.constrain(q_BxLxNxH, axes, self.rules), sharding.constrain(k_BxLxKxH, axes, self.rules),
                sharding.constrain(v, axes, self.rules))

    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL=None, cache: KVCache | None = None):
        """[B, L, D]; with a cache, ([B, T, D], the cache with this layer's new k/v written).

        Without a cache the L positions attend among themselves by `cfg.attention` (segment ids
        None: one document per row); with one they attend over the cache (the XLA reference)."""
        q, k, v = self.project_qkv(x_BxLxD, positions_BxL)
        if cache is None:
            o_BxLxNxH = attention.packed(q, k, v, segment_ids_BxL, impl=self.cfg.attention, rules=self.rules)
        else:
            cache = cache.write(k, v)
            o_BxLxNxH = attention.reference(q, *cache.layer_kv(), cache.mask_Bx1x1xTxS)
        o_BxLxNxH = checkpoint_name(o_BxLxNxH, "context")
        out_BxLxD = checkpoint_name(
            jnp.einsum("blnh,nhd->bld", o_BxLxNxH, self.wo[...].astype(self.cfg.jnp_dtype)), "out_proj")
        return out_BxLxD if cache is None else (out_BxLxD, cache)


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
        gate_BxLxF = act(checkpoint_name(x_BxLxD @ self.w_gate[...].astype(dt), "mlpwi"))
        up_BxLxF = checkpoint_name(x_BxLxD @ self.w_up[...].astype(dt), "mlpwi")
        h_BxLxF = sharding.constrain(gate_BxLxF * up_BxLxF, ("batch", "length", "mlp"), self.rules)
        return checkpoint_name(h_BxLxF @ self.w_down[...].astype(dt), "mlpwo")


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rules: sharding.Rules, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg)
        self.attn = Attention(cfg, rules, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg)
        self.mlp = GatedMLP(cfg, rules, rngs=rngs)

    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL=None, cache: KVCache | None = None):
        """[B, L, D], or ([B, T, D], updated cache) with a cache (`Attention.__call__`)."""
        h_BxLxD = self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL, cache)
        if cache is not None:
            h_BxLxD, cache = h_BxLxD
        x_BxLxD = x_BxLxD + h_BxLxD
        x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
        return x_BxLxD if cache is None else (x_BxLxD, cache)


def make_blocks(cfg: ModelConfig, rules: sharding.Rules, rngs: nnx.Rngs) -> nnx.List | Block:
    """`cfg.n_layers` Blocks: a list, or with `cfg.scan_layers` the same Blocks stacked into one."""
    blocks = [Block(cfg, rules, rngs=rngs) for _ in range(cfg.n_layers)]
    return stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)


def stack_blocks(blocks: Sequence[Block]) -> Block:
    """One Block holding `blocks`' params stacked on a leading "layers" axis (logical axes too).

    Under `sharding.create_sharded` the inputs are sharded, and so is the stack (each device
    stacks its own shards); under `nnx.eval_shape` nothing is allocated.
    """
    def stack(*vs):
        axes = ("layers", *vs[0].get_metadata()["logical_axes"])
        return vs[0].replace(jnp.stack([v.get_value() for v in vs]), logical_axes=axes)

    states = [nnx.state(b) for b in blocks]
    return nnx.merge(nnx.graphdef(blocks[0]), jax.tree.map(stack, *states, is_leaf=sharding.is_variable))


def apply_blocks(blocks: nnx.List | Block, cfg: ModelConfig, rules: sharding.Rules, x_BxLxD, positions_BxL,
                 segment_ids_BxL=None, cache: KVCache | None = None):
    """Runs every layer of `make_blocks`' result: [B, L, D], or ([B, T, D], cache) with a cache.

    Training applies `cfg.remat_policy` per Block; decoding (a cache) never differentiates, so it
    runs without jax.checkpoint. Stacked blocks run in one scan, which carries a cache whole and
    writes each layer's slice in place.
    """
    def layer(block, x_BxLxD, layer_cache):
        out = block(x_BxLxD, positions_BxL, segment_ids_BxL, layer_cache)
        x_BxLxD, layer_cache = out if layer_cache is not None else (out, None)
        return sharding.constrain(x_BxLxD, ("batch", "length", None), rules), layer_cache

    if cache is not None:
        if not cfg.scan_layers:
            for i, block in enumerate(blocks):
                x_BxLxD, cache = layer(block, x_BxLxD, dataclasses.replace(cache, layer=i))
            return x_BxLxD, cache
        graphdef, state = nnx.split(blocks)

        def decode_body(carry, xs):
            x_BxLxD, k, v = carry
            layer_state, i = xs
            x_BxLxD, c = layer(nnx.merge(graphdef, layer_state), x_BxLxD, dataclasses.replace(
                cache, k_YxBxSxKxH=k, v_YxBxSxKxH=v, layer=i))
            return (x_BxLxD, c.k_YxBxSxKxH, c.v_YxBxSxKxH), None

        (x_BxLxD, k, v), _ = jax.lax.scan(decode_body, (x_BxLxD, cache.k_YxBxSxKxH, cache.v_YxBxSxKxH),
                                          (state, jnp.arange(cfg.n_layers)))
        return x_BxLxD, dataclasses.replace(cache, k_YxBxSxKxH=k, v_YxBxSxKxH=v)

    policy = remat_policy(cfg.remat_policy)

    def apply_state(graphdef, layer_state, x_BxLxD):
        return layer(nnx.merge(graphdef, layer_state), x_BxLxD, None)[0]

    if policy is not None:
        # Unrolled, XLA's CSE could merge the backward's recomputation with the forward pass,
        # undoing the remat; a scan body already keeps them apart, so it skips the barriers.
        apply_state = jax.checkpoint(apply_state, policy=policy, prevent_cse=not cfg.scan_layers,
                                     static_argnums=(0,))
    if not cfg.scan_layers:
        for block in blocks:
            graphdef, layer_state = nnx.split(block)
            x_BxLxD = apply_state(graphdef, layer_state, x_BxLxD)
        return x_BxLxD
    graphdef, state = nnx.split(blocks)
    x_BxLxD, _ = jax.lax.scan(lambda x, layer_state: (apply_state(graphdef, layer_state, x), None), x_BxLxD, state)
    return x_BxLxD


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
        self.blocks = make_blocks(cfg, self.rules, rngs)
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
        if segment_ids is None:  # one document per row
            if positions is not None:
                raise ValueError("positions given without segment_ids; pass both for packed batches")
            positions = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1], dtype=jnp.int32), tokens_BxL.shape)
        elif positions is None:
            raise ValueError("segment_ids given without positions: packed documents need positions "
                             "restarting at 0 per document (decoder_positions)")
        for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
            if arr is None:
                continue
            if not hasattr(arr, "dtype") or not jnp.issubdtype(arr.dtype, jnp.integer):
                raise TypeError(f"{name}: expected an integer array, got {getattr(arr, 'dtype', type(arr).__name__)}")
            if tuple(arr.shape) != tuple(tokens_BxL.shape):
                raise ValueError(f"{name}: expected shape {tuple(tokens_BxL.shape)} (like the tokens), "
                                 f"got {tuple(arr.shape)}")

        x_BxLxD = apply_blocks(self.blocks, cfg, rules, x_BxLxD, positions, segment_ids)
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
