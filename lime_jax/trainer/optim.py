"""Optax optimizer for lime_jax: AdamW, linear warmup + cosine decay, global-norm clipping.

Weight decay skips parameters that are not matmul kernels: norm scales, biases, the token
embedding table and the metadata tables (decaying an embedding pulls rare tokens/tags toward 0,
which is what the LIME tables mostly hold). Which parameters decay is decided from the
parameter path and rank, so it works for any model built from the same module names.

Gradient accumulation lives in the train step (a scan over micro-batches inside one jitted
step), so one optimizer update is one train step and the schedule counts train steps.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import gin
import jax
import optax

# A parameter with a path component that fully matches one of these (case-insensitive) is not
# decayed. The token table, metadata tables and learned metadata weights live under `embed`
# (lime_jax.model.embed.LimeEmbed); norm gains are `*_norm/scale`.
DEFAULT_NO_DECAY = (r"embed", r".*norm.*", r"scale", r"bias")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer hyper-parameters (gin: `OptimizerConfig.learning_rate = 3e-3`, ...)."""

    learning_rate: float = 3e-3
    warmup_steps: int = 100
    # The cosine decays from `learning_rate` to `learning_rate * end_lr_ratio` at the last step.
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    grad_accum_steps: int = 1
    no_decay_patterns: tuple[str, ...] = DEFAULT_NO_DECAY

    def __post_init__(self):
        if self.grad_accum_steps < 1:
            raise ValueError(f"OptimizerConfig.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimizerConfig.warmup_steps must be >= 0, got {self.warmup_steps}")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine to `end_lr_ratio * peak` at `total_steps`."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )


def _path_names(path) -> list[str]:
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    return names


def decay_mask(params: Any, no_decay_patterns: tuple[str, ...] = DEFAULT_NO_DECAY) -> Any:
    """A pytree of bools like `params`: True where weight decay applies.

    Only kernels of rank >= 2 decay; a leaf with a path component fully matching a no-decay
    pattern is skipped.
    """
    regexes = [re.compile(p, re.IGNORECASE) for p in no_decay_patterns]

    def keep(path, leaf) -> bool:
        if len(getattr(leaf, "shape", ())) < 2:
            return False
        return not any(r.fullmatch(n) for n in _path_names(path) for r in regexes)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, learning-rate schedule)."""
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda p: decay_mask(p, cfg.no_decay_patterns),
        )
    )
    return optax.chain(*parts), schedule
