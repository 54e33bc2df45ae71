"""Attention math behind one interface, chosen by `ModelConfig.attention`.

Every implementation computes the same thing: causal grouped-query attention in which a packed
document attends only to itself (`segment_ids`, 0 = padding, which attends only to padding),
with an f32 softmax. `q` arrives pre-scaled by 1/sqrt(head_dim) (`Attention.project_qkv`), so
every kernel runs with scale 1. They differ only in speed, memory and where they run:

    "xla"         any platform. The reference: materialises [B, K, G, L, L] f32 scores.
    "cudnn"       GPU. cuDNN flash attention (`jax.nn.dot_product_attention`). Its public API has
                  no segment ids, so it serves unpacked rows only (one document per row); packed
                  training batches are refused (`check_packed_support`).
    "pallas_gpu"  GPU. Pallas/Triton flash attention with segment ids (k/v expanded to all heads).
    "splash"      TPU. Pallas/Mosaic splash attention with segment ids, native grouped-query.

On CPU the kernels run their own code in Pallas interpret mode (cuDNN: the same call on XLA's
backend), so a GPU or TPU config also runs in CPU tests. Under a mesh the kernels, custom calls
XLA cannot partition, run in `jax.shard_map` over the mesh axes the rules give "batch" and
"heads".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu_attention
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from lime_jax.model import sharding
from lime_jax.model.config import ATTENTION_IMPLS

_PLATFORM = {"cudnn": "gpu", "pallas_gpu": "gpu", "splash": "tpu"}
_NATIVE = {"gpu": "pallas_gpu", "tpu": "splash"}

CUDNN_PACKED_ERROR = (
    "ModelConfig.attention='cudnn' cannot attend within packed documents: the cuDNN API of "
    "jax.nn.dot_product_attention takes no segment ids, so every document in a packed row would "
    "attend to the documents before it. Use attention='pallas_gpu' on GPU (flash attention with "
    "segment ids) or 'xla'.")


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


def check_packed_support(impl: str, seq_len: int | None = None) -> None:
    """Raises unless `impl` can attend within packed documents (training batches always are) of
    `seq_len` on this backend: what the first trace would find, said before any data or state."""
    _check_impl(impl)
    if impl == "cudnn":
        raise ValueError(CUDNN_PACKED_ERROR)
    if impl != "xla":
        _emulate(impl)  # a kernel of another accelerator raises
        if seq_len is not None:
            (_pow2_block if impl == "pallas_gpu" else _splash_block)(seq_len)


def packed(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, impl: str = "xla", *,
           rules: sharding.Rules | None = None, interpret: bool | None = None) -> jax.Array:
    """Causal attention over a packed batch (training and scoring): [B, L, N, H].

    `segment_ids_BxL=None` states one document per row: plain causal attention, the only form
    "cudnn" serves. It is exact on the real tokens of a row that ends in padding too (causality
    keeps them from seeing it); only the unused outputs at the padding differ. `interpret=True`
    emulates the kernel (Pallas interpret mode; cuDNN's call on XLA); None: only on CPU.
    """
    _check_impl(impl)
    B, L, N, H = q_BxLxNxH.shape
    if k_BxLxKxH.shape[1] != L:
        raise ValueError(f"packed attention needs as many keys as queries, got L={L}, S={k_BxLxKxH.shape[1]}")
    if impl == "cudnn" and segment_ids_BxL is not None:
        raise ValueError(CUDNN_PACKED_ERROR)
    if segment_ids_BxL is None:
        segment_ids_BxL = jnp.ones((B, L), jnp.int32)
    if impl == "xla":
        return reference(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, causal_segment_mask(segment_ids_BxL))
    emulate = _emulate(impl) if interpret is None else interpret
    if impl == "cudnn":
        kernel = functools.partial(_cudnn, implementation="xla" if emulate else "cudnn")
    elif impl == "pallas_gpu":
        kernel = functools.partial(_pallas_gpu, interpret=emulate)
    else:
        kernel = functools.partial(_splash, interpret=emulate)
    return _shard_map(kernel, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, sharding.resolve_rules(rules))


def runs_natively(impl: str, backend: str | None = None) -> bool:
    """Whether `impl` runs compiled on `backend` (default `jax.default_backend()`): "xla"
    everywhere, each kernel on its own platform only (elsewhere it is emulated, or refused)."""
    _check_impl(impl)
    return impl == "xla" or _PLATFORM[impl] == (backend or jax.default_backend())


def _check_impl(impl: str) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"ModelConfig.attention must be one of {ATTENTION_IMPLS}, got {impl!r}")


def _emulate(impl: str) -> bool:
    """True on CPU: the kernel runs emulated; False on its own platform; an error elsewhere."""
    backend = jax.default_backend()
    if runs_natively(impl, backend):
        return False
    if backend == "cpu":
        return True
    raise ValueError(f"ModelConfig.attention={impl!r} runs on {_PLATFORM[impl]} (or emulated on cpu), "
                     f"not on {backend}: use {_NATIVE.get(backend, 'xla')!r} or 'xla'")


def _shard_map(kernel, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, rules):
    """Runs `kernel` on per-device shards of batch and heads; a plain call outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL)
    # The rules shard q heads and kv heads over the same axes (logical_to_pspec raises unless they
    # divide both), so each shard of q heads holds the kv heads its groups read: kernels see
    # local grouped-query attention.
    axes = ("batch", "length", "heads", "kv")
    spec_q = _kernel_spec(sharding.logical_to_pspec(axes, rules, q_BxLxNxH.shape, mesh))
    spec_kv = _kernel_spec(sharding.logical_to_pspec(axes, rules, k_BxLxKxH.shape, mesh))
    spec_ids = PartitionSpec(spec_q[0], None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec_q, spec_kv, spec_kv, spec_ids), out_specs=spec_q,
                         check_vma=False)(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL)


