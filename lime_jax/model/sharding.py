"""Logical axis names, the logical -> mesh rules table, meshes and sharded model creation.

Every parameter carries its logical axes as Variable metadata (`logical_axes`), and every
activation constraint names logical axes. One rules table maps each logical name to a mesh
axis (or a tuple of them, or None = replicated). A new mesh layout is a config change:

    sharding_rules.rules = (("batch", ("data", "fsdp")), ("vocab", "tensor"), ...)

We keep our own metadata key instead of flax's `out_sharding` because flax 0.12 shards a
Variable carrying `out_sharding` eagerly at creation, which needs a mesh and flax's rule
context at construction time; here construction stays mesh-free (abstract shapes are built
with `nnx.eval_shape` and the shardings applied by `jax.jit(out_shardings=...)`).
Optimizer state built by `nnx.Optimizer` copies Variable metadata, so `state_shardings`
also shards optimizer moments like their parameters.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

LOGICAL_AXES = ("vocab", "embed", "mlp", "heads", "kv", "tags", "batch", "length", "layers")
MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# `kv` is the per-head feature dim (head_dim); `heads` also covers grouped KV heads.
# `embed` is sharded over fsdp on parameters only: activations keep their feature dim whole
# (the batch dim already uses fsdp).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("tags", None),  # metadata tables are tiny: replicate them
    ("layers", None),  # the stacked-layer axis of scan_layers: every device holds every layer
)


def validate_rules(rules: Rules | Mapping[str, MeshAxes]) -> Rules:
    """Checks a rules table and returns it as a hashable tuple (it is static jit state)."""
    items = tuple(rules.items()) if isinstance(rules, Mapping) else tuple(tuple(r) for r in rules)
    seen = set()
    out = []
    for item in items:
        if len(item) != 2:
            raise ValueError(f"sharding rule {item!r} must be a (logical_name, mesh_axes) pair")
        name, axes = item
        if name not in LOGICAL_AXES:
            raise ValueError(f"sharding rules: unknown logical axis name {name!r}; known: {LOGICAL_AXES}")
        if name in seen:
            raise ValueError(f"sharding rules: logical axis {name!r} appears twice")
        seen.add(name)
        axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        for a in axes_t:
            if a not in MESH_AXES:
                raise ValueError(
                    f"sharding rules: logical axis {name!r} maps to unknown mesh axis {a!r}; "
                    f"known: {MESH_AXES}")
        out.append((name, None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t))
    return tuple(out)


@gin.configurable
def sharding_rules(rules: Rules = DEFAULT_RULES) -> Rules:
    """The active rules table; bind `sharding_rules.rules` in gin to replace it."""
    return validate_rules(rules)


def resolve_rules(rules: Rules | Mapping[str, MeshAxes] | None) -> Rules:
    return sharding_rules() if rules is None else validate_rules(rules)


def logical_to_pspec(
    logical_axes: Sequence[str | None],
    rules: Rules,
    shape: Sequence[int] | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    With `shape` and `mesh`, a mesh axis that does not divide its dim (e.g. 2 KV heads over
    tensor=4), or that an earlier dim already uses, is dropped for that dim: the array is
    replicated along it instead of failing. Unknown logical names always raise.
    """
    table = dict(rules)
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis name {name!r}; known: {LOGICAL_AXES}")
        axes = table.get(name)
        axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for a in axes_t:
            if a in used:
                if mesh is None:
                    raise ValueError(f"mesh axis {a!r} used twice in logical axes {tuple(logical_axes)}")
                continue
            if mesh is not None:
                if a not in mesh.axis_names:
                    raise ValueError(f"rules map {name!r} to mesh axis {a!r}, absent from mesh {mesh.axis_names}")
                size = math.prod(mesh.shape[b] for b in kept) * mesh.shape[a]
                if shape is not None and shape[i] % size:
                    continue
            kept.append(a)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules) -> jax.Array:
    """Activation sharding constraint in logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_pspec(logical_axes, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over the first prod(shape) devices, with Auto axes.

    Auto axes let XLA propagate shardings (a gather from a vocab-sharded table needs no
    `out_sharding=`), which is what the logical-rules style assumes.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES) or any(s < 1 for s in shape):
        raise ValueError(f"mesh shape must be 3 positive ints for axes {MESH_AXES}, got {shape}")
    devices = list(jax.devices() if devices is None else devices)
    n = math.prod(shape)
    if n > len(devices):
        raise ValueError(f"mesh shape {shape} needs {n} devices, only {len(devices)} available")
    return jax.sharding.Mesh(
        np.asarray(devices[:n]).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> Any:
    """NamedSharding tree for any (abstract) NNX state: model params or optimizer state.

    A Variable with `logical_axes` metadata is sharded by the rules (nnx.Optimizer copies the
    metadata to its moments); anything else (step counters, scalars) is replicated.
    """
    rules = resolve_rules(rules)

    def one(x):
        if _is_var(x):
            value = x.get_value()
            axes = x.get_metadata().get("logical_axes")
            if axes is None or not hasattr(value, "shape") or len(axes) != len(value.shape):
                return x.replace(NamedSharding(mesh, PartitionSpec()))
            return x.replace(NamedSharding(mesh, logical_to_pspec(axes, rules, value.shape, mesh)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_state, is_leaf=_is_var)


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules | None = None) -> NamedSharding:
    """Sharding of an int32 [B, L] batch feature (batch over the rules' batch axes)."""
    spec = logical_to_pspec(("batch", "length"), resolve_rules(rules))
    return NamedSharding(mesh, spec)


# (mesh, rules) while `create_sharded` builds a model; None builds on the default device.
_PLACEMENT: contextvars.ContextVar = contextvars.ContextVar("lime_jax_init_placement", default=None)


@functools.lru_cache(maxsize=None)
def _initializer(shape: tuple[int, ...], std: float | None, fill: float, dtype: str, sharding) -> Callable:
    # One small jitted program per (shape, init, sharding): layers of the same shape share it,
    # so init compiles in O(distinct shapes), and each device computes only its own shard.
    if std is None:
        fn = lambda key: jnp.full(shape, fill, dtype)  # noqa: E731
    else:
        fn = lambda key: (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)  # noqa: E731
    return jax.jit(fn, out_shardings=sharding)


def init_param(
    key: jax.Array | None, shape: Sequence[int], logical_axes: Sequence[str | None], dtype,
    *, std: float | None = None, fill: float = 1.0,
) -> nnx.Param:
    """An nnx.Param: normal(0, std) from `key`, or constant `fill` when `std` is None.

    Inside `create_sharded` the value is produced directly with its mesh sharding. Values are
    the same for any mesh (threefry random bits do not depend on the sharding).
    """
    shape, logical_axes = tuple(int(d) for d in shape), tuple(logical_axes)
    if len(shape) != len(logical_axes):
        raise ValueError(f"param of shape {shape} has logical axes {logical_axes}")
    placement = _PLACEMENT.get()
    sharding = None
    if placement is not None:
        mesh, rules = placement
        sharding = NamedSharding(mesh, logical_to_pspec(logical_axes, rules, shape, mesh))
    if key is None:
        key = jax.random.key(0)  # unused by constant init; keeps one jitted signature
    value = _initializer(shape, std, float(fill), jnp.dtype(dtype).name, sharding)(key)
    return nnx.Param(value, logical_axes=logical_axes)


@contextlib.contextmanager
def _placed(mesh: jax.sharding.Mesh, rules: Rules):
    token = _PLACEMENT.set((mesh, rules))
    try:
        yield
    finally:
        _PLACEMENT.reset(token)


def create_sharded(
    init_fn: Callable[[], nnx.Module], mesh: jax.sharding.Mesh, rules: Rules | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """Builds an NNX module whose parameters are created directly sharded on `mesh`.

    Every `init_param` runs a jitted initializer with `out_shardings` from the rules, so no
    parameter is ever materialised whole on one device. The state is then `device_put` on the
    shardings derived from the abstract state (`nnx.eval_shape`): a no-op for params made by
    `init_param`, and it places any other Variable.
    """
    rules = resolve_rules(rules)
    _, abstract_state = nnx.split(nnx.eval_shape(init_fn))
    shardings = state_shardings(abstract_state, mesh, rules)
    with _placed(mesh, rules):
        graphdef, state = nnx.split(init_fn())
    return graphdef, jax.device_put(state, shardings)
