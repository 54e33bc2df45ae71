"""What a training run is configured by: four frozen, gin-configurable dataclasses.

Run configs bind their fields (`DataConfig.seq_len = %SEQ_LEN`, `TrainConfig.mesh_shape = ...`);
gin/runs/pretrain.gin maps the user-facing macros (MODEL_DIR, CACHE_DIR, ...) onto them. The model
(`ModelConfig`), the optimizer (`OptimizerConfig`) and the sharding rules have their own.
Every field is checked when the config is built, naming the gin binding that is wrong.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import gin


class ConfigError(ValueError):
    """The gin configuration is incomplete or invalid."""


def _check_positive_ints(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{type(config).__name__}.{name} must be a positive int, got {value!r}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The training batches and the held-out cache.

    The training data is either a cache written by `lime-jax annotate` (`cache_dir`, read by the
    Grain loader) or a registered SeqIO task or mixture (`mixture_or_task_name`, see tasks/):
    exactly one. `batch_size` is global (split over processes).
    """

    seq_len: int
    batch_size: int
    cache_dir: str | None = None
    mixture_or_task_name: str | None = None
    eval_cache_dir: str | None = None  # None: no held-out evaluation
    # More held-out caches evaluated beside it, logged as eval_<name>/...: e.g. the same documents
    # re-tagged by an honest tag source ({"prefix": DIR}, `lime-jax annotate --from-cache`).
    extra_eval_cache_dirs: dict[str, str] | None = None
    metadata_shift: int = 0  # 0 LIME, +1 LIME+1, -1 leakage control
    # Fraction of positions trained with all tags PAD, so the model also predicts without them.
    metadata_dropout: float = 0.0
    read_threads: int = 4
    worker_count: int = 0
    check_cache_hashes: bool = True

    def __post_init__(self):
        _check_positive_ints(self, "seq_len", "batch_size", "read_threads")
        if (self.cache_dir is None) == (self.mixture_or_task_name is None):
            given = "both are set" if self.cache_dir is not None else "neither is set"
            raise ConfigError(
                f"set exactly one training data source, CACHE_DIR (DataConfig.cache_dir, an annotated "
                f"cache) or MIXTURE_OR_TASK_NAME (DataConfig.mixture_or_task_name, a SeqIO task): {given}")
        extra = self.extra_eval_cache_dirs or {}
        if not isinstance(extra, dict) or not all(
                isinstance(k, str) and k.isidentifier() and isinstance(v, str) for k, v in extra.items()):
            raise ConfigError(f"DataConfig.extra_eval_cache_dirs must map names (identifiers) to cache dirs, "
                              f"got {self.extra_eval_cache_dirs!r}")
        if extra and not self.eval_cache_dir:
            raise ConfigError("DataConfig.extra_eval_cache_dirs needs DataConfig.eval_cache_dir (EVAL_CACHE_DIR) too")
        object.__setattr__(self, "extra_eval_cache_dirs", dict(extra))
        if not 0.0 <= self.metadata_dropout < 1.0:
            raise ConfigError(f"DataConfig.metadata_dropout must be in [0, 1), got {self.metadata_dropout!r}")
        if not isinstance(self.worker_count, int) or self.worker_count < 0:
            raise ConfigError(f"DataConfig.worker_count must be an int >= 0, got {self.worker_count!r}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation every `every` steps (and at the last), on up to `batches` batches
    (None: the whole held-out cache)."""

    every: int = 1000
    batches: int | None = 16

    def __post_init__(self):
        _check_positive_ints(self, "every")
        if self.batches is not None:
            _check_positive_ints(self, "batches")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints every `every` steps (and at the last, or on SIGTERM): the newest `keep`,
    plus the best by eval loss with `keep_best`; `async_save` writes files in the background."""

    every: int = 1000
    keep: int = 3
    keep_best: bool = False
    async_save: bool = True

    def __post_init__(self):
        _check_positive_ints(self, "every", "keep")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The run itself: where it writes, how long it trains, on which mesh, what it logs.

    `mesh_shape` is (data, fsdp, tensor); one -1 takes the remaining devices. `dcn_mesh_shape`
    (the same axes) splits them further over slices or nodes joined by the data-centre network:
    each mesh axis is ICI size x DCN size, built by `jax.experimental.mesh_utils` (None: one slice).
    `profile_steps = (first, last)` writes a `jax.profiler` trace of those steps to
    `<model_dir>/profile`; `compilation_cache_dir` turns on JAX's persistent compilation cache.
    `peak_flops_per_device=None` looks the device kind up (metrics.peak_flops_for) for MFU.
    `initialize_distributed=True` always initialises JAX's distributed runtime (a TPU VM slice),
    otherwise only when flags, JAX_* variables or a cluster launcher name several processes.
    """

    model_dir: str
    train_steps: int
    seed: int = 0
    mesh_shape: tuple[int, ...] = (-1, 1, 1)
    log_every: int = 10
    peak_flops_per_device: float | None = None
    progress: bool = True
    initialize_distributed: bool = False
    dcn_mesh_shape: tuple[int, ...] | None = None
    profile_steps: tuple[int, int] | None = None
    compilation_cache_dir: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "mesh_shape", tuple(self.mesh_shape))  # gin may hand a list
        if self.dcn_mesh_shape is not None:
            dcn = tuple(self.dcn_mesh_shape)
            if len(dcn) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dcn):
                raise ConfigError(f"TrainConfig.dcn_mesh_shape must be 3 positive ints (data, fsdp, tensor), "
                                  f"got {self.dcn_mesh_shape!r}")
            object.__setattr__(self, "dcn_mesh_shape", dcn)
        if self.profile_steps is not None:
            window = tuple(self.profile_steps)
            if len(window) != 2 or any(isinstance(d, bool) or not isinstance(d, int) for d in window) \
                    or not 1 <= window[0] <= window[1]:
                raise ConfigError(f"TrainConfig.profile_steps must be (first, last) steps with "
                                  f"1 <= first <= last, got {self.profile_steps!r}")
            object.__setattr__(self, "profile_steps", window)
        _check_positive_ints(self, "train_steps", "log_every")
        if not isinstance(self.model_dir, str) or not self.model_dir:
            raise ConfigError(f"TrainConfig.model_dir must be a path, got {self.model_dir!r}")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """A (data, fsdp, tensor) shape with its -1 (at most one) replaced by what the others leave."""
    shape = [int(s) for s in shape]
    if shape.count(-1) > 1:
        raise ConfigError(f"TrainConfig.mesh_shape={tuple(shape)}: at most one -1 allowed")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if num_devices % rest:
            raise ConfigError(f"TrainConfig.mesh_shape={tuple(shape)} does not divide {num_devices} devices")
        shape[shape.index(-1)] = num_devices // rest
    return tuple(shape)