def _kernel_spec(spec: PartitionSpec) -> PartitionSpec:
    """Batch and heads as the rules shard them; each kernel needs whole sequences and head dims."""
    return PartitionSpec(spec[0], None, spec[2], None)


def _cudnn(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, *, implementation):
    del segment_ids_BxL  # all ones: one document per row (checked by `packed`)
    return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, scale=1.0, is_causal=True,
                                        implementation=implementation)


def _pallas_gpu(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, *, interpret):
    L, N = q_BxLxNxH.shape[1:3]
    # The kernel is multi-head only: each q head gets its group's k/v (head n reads kv head n // G,
    # as in `reference`); the backward pass of the repeat sums the group's gradients.
    G = N // k_BxLxKxH.shape[2]
    k_BxLxNxH, v_BxLxNxH = jnp.repeat(k_BxLxKxH, G, axis=2), jnp.repeat(v_BxLxKxH, G, axis=2)
    # Triton tiles are powers of two >= 16; JAX's defaults (128 forward, 32 backward) where L allows.
    fwd, bwd = _pow2_block(L, 128), _pow2_block(L, 32)
    blocks = pallas_gpu_attention.BlockSizes(block_q=fwd, block_k=fwd, block_q_dkv=bwd, block_kv_dkv=bwd,
                                             block_q_dq=bwd, block_kv_dq=bwd)
    return pallas_gpu_attention.mha(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, sm_scale=1.0,
                                    causal=True, block_sizes=blocks, interpret=interpret)


def _splash_block(L: int) -> int:
    # Mosaic tiles kv in multiples of 128 lanes; 512 is MaxText's default block.
    block = next((b for b in (512, 384, 256, 128) if L % b == 0), None)
    if block is None:
        raise ValueError(f"ModelConfig.attention='splash' needs a sequence length that is a multiple of 128 "
                         f"(TPU lane width), got L={L}: change DataConfig.seq_len")
    return block


def _pow2_block(L: int, preferred: int = 128) -> int:
    block = preferred
    while L % block:
        block //= 2
    if block < 16:
        raise ValueError(f"ModelConfig.attention='pallas_gpu' needs a sequence length that is a multiple of 16 "
                         f"(Triton tiles are powers of two >= 16), got L={L}: change DataConfig.seq_len")
    return block


def _splash(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, *, interpret):
    L, N = q_BxLxNxH.shape[1:3]
    block = _splash_block(L)
    blocks = splash_kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                      block_kv_dq=block)
    # Built per call from local (per-shard) shapes; the mask's block tables are cached by splash.
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((L, L))] * N)
    kernel = splash_kernel.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                           interpret=interpret)

    def one_row(q_NxLxH, k_KxLxH, v_KxLxH, ids_L):
        return kernel(q_NxLxH, k_KxLxH, v_KxLxH, segment_ids=splash_kernel.SegmentIds(q=ids_L, kv=ids_L))

    o_BxNxLxH = jax.vmap(one_row)(q_BxLxNxH.transpose(0, 2, 1, 3), k_BxLxKxH.transpose(0, 2, 1, 3),
                                  v_BxLxKxH.transpose(0, 2, 1, 3), segment_ids_BxL)
    return o_BxNxLxH.transpose(0, 2, 1, 3)
