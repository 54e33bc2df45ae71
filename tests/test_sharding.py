"""Logical-axis sharding: rules, meshes, sharded creation, and sharded == single-device numerics
(of the loss helper and of the trainer's own jitted step, with gradient accumulation)."""
import dataclasses

import gin
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lime_jax.model import (DEFAULT_RULES, Decoder, ModelConfig, batch_sharding, create_sharded_model,
                            jit_loss_fn, logical_to_pspec, make_mesh, sharding_rules, state_shardings,
                            synthetic_batch)
from lime_jax.model import abstract_model, sharding
from lime_jax.model.sharding import device_grid
from lime_jax.trainer import state as state_lib
from lime_jax.trainer import step as step_lib
from lime_jax.trainer.config import (ConfigError, TrainConfig, check_batch_split, resolve_dcn_mesh_shape,
                                     resolve_mesh_shape)

# One layer keeps the many compiles here cheap; test_model.py covers depth. 4 KV heads (grouped
# 2 query heads each) split over tensor=4.
TINY = ModelConfig(vocab_size=512, d_model=64, n_layers=1, n_heads=8, n_kv_heads=4, d_ff=128,
                   metadata=(("pos", 53), ("ner", 40)), dtype="float32")
ARMS = {"lime": TINY, "baseline": TINY.baseline()}


def test_rules_are_replaceable_in_gin():
    gin.clear_config()
    try:
        gin.parse_config('sharding_rules.rules = (("batch", "data"), ("vocab", None), ("embed", "fsdp"))')
        rules = sharding_rules()
        assert logical_to_pspec(("vocab", "embed"), rules) == P(None, "fsdp")
        assert nnx.eval_shape(lambda: Decoder(TINY, rngs=nnx.Rngs(0))).rules == rules  # picks up the binding
    finally:
        gin.clear_config()
    assert sharding_rules() == DEFAULT_RULES


def test_rules_map_logical_names_and_reject_unknown_ones():
    rules = sharding_rules()
    assert rules == DEFAULT_RULES
    assert logical_to_pspec(("vocab", "embed"), rules) == P("tensor", "fsdp")
    assert logical_to_pspec(("tags", None), rules) == P(None, None)
    assert logical_to_pspec(("batch", "length"), rules) == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="unknown logical axis name 'stage'"):
        logical_to_pspec(("stage", "embed"), rules)
    with pytest.raises(ValueError, match="unknown logical axis name 'vocabulary'"):
        sharding_rules((("vocabulary", "tensor"),))
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        sharding_rules((("vocab", "model"),))
    with pytest.raises(ValueError, match="unknown logical axis name 'stage'"):
        Decoder(TINY, rngs=nnx.Rngs(0), rules=(("stage", None),))
    assert logical_to_pspec(("layers", "embed"), rules) == P(None, "fsdp")


def test_an_axis_that_does_not_divide_or_is_reused_raises():
    rules, mesh = sharding_rules(), make_mesh((1, 2, 4))
    assert logical_to_pspec(("embed", "heads", "kv"), rules, (64, 4, 16), mesh) == P("fsdp", "tensor", None)
    # 2 KV heads over tensor=4: an error naming the logical axis, the dim and the mesh axis
    # (replicating instead would silently change the memory and collectives of the run).
    with pytest.raises(ValueError, match=r"logical axis 'heads' \(dim 1 of shape \(64, 2, 16\), size 2\) does not "
                                         r"divide over mesh axes \('tensor',\) of 4 devices"):
        logical_to_pspec(("embed", "heads", "kv"), rules, (64, 2, 16), mesh)
    # A batch of 4 over data x fsdp = 8.
    with pytest.raises(ValueError, match=r"logical axis 'batch' \(dim 0 .* \('data', 'fsdp'\) of 8 devices"):
        logical_to_pspec(("batch", "length"), rules, (4, 16), make_mesh((2, 4, 1)))
    with pytest.raises(ValueError, match=r"absent from mesh"):
        logical_to_pspec(("vocab",), rules, (8,), jax.sharding.AbstractMesh((2,), ("data",)))
    reuse = (("batch", ("data", "fsdp")), ("embed", "fsdp"))
    with pytest.raises(ValueError, match=r"logical axes 'batch' and 'embed' .* same mesh axis 'fsdp'"):
        logical_to_pspec(("batch", "length", "embed"), reuse, (8, 16, 64), mesh)
    # Inside the model: a sharded create fails at the first indivisible parameter.
    with pytest.raises(ValueError, match=r"logical axis 'heads'"):
        create_sharded_model(dataclasses.replace(TINY, n_kv_heads=2), mesh, seed=0)


