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
    """Orbax checkpoints every `every` steps (and at the last, or on SIGTERM): the newest `keep`
    (at least 2), plus the best by eval loss with `keep_best`; `async_save` writes files in the
    background."""

    every: int = 1000
    keep: int = 3
    keep_best: bool = False
    async_save: bool = True

    def __post_init__(self):
        _check_positive_ints(self, "every", "keep")
        if self.keep < 2:
            raise ConfigError(
                f"CheckpointConfig.keep must be at least 2, got {self.keep}: Orbax deletes the older steps as it "
                "commits a new one, and the new one is sealed only afterwards, so a run stopped while sealing "
                "would leave no intact checkpoint to resume from")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The run itself: where it writes, how long it trains, on which mesh, what it logs.

    `mesh_shape` is (data, fsdp, tensor) over all devices; one -1 takes the remaining devices.
    `dcn_mesh_shape` (the same axes; one -1 takes the slices left) says how many slices or nodes,
    joined by the data-centre network, each axis spans: axis i is mesh_shape[i] / dcn[i] devices
    inside a slice (ICI, NVLink) times dcn[i] slices, placed by `jax.experimental.mesh_utils`
    (None: one slice). Slices are TPU slices, or processes elsewhere (one per GPU node).
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
            if len(dcn) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or (d < 1 and d != -1)
                                    for d in dcn) or dcn.count(-1) > 1:
                raise ConfigError(f"TrainConfig.dcn_mesh_shape must be 3 positive ints (data, fsdp, tensor), "
                                  f"one of them may be -1, got {self.dcn_mesh_shape!r}")
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


def _fill(shape: Sequence[int], total: int, field: str, what: str) -> tuple[int, ...]:
    """`shape` with its -1 (at most one) replaced by what the others leave of `total`."""
    shape = [int(s) for s in shape]
    if len(shape) != 3 or any(s < 1 and s != -1 for s in shape):
        raise ConfigError(f"{field}={tuple(shape)}: expected 3 sizes (data, fsdp, tensor), positive or -1")
    if shape.count(-1) > 1:
        raise ConfigError(f"{field}={tuple(shape)}: at most one -1 allowed")
    rest = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if total % rest:
            raise ConfigError(f"{field}={tuple(shape)} does not divide {total} {what}")
        shape[shape.index(-1)] = total // rest
    elif rest != total:
        raise ConfigError(f"{field}={tuple(shape)} covers {rest} {what}, there are {total}")
    return tuple(shape)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """A (data, fsdp, tensor) shape over exactly `num_devices`, its -1 filled in."""
    return _fill(shape, num_devices, "TrainConfig.mesh_shape", "devices")


def resolve_dcn_mesh_shape(dcn_shape: Sequence[int] | None, mesh_shape: Sequence[int],
                           num_slices: int) -> tuple[int, ...] | None:
    """The DCN part of the resolved `mesh_shape` over exactly `num_slices`, its -1 filled in;
    None for one slice."""
    if dcn_shape is None:
        return None
    dcn = _fill(dcn_shape, num_slices, "TrainConfig.dcn_mesh_shape", "slices (TPU slices, or processes)")
    for axis, size, d in zip(("data", "fsdp", "tensor"), mesh_shape, dcn):
        if size % d:
            raise ConfigError(f"TrainConfig.dcn_mesh_shape={dcn}: mesh axis {axis!r} of size {size} "
                              f"(TrainConfig.mesh_shape={tuple(mesh_shape)}) does not split over {d} slices")
    return dcn


def check_batch_split(batch_size: int, grad_accum_steps: int, batch_shards: int, mesh_shape: Sequence[int]) -> None:
    """Each micro-batch must split evenly over the devices of the batch axes (data x fsdp)."""
    if batch_size % (grad_accum_steps * batch_shards):
        raise ConfigError(
            f"DataConfig.batch_size={batch_size} does not split into {grad_accum_steps} micro-batches "
            f"(OptimizerConfig.grad_accum_steps) over the {batch_shards} batch shards of mesh "
            f"{tuple(mesh_shape)} (TrainConfig.mesh_shape; the rules' `batch` axes)")
