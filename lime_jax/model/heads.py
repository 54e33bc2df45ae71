"""Tag-prediction heads: metadata as training targets (issue 14).

A head reads the decoder trunk (the final-normed hidden state, the LM head's input) and predicts
the tags of one token: head `(name, size, ahead, weight)` at position i predicts tag feature
`name` of token t_{i+ahead}, where t_i is the input token at i (t_0 = BOS) and t_{i+1} is the
token the LM predicts there. So `ahead=1` forecasts the next token's tags, `ahead=0` tags the
current token, and `ahead=2` forecasts the tags a LIME+1 model will be fed at position i+1.

Causality: a model whose input position j carries the tags of t_{j+shift} has seen, at position i,
tags up to t_{i+shift}; a head with `ahead > shift` therefore never sees the tag it predicts
(`check_causal`, tested by perturbing that tag). The loss adds `weight * mean cross entropy` per head
(lambda_d); the batch feature `decoder_target_<name>_ahead<k>` holds the targets, PAD (0) where
there is no such token (past a segment's end, BOS), which the loss ignores.

Heads are `d_model x size` projections, counted in the metadata parameter overhead, and drawn from
their own RNG stream (folded from the params stream's base key, taking nothing from it) so a model
with heads starts from the same other weights as one without.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lime_jax.features import head_id
from lime_jax.model import sharding

_HEAD_STREAM = 0x4EAD5  # folded into the params stream's base key (any fixed constant)


def check_causal(heads, shift: int, has_tables: bool) -> None:
    """Raises when a head could read the tag it predicts: with metadata inputs at `shift`, a head
    must look further ahead than the inputs reach (ahead > shift)."""
    if not has_tables:
        return
    leaky = [head_id(n, a) for n, _, a, _ in heads if a <= shift]
    if leaky:
        raise ValueError(
            f"ModelConfig.tag_heads {leaky} would see the tags they predict: position i is fed the tags "
            f"of token i{shift:+d} (metadata shift {shift}), so a head needs ahead >= {shift + 1}")


class TagHeads(nnx.Module):
    """One `[d_model, size]` projection per configured head; f32 logits per head id."""

    def __init__(self, cfg, base_key: jax.Array):
        self.cfg = cfg
        stream = jax.random.fold_in(base_key, _HEAD_STREAM)
        self.kernels = nnx.Dict({
            head_id(name, ahead): sharding.init_param(
                jax.random.fold_in(stream, k), (cfg.d_model, size), ("embed", "tags"), cfg.param_dtype,
                std=cfg.d_model ** -0.5)
            for k, (name, size, ahead, _) in enumerate(cfg.tag_heads)})

    def __call__(self, x_BxLxD: jax.Array) -> dict[str, jax.Array]:
        dt = self.cfg.jnp_dtype
        return {hid: jnp.einsum("bld,dt->blt", x_BxLxD, w[...].astype(dt), preferred_element_type=jnp.float32)
                for hid, w in self.kernels.items()}