@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 1, 1), (1, 1, 8), (1, 2, 2)])
def test_make_mesh_shapes(shape):
    mesh = make_mesh(shape)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and tuple(mesh.shape.values()) == shape
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"needs 16 devices, only 8"):
        make_mesh((4, 2, 2))
    with pytest.raises(ValueError, match="3 positive ints"):
        make_mesh((8,))
    with pytest.raises(ValueError, match=r"needs 4 devices, got 8"):
        make_mesh((1, 4, 1), devices=jax.devices())
    # One process: one slice, so no axis can span two.
    assert sharding.num_slices() == 1
    with pytest.raises(ValueError, match=r"dcn mesh shape \(2, 1, 1\) needs 2 slices, the 8 devices span 1 "
                                         r"\(distinct device.process_index\)"):
        make_mesh((2, 4, 1), dcn_shape=(2, 1, 1))
    with pytest.raises(ValueError, match="3 positive ints"):
        make_mesh((2, 4, 1), dcn_shape=(2, 1))


def test_one_slice_dcn_is_the_plain_mesh():
    plain = make_mesh((2, 2, 2))
    assert make_mesh((2, 2, 2), dcn_shape=(1, 1, 1)) == plain
    assert [d.id for d in plain.devices.flat] == list(range(8))  # CPU: the listed order


# ----------------------------------------------------------------------------- hybrid (DCN) meshes

