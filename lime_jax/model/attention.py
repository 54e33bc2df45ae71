"""Attention math behind one interface, chosen by `ModelConfig.attention`.

Every implementation computes the same thing: causal grouped-query attention in which a packed
document attends only to itself (`segment_ids`, 0 = padding), with an f32 softmax. `q` arrives
pre-scaled by 1/sqrt(head_dim) (`Attention.project_qkv`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_segment_mask(segment_ids_BxL: jax.Array) -> jax.Array:
    """[B, 1, 1, L, S] bool: causal and within one segment (padding only sees padding)."""
    L = segment_ids_BxL.shape[1]
    causal_LxS = jnp.arange(L)[:, None] >= jnp.arange(L)[None, :]
    same_BxLxS = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return (causal_LxS[None] & same_BxLxS)[:, None, None]


def reference(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1x1xLxS) -> jax.Array:
    """Grouped-query attention with an explicit mask and an f32 softmax; returns [B, L, N, H]."""
    B, L, N, H = q_BxLxNxH.shape
    K = k_BxSxKxH.shape[2]
    q_BxLxKxGxH = q_BxLxNxH.reshape(B, L, K, N // K, H)
    s_BxKxGxLxS = jnp.einsum("blkgh,bskh->bkgls", q_BxLxKxGxH, k_BxSxKxH,
                             preferred_element_type=jnp.float32)
    s_BxKxGxLxS = jnp.where(mask_Bx1x1xLxS, s_BxKxGxLxS, jnp.finfo(jnp.float32).min)
    p_BxKxGxLxS = jax.nn.softmax(s_BxKxGxLxS, axis=-1).astype(v_BxSxKxH.dtype)
    o_BxLxKxGxH = jnp.einsum("bkgls,bskh->blkgh", p_BxKxGxLxS, v_BxSxKxH)
    return o_BxLxKxGxH.reshape(B, L, N, H)


def packed(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, impl: str = "xla") -> jax.Array:
    """Causal attention over a packed batch (training and scoring): [B, L, N, H]."""
    if impl == "xla":
        return reference(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, causal_segment_mask(segment_ids_BxL))
    raise NotImplementedError(impl)
