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
from jax.experimental import mesh_utils
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


def mesh_axes(axes: MeshAxes) -> tuple[str, ...]:
    """A rule's mesh axes as a tuple: None -> (), "fsdp" -> ("fsdp",)."""
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


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
        axes_t = mesh_axes(axes)
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

    With `mesh`, every mesh axis the rules name must exist in it and be used by one dim only;
    with `shape` too, the mesh axes of each dim must divide it (e.g. 2 KV heads over tensor=4
    raises). Both raise instead of quietly replicating: a dropped axis would silently change
    the memory and the collectives of a run. Unknown logical names always raise.
    """
    table = dict(rules)
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    owner: dict[str, str] = {}  # mesh axis -> the logical axis that uses it
    spec = []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis name {name!r}; known: {LOGICAL_AXES}")
        axes = table.get(name)
        axes_t = mesh_axes(axes)
        for a in axes_t:
            if a in owner:
                raise ValueError(f"sharding rules map logical axes {owner[a]!r} and {name!r} of "
                                 f"{tuple(logical_axes)} to the same mesh axis {a!r}")
            owner[a] = name
        if mesh is not None and axes_t:
            absent = [a for a in axes_t if a not in mesh.axis_names]
            if absent:
                raise ValueError(f"rules map {name!r} to mesh axis {absent[0]!r}, absent from mesh {mesh.axis_names}")
            size = math.prod(mesh.shape[a] for a in axes_t)
            if shape is not None and shape[i] % size:
                raise ValueError(
                    f"logical axis {name!r} (dim {i} of shape {tuple(shape)}, size {shape[i]}) does not "
                    f"divide over mesh axes {axes_t} of {size} devices (mesh {dict(mesh.shape)}); change "
                    f"the mesh (TrainConfig.mesh_shape), the model shape or `sharding_rules.rules`")
        spec.append(None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules) -> jax.Array:
    """Activation sharding constraint in logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_pspec(logical_axes, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _mesh_shape(shape: Sequence[int], what: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES) or any(s < 1 for s in shape):
        raise ValueError(f"{what} must be 3 positive ints for axes {MESH_AXES}, got {shape}")
    return shape


def _granule_attr(devices: Sequence[Any]) -> str:
    # TPU slices are joined by DCN; elsewhere a process is one host (a GPU node: NVLink inside).
    return "slice_index" if devices[0].platform == "tpu" else "process_index"


def num_slices(devices: Sequence[Any] | None = None) -> int:
    """How many DCN-joined groups the devices form: TPU slices, or processes (one per GPU node)."""
    devices = jax.devices() if devices is None else devices
    attr = _granule_attr(devices)
    return len({getattr(d, attr) for d in devices})


def device_grid(shape: Sequence[int], dcn_shape: Sequence[int] | None = None,
                devices: Sequence[Any] | None = None) -> np.ndarray:
    """Devices arranged as a (data, fsdp, tensor) array of `shape`, by `jax.experimental.mesh_utils`.

    One slice (`dcn_shape` None or all 1): `create_device_mesh`, which follows the physical
    torus on TPU, device ids on GPU, and the listed order on CPU. Without `devices`, a mesh
    smaller than `jax.devices()` takes the first prod(shape) of them (tests, one-device benches).
    Several slices: mesh axis i is shape[i] / dcn_shape[i] devices inside each slice (ICI,
    NVLink) times dcn_shape[i] slices (DCN): `create_hybrid_device_mesh` over all devices, with
    TPU slices (`slice_index`) or else processes as the slices.
    """
    shape = _mesh_shape(shape, "mesh shape")
    dcn = (1, 1, 1) if dcn_shape is None else _mesh_shape(dcn_shape, "dcn mesh shape")
    n = math.prod(shape)
    if devices is None:
        devices = jax.devices()
        if n > len(devices):
            raise ValueError(f"mesh shape {shape} needs {n} devices, only {len(devices)} available")
        if math.prod(dcn) == 1:
            devices = devices[:n]
    devices = list(devices)
    if n != len(devices):
        raise ValueError(f"mesh shape {shape} needs {n} devices, got {len(devices)}")
    if math.prod(dcn) == 1:
        return _topology_aware(mesh_utils.create_device_mesh, shape, devices)
    for axis, size, d in zip(MESH_AXES, shape, dcn):
        if size % d:
            raise ValueError(f"mesh axis {axis!r} of size {size} does not split over {d} slices "
                             f"(dcn mesh shape {dcn}, mesh shape {shape})")
    slices, attr = num_slices(devices), _granule_attr(devices)
    if slices != math.prod(dcn):
        raise ValueError(f"dcn mesh shape {dcn} needs {math.prod(dcn)} slices, the {n} devices span {slices} "
                         f"(distinct device.{attr})")
    ici = tuple(s // d for s, d in zip(shape, dcn))
    return _topology_aware(mesh_utils.create_hybrid_device_mesh, ici, dcn, devices,
                           process_is_granule=attr == "process_index")


def _topology_aware(create: Callable, *args, **kwargs) -> np.ndarray:
    """`create(*args)`, keeping each mesh axis on whole physical (torus) axes where the shape
    allows, else splitting physical axes (e.g. fsdp=32 x tensor=2 on a 4x4x4 TPU v4 slice)."""
    try:
        return create(*args, **kwargs)
    except (NotImplementedError, AssertionError, ValueError):
        try:
            return create(*args, **kwargs, allow_split_physical_axes=True)
        except (NotImplementedError, AssertionError, ValueError) as e:
            raise ValueError(f"mesh_utils cannot lay a mesh of {args[0]} over these devices' topology: {e}") from e


def make_mesh(shape: Sequence[int], dcn_shape: Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh of `shape` (`device_grid` places the devices), with Auto axes.

    Auto axes let XLA propagate shardings (a gather from a vocab-sharded table needs no
    `out_sharding=`), which is what the logical-rules style assumes.
    """
    return jax.sharding.Mesh(device_grid(shape, dcn_shape, devices), MESH_AXES,
                             axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_size(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh, rules: Rules, name: str) -> int:
    """How many ways the rules split logical axis `name` on `mesh` (e.g. "batch": data x fsdp)."""
    return math.prod(mesh.shape[a] for a in mesh_axes(dict(rules).get(name)))


def is_variable(x: Any) -> bool:
    """`is_leaf` for tree maps over NNX state that must see Variables whole (their metadata)."""
    return isinstance(x, nnx.Variable)


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> Any:
    """NamedSharding tree for any (abstract) NNX state: model params or optimizer state.

    A Variable with `logical_axes` metadata is sharded by the rules (nnx.Optimizer copies the
    metadata to its moments); anything else (step counters, scalars) is replicated.
    """
    rules = resolve_rules(rules)

    def one(x):
        if is_variable(x):
            value = x.get_value()
            axes = x.get_metadata().get("logical_axes")
            if axes is None or not hasattr(value, "shape") or len(axes) != len(value.shape):
                return x.replace(NamedSharding(mesh, PartitionSpec()))
            return x.replace(NamedSharding(mesh, logical_to_pspec(axes, rules, value.shape, mesh)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_state, is_leaf=is_variable)


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