@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What mesh_utils reads of a device: a GPU of a node (process) or a TPU chip of a slice."""

    id: int
    process_index: int
    platform: str = "gpu"
    device_kind: str = "NVIDIA H100 80GB HBM3"
    slice_index: int = 0
    coords: tuple[int, int, int] = (0, 0, 0)
    core_on_chip: int = 0


def _gpu_nodes(nodes, per_node):
    # Listed out of id order, as a launcher may: mesh_utils orders each node's GPUs by id.
    return [FakeDevice(id=n * per_node + i, process_index=n) for n in reversed(range(nodes))
            for i in reversed(range(per_node))]


def test_hybrid_mesh_puts_dcn_axes_across_nodes():
    devices = _gpu_nodes(2, 4)
    assert sharding.num_slices(devices) == 2
    # HSDP: data across the 2 nodes, fsdp over the 4 GPUs inside each.
    grid = device_grid((2, 4, 1), dcn_shape=(2, 1, 1), devices=devices)
    assert grid.shape == (2, 4, 1)
    assert [[d.process_index for d in row] for row in grid[:, :, 0]] == [[0] * 4, [1] * 4]
    assert [d.id for d in grid.flat] == list(range(8))
    # FSDP over both nodes, tensor inside a node: the fsdp axis crosses nodes, tensor never does.
    grid = device_grid((1, 4, 2), dcn_shape=(1, 2, 1), devices=devices)
    assert [d.process_index for d in grid[0, :, 0]] == [0, 0, 1, 1]
    assert all(len({d.process_index for d in grid[0, f, :]}) == 1 for f in range(4))
    with pytest.raises(ValueError, match=r"mesh axis 'fsdp' of size 4 does not split over 3 slices"):
        device_grid((1, 4, 2), dcn_shape=(1, 3, 1), devices=devices)
    with pytest.raises(ValueError, match=r"needs 4 slices, the 8 devices span 2"):
        device_grid((4, 2, 1), dcn_shape=(4, 1, 1), devices=devices)


def _hops(p, q):
    return sum(abs(a - b) for a, b in zip(p.coords, q.coords))


def test_hybrid_mesh_on_tpu_slices_follows_the_torus():
    # 2 slices of 2x2 TPU v4 chips, listed in an order where list neighbours are not torus
    # neighbours: inside a slice, fsdp and tensor neighbours must still be adjacent chips.
    order = [(0, 0), (1, 1), (1, 0), (0, 1)]
    devices = [FakeDevice(id=4 * s + i, process_index=s, platform="tpu", device_kind="TPU v4", slice_index=s,
                          coords=(x, y, 0)) for s in range(2) for i, (x, y) in enumerate(order)]
    assert sharding.num_slices(devices) == 2
    grid = device_grid((2, 2, 2), dcn_shape=(2, 1, 1), devices=devices)
    assert [{d.slice_index for d in grid[i].flat} for i in range(2)] == [{0}, {1}]  # data crosses DCN
    for sl in grid:
        assert all(_hops(sl[f, 0], sl[f, 1]) == 1 for f in range(2))  # tensor neighbours
        assert all(_hops(sl[0, t], sl[1, t]) == 1 for t in range(2))  # fsdp neighbours
    naive = np.asarray(devices).reshape(2, 2, 2)  # what a plain reshape would have built
    assert _hops(naive[0, 0, 0], naive[0, 0, 1]) == 2


def test_mesh_that_splits_a_physical_axis_still_builds():
    # fsdp=32 x tensor=2 (mesh/fsdp_tensor.gin) on a 4x4x4 TPU v4 slice: no mesh axis fits whole
    # torus axes, so mesh_utils must split one; every chip is still used exactly once.
    devices = [FakeDevice(id=i, process_index=i // 4, platform="tpu", device_kind="TPU v4",
                          coords=(i % 4, (i // 4) % 4, i // 16)) for i in range(64)]
    for shape in ((1, 32, 2), (2, 32, 1)):
        grid = device_grid(shape, devices=devices)
        assert grid.shape == shape and sorted(d.id for d in grid.flat) == list(range(64))


# ----------------------------------------------------------------------------- the trainer's config

def test_train_config_mesh_shapes_resolve_or_name_the_field():
    assert resolve_mesh_shape((1, -1, 2), 8) == (1, 4, 2)
    with pytest.raises(ConfigError, match=r"TrainConfig.mesh_shape=\(1, 2, 1\) covers 2 devices, there are 8"):
        resolve_mesh_shape((1, 2, 1), 8)
    with pytest.raises(ConfigError, match=r"TrainConfig.mesh_shape=\(3, -1, 1\) does not divide 8 devices"):
        resolve_mesh_shape((3, -1, 1), 8)
    with pytest.raises(ConfigError, match="at most one -1"):
        resolve_mesh_shape((-1, -1, 1), 8)
    # mesh/hsdp.gin on 4 nodes of 8 GPUs: data across nodes.
    assert resolve_dcn_mesh_shape((-1, 1, 1), resolve_mesh_shape((-1, 8, 1), 32), 4) == (4, 1, 1)
    assert resolve_dcn_mesh_shape(None, (1, 8, 1), 1) is None
    with pytest.raises(ConfigError, match=r"TrainConfig.dcn_mesh_shape=\(1, 1, 2\): mesh axis 'tensor' of size 1"):
        resolve_dcn_mesh_shape((1, 1, -1), (2, 1, 1), 2)
    with pytest.raises(ConfigError, match=r"TrainConfig.dcn_mesh_shape=\(2, 1, 1\) covers 2 slices .*there are 1"):
        resolve_dcn_mesh_shape((2, 1, 1), (2, 4, 1), 1)
    with pytest.raises(ConfigError, match="TrainConfig.dcn_mesh_shape must be 3 positive ints"):
        TrainConfig(model_dir="/tmp/x", train_steps=1, dcn_mesh_shape=(0, 1, 1))
    check_batch_split(32, 4, 8, (1, 8, 1))
    with pytest.raises(ConfigError, match=r"DataConfig.batch_size=16 does not split into 4 micro-batches "
                                          r"\(OptimizerConfig.grad_accum_steps\) over the 8 batch shards"):
        check_batch_split(16, 4, 8, (1, 8, 1))
    assert sharding.axis_size(make_mesh((2, 2, 2)), sharding_rules(), "batch") == 4


@pytest.fixture(scope="module")
def single():
    """Reference params (one device) for both arms: same weights except the metadata tables."""
    out = {}
    for arm, cfg in ARMS.items():
        graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
        batch = synthetic_batch(cfg, batch_size=8, length=16, seed=2)
        fn = jit_loss_fn(graphdef, state_shardings(state, make_mesh((1, 1, 1))), make_mesh((1, 1, 1)))
        out[arm] = (graphdef, state, batch, fn(state, batch))
    return out


def test_create_sharded_model_places_params_by_rules(single):
    mesh = make_mesh((2, 2, 2))
    graphdef, state = create_sharded_model(TINY, mesh, seed=0)
    assert state["embed"]["token"][...].sharding.spec == P("tensor", "fsdp")
    assert state["embed"]["tables"]["pos"][...].sharding.spec == P(None, None)  # replicated
    assert state["blocks"][0]["mlp"]["w_gate"][...].sharding.spec == P("fsdp", "tensor")
    assert state["blocks"][0]["attn"]["wk"][...].sharding.spec == P("fsdp", "tensor", None)
    token = state["embed"]["token"][...]
    assert {s.data.shape for s in token.addressable_shards} == {(256, 32)}  # never whole on a device
    # Same seed, same values as the unsharded init, whatever the mesh.
    _, ref, _, _ = single["lime"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state, ref)


def test_state_shardings_cover_optimizer_state():
    # nnx.Optimizer copies Variable metadata to its moments, so they shard like the params.
    mesh = make_mesh((2, 2, 2))
    abstract_opt = nnx.eval_shape(
        lambda: nnx.Optimizer(Decoder(TINY, rngs=nnx.Rngs(0)), optax.adamw(1e-3), wrt=nnx.Param))
    shardings = state_shardings(nnx.state(abstract_opt.opt_state), mesh)
    token = {path: v.get_value().spec for path, v in nnx.to_flat_state(shardings) if "token" in path}
    assert len(token) == 2 and set(token.values()) == {P("tensor", "fsdp")}  # adam mu and nu
    # Same for a raw optax state over the abstract params (Variables keep their metadata).
    abstract_params = abstract_model(TINY)[1]
    shardings = state_shardings(jax.eval_shape(optax.adamw(1e-3).init, abstract_params), mesh)
    specs = [v.get_value().spec for v in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
             if isinstance(v, nnx.Variable) and v.get_metadata().get("logical_axes") == ("vocab", "embed")]
    assert specs == [P("tensor", "fsdp")] * 2
    assert abstract_model(TINY)[1]["embed"]["token"].shape == (512, 64)


@pytest.mark.parametrize("arm,shape", [
    ("lime", (8, 1, 1)), ("lime", (2, 2, 2)), ("lime", (1, 2, 4)), ("baseline", (2, 2, 2)),
    pytest.param("baseline", (8, 1, 1), marks=pytest.mark.slow),
    pytest.param("baseline", (1, 2, 4), marks=pytest.mark.slow),
])
def test_sharded_loss_and_grads_equal_single_device(single, arm, shape):
    graphdef, state, batch, (ref_loss, ref_metrics, ref_grads) = single[arm]
    mesh = make_mesh(shape)
    shardings = state_shardings(state, mesh)
    fn = jit_loss_fn(graphdef, shardings, mesh)
    loss, metrics, grads = fn(jax.device_put(state, shardings), jax.device_put(batch, batch_sharding(mesh)))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert float(metrics["num_tokens"]) == float(ref_metrics["num_tokens"])
    assert float(metrics["num_correct"]) == float(ref_metrics["num_correct"])
    assert grads["embed"]["token"][...].sharding.spec == shardings["embed"]["token"].get_value().spec
    jax.tree.map(lambda g, r: np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-4, atol=2e-6),
                 grads, ref_grads)


# ----------------------------------------------------------------------------- the trainer's step

STEP_CFG = dataclasses.replace(TINY, z_loss=1e-4)  # the z-loss term takes part in the comparison


def _trainer_step(shape, accum):
    """One update of the trainer's own jitted step (`step.jit_train_step`, donated state) on `shape`."""
    mesh, rules = make_mesh(shape), sharding_rules()
    graphdef, abstract_params = abstract_model(STEP_CFG, rules)
    # Momentum SGD at lr 1: the first update is exactly -grads (Adam's ~lr * sign(grads) would
    # hide a wrongly weighted gradient), and its trace is optimizer state sharded like the params.
    schedule = optax.constant_schedule(1.0)
    tx = optax.sgd(schedule, momentum=0.9)
    shardings = state_lib.train_state_shardings(state_lib.abstract_train_state(abstract_params, tx), mesh, rules)
    data_sh = batch_sharding(mesh, rules)
    fn = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, schedule, accum), shardings, data_sh)
    batch = jax.device_put(synthetic_batch(STEP_CFG, batch_size=8, length=16, seed=2), data_sh)
    with jax.set_mesh(mesh):
        state = state_lib.init_train_state(STEP_CFG, tx, mesh, rules, shardings, seed=0)
        initial = jax.device_get(state.params)
        new_state, metrics = fn(state, batch)
    assert new_state.params["embed"]["token"][...].sharding == shardings.params["embed"]["token"].get_value()
    assert int(new_state.step) == 1
    return initial, jax.device_get(new_state.params), jax.device_get(metrics)


@pytest.fixture(scope="module")
def single_device_update():
    return _trainer_step((1, 1, 1), accum=1)


@pytest.mark.parametrize("shape,accum", [((1, 1, 1), 2), ((2, 2, 2), 2), ((1, 2, 4), 1)])
def test_trainer_step_sharded_or_accumulated_equals_single_device(single_device_update, shape, accum):
    ref_init, ref_params, ref_m = single_device_update
    init, params, m = _trainer_step(shape, accum)
    jax.tree.map(np.testing.assert_array_equal, init, ref_init)  # same start on every mesh
    for k in ("loss", "z_loss", "grad_norm", "param_norm"):
        np.testing.assert_allclose(m[k], ref_m[k], rtol=2e-5, err_msg=k)
    assert m["z_loss"] > 0 and m["num_tokens"] == ref_m["num_tokens"]
    # The updates (-grads), not the much larger weights.
    jax.tree.map(lambda a, b, a0, b0: np.testing.assert_allclose(a - a0, b - b0, rtol=2e-4, atol=2e-6),
                 params, ref_params, init, ref_init)
