"""Model hyper-parameters: one frozen, gin-configurable dataclass.

Run configs bind fields directly (`ModelConfig.d_model = 128`); size presets live in
gin/models/*.gin. Dtypes are strings so they read naturally in gin files.
"""
from __future__ import annotations

import dataclasses
import re

import gin
import jax.numpy as jnp

from lime_jax.features import head_id

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_MLP_ACTIVATIONS = ("gelu", "silu")  # GeGLU (Gemma) or SwiGLU (Llama)
# `attention.py`: the XLA reference, cuDNN flash attention (jax.nn.dot_product_attention; no
# segment ids), Pallas flash attention for GPU (Triton) and splash attention for TPU (Mosaic).
ATTENTION_IMPLS = ("xla", "cudnn", "pallas_gpu", "splash")
# Rematerialisation policies by MaxText's names (`decoder.py` maps them to jax.checkpoint
# policies over the checkpoint names of the attention and MLP projections).
REMAT_POLICIES = ("none", "full", "minimal", "save_dot_except_mlp", "save_dot_except_mlpwi",
                  "save_dot_with_context_except_mlp", "save_qkv_proj")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of the decoder and its LIME embedding.

    `metadata` lists the metadata tables as `(name, table_size)`; the batch feature for a table
    named `pos` is `decoder_input_pos`. An empty tuple is the baseline: the same code with no
    metadata tables. `head_dim=None` means `d_model // n_heads`.

    `tag_heads` lists tag-prediction heads as `(name, size, ahead, weight)` (`heads.py`): predict
    tag feature `name` (a vocabulary of `size` ids) of token i+ahead from the trunk at position i,
    adding `weight * cross entropy` to the loss. Empty: no heads (the paper's models).

    Two switches of the loss and the embedding ride along so a run config sets them like any
    model field (off by default): `z_loss` adds `z_loss * mean(logZ^2)` to the objective
    (PaLM's auxiliary loss, 1e-4 there), and `check_ids` range-checks token and tag ids
    inside jitted code too, raising an error naming the feature (see `embed.py`).
    """

    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    d_ff: int = 128
    metadata: tuple[tuple[str, int], ...] = ()
    tag_heads: tuple[tuple[str, int, int, float], ...] = ()
    metadata_weight: str = "fixed"  # "fixed" | "learned": w_d in E_tok + sum_d w_d E_d
    metadata_weight_init: float = 1.0
    tie_embeddings: bool = True
    param_dtype: str = "float32"
    dtype: str = "bfloat16"  # compute dtype; softmax, logits and loss are always f32
    rope_theta: float = 10_000.0
    mlp_activation: str = "gelu"
    norm_eps: float = 1e-6
    z_loss: float = 0.0
    check_ids: bool = False
    # Accelerator scale (docs/scaling.md): none changes the math, only speed and memory.
    attention: str = "xla"  # one of ATTENTION_IMPLS
    remat_policy: str = "none"  # one of REMAT_POLICIES
    scan_layers: bool = False  # params stacked on a leading `layers` axis, one jax.lax.scan
    loss_chunk_size: int = 0  # > 0: cross entropy over chunks of this many positions per row (no full f32 logits)
    gather_params_in_compute_dtype: bool = False  # cast params to `dtype` before FSDP all-gathers

    def __post_init__(self):
        # gin and JSON hand lists where tuples are meant; normalise so the config stays hashable.
        meta = tuple((str(n), int(s)) for n, s in (tuple(m) for m in self.metadata))
        object.__setattr__(self, "metadata", meta)
        object.__setattr__(self, "tag_heads", _normalise_heads(self.tag_heads))
        tables = dict(meta)
        for name, size, ahead, _ in self.tag_heads:
            if name in tables and size != tables[name]:
                raise ValueError(f"ModelConfig.tag_heads {head_id(name, ahead)!r} has {size} tags but the "
                                 f"metadata table {name!r} has {tables[name]}: one vocabulary, one size")
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{field} must be a positive int, got {value!r}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 1):
            raise ValueError(f"ModelConfig.head_dim must be a positive int or None, got {self.head_dim!r}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "set head_dim explicitly")
        if self.resolved_head_dim % 2:
            raise ValueError(f"ModelConfig head_dim={self.resolved_head_dim} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        names = [n for n, _ in meta]
        if len(set(names)) != len(names):
            raise ValueError(f"ModelConfig.metadata has duplicate table names: {names}")
        for name, size in meta:
            if not _NAME_RE.match(name):
                raise ValueError(f"ModelConfig.metadata table name {name!r} must match {_NAME_RE.pattern}")
            if size < 2:
                raise ValueError(f"ModelConfig.metadata table {name!r} needs size >= 2 (0 = PAD), got {size}")
        if isinstance(self.z_loss, bool) or not isinstance(self.z_loss, (int, float)) or self.z_loss < 0:
            raise ValueError(f"ModelConfig.z_loss must be a float >= 0, got {self.z_loss!r}")
        object.__setattr__(self, "z_loss", float(self.z_loss))
        if not isinstance(self.check_ids, bool):
            raise TypeError(f"ModelConfig.check_ids must be a bool, got {self.check_ids!r}")
        for field, allowed in (("attention", ATTENTION_IMPLS), ("remat_policy", REMAT_POLICIES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"ModelConfig.{field} must be one of {allowed}, got {getattr(self, field)!r}")
        for field in ("scan_layers", "gather_params_in_compute_dtype"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"ModelConfig.{field} must be a bool, got {getattr(self, field)!r}")
        if isinstance(self.loss_chunk_size, bool) or not isinstance(self.loss_chunk_size, int) \
                or self.loss_chunk_size < 0:
            raise ValueError(f"ModelConfig.loss_chunk_size must be an int >= 0 (0: no chunking), "
                             f"got {self.loss_chunk_size!r}")
        if self.metadata_weight not in ("fixed", "learned"):
            raise ValueError(
                f"ModelConfig.metadata_weight must be 'fixed' or 'learned', got {self.metadata_weight!r}")
        if self.mlp_activation not in _MLP_ACTIVATIONS:
            raise ValueError(
                f"ModelConfig.mlp_activation must be one of {_MLP_ACTIVATIONS}, got {self.mlp_activation!r}")
        for field in ("param_dtype", "dtype"):
            try:
                dt = jnp.dtype(getattr(self, field))
            except TypeError as e:
                raise TypeError(f"ModelConfig.{field}={getattr(self, field)!r} is not a dtype") from e
            if not jnp.issubdtype(dt, jnp.floating):
                raise TypeError(f"ModelConfig.{field} must be a float dtype, got {dt}")
            object.__setattr__(self, field, dt.name)

    @property
    def head_ids(self) -> tuple[str, ...]:
        return tuple(head_id(n, a) for n, _, a, _ in self.tag_heads)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def metadata_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.metadata)

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def baseline(self) -> "ModelConfig":
        """The same model without metadata tables or tag heads (the paper's baseline arm)."""
        return self.replace(metadata=(), tag_heads=())


def _normalise_heads(heads) -> tuple[tuple[str, int, int, float], ...]:
    out = []
    for spec in heads:
        spec = tuple(spec)
        if len(spec) != 4:
            raise ValueError(f"ModelConfig.tag_heads entry {spec!r} must be (name, size, ahead, weight)")
        name, size, ahead, weight = spec
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"ModelConfig.tag_heads name {name!r} must match {_NAME_RE.pattern}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ValueError(f"ModelConfig.tag_heads {name!r}: size must be an int >= 2 (0 = PAD), got {size!r}")
        if isinstance(ahead, bool) or not isinstance(ahead, int) or not 0 <= ahead <= 8:
            raise ValueError(f"ModelConfig.tag_heads {name!r}: ahead must be an int in [0, 8], got {ahead!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"ModelConfig.tag_heads {name!r}: weight (lambda) must be > 0, got {weight!r}")
        out.append((name, size, ahead, float(weight)))
    ids = [head_id(n, a) for n, _, a, _ in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"ModelConfig.tag_heads has duplicate (name, ahead) pairs: {ids}")
    return tuple(out)
