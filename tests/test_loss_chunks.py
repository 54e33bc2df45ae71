"""Accelerator-scale loss and step options: the chunked cross entropy (`ModelConfig.loss_chunk_size`)
and params cast to the compute dtype before their FSDP all-gathers
(`ModelConfig.gather_params_in_compute_dtype`). Neither may change a number; each must change the
program the way it claims (no full f32 logits; bf16 param gathers)."""
import functools
import glob
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lime_jax.model import (Decoder, ModelConfig, abstract_model, batch_sharding, loss_and_metrics, make_mesh,
                            sharding_rules, synthetic_batch)
from lime_jax.trainer import state as state_lib
from lime_jax.trainer import step as step_lib

# f32 compute: chunked and whole logits then agree to f32 rounding. Metadata, two tag heads and
# the z-loss all take part.
CFG = ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, dtype="float32",
                  metadata=(("pos", 12),), tag_heads=(("pos", 12, 1, 0.5), ("pos", 12, 2, 0.25)), z_loss=1e-3)
B, L = 4, 24  # B*L*V = 49152 f32 logits, more than any other array of the model (V*D = 16384)


@functools.cache
def _batch():
    return {k: jnp.asarray(v) for k, v in synthetic_batch(CFG, B, L, seed=1).items()}


@functools.cache
def _compiled_grad(chunk: int, tied: bool):
    """The compiled value_and_grad of the loss, and the params it differentiates (same weights for
    every chunk size)."""
    cfg = CFG.replace(loss_chunk_size=chunk, tie_embeddings=tied)
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    fn = jax.jit(jax.value_and_grad(lambda p, b: loss_and_metrics(nnx.merge(graphdef, p), b), has_aux=True))
    return fn.lower(params, _batch()).compile(), params


def _run(chunk: int, tied: bool):
    compiled, params = _compiled_grad(chunk, tied)
    return jax.device_get(compiled(params, _batch()))


# A chunk that divides L, one that does not (a padded tail), one longer than L; both LM heads.
CASES = [(8, True), (10, False), (64, True)]


@pytest.mark.parametrize("chunk,tied", CASES)
def test_chunked_loss_metrics_and_gradients_equal_whole_logits(chunk, tied):
    (loss, metrics), grads = _run(chunk, tied)
    (ref_loss, ref_metrics), ref_grads = _run(0, tied)
    assert metrics.keys() == ref_metrics.keys()
    assert metrics["z_loss"] > 0 and metrics["pos_ahead1/num_tags"] > 0
    for key in ("num_tokens", "num_correct", "pos_ahead1/num_correct", "pos_ahead2/num_tags"):
        assert metrics[key] == ref_metrics[key], key
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-6, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    # The LM head (token table or head) and the trunk below it, through the chunk loop's backward.
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7), grads, ref_grads)


def _f32_array_sizes(hlo: str) -> list[int]:
    return [math.prod(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\bf32\[([\d,]*)\]", hlo)]


@pytest.mark.parametrize("chunk,tied", CASES[:2])
def test_chunked_loss_never_holds_the_full_f32_logits(chunk, tied):
    """In the optimised program of loss + gradients, forward and backward: with chunks no f32
    array reaches B*L*V elements (the largest is one chunk's [B, C, V]); without them the whole
    logits are there."""
    full = B * L * CFG.vocab_size
    assert max(_f32_array_sizes(_compiled_grad(0, tied)[0].as_text())) >= full
    sizes = _f32_array_sizes(_compiled_grad(chunk, tied)[0].as_text())
    assert max(sizes) < full
    assert B * chunk * CFG.vocab_size in sizes


def test_chunked_loss_keeps_nan_for_out_of_range_targets():
    compiled, params = _compiled_grad(*CASES[1])
    for bad in (CFG.vocab_size, -1):  # in the padded last chunk's real part
        batch = dict(_batch(), decoder_target_tokens=_batch()["decoder_target_tokens"].at[0, L - 1].set(bad))
        (loss, metrics), _ = compiled(params, batch)
        assert np.isnan(loss) and np.isnan(metrics["loss"]), bad


# --------------------------------------------------------------- params gathered in the compute dtype

BF16 = ModelConfig(vocab_size=512, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=128, dtype="bfloat16",
                   metadata=(("pos", 12),), tag_heads=(("pos", 12, 1, 0.5),), z_loss=1e-3)
CAST = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "pos_ahead1")  # read only in bf16 by the model


def _all_gathers(hlo: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(dtype, shape, op_name) of each all-gather in an HLO module's text."""
    out = []
    for line in hlo.splitlines():
        m = re.search(r"= (\w+)\[([\d,]*)\]\S* all-gather(?:-start)?\(", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            out.append((m.group(1), tuple(int(d) for d in m.group(2).split(",") if d), op.group(1) if op else ""))
    return out


MESH_SHAPE = (1, 8, 1)  # pure FSDP over 8 devices
SCHEDULE = optax.constant_schedule(1.0)
TX = optax.sgd(SCHEDULE, momentum=0.9)


def _shardings(mesh, rules):
    abstract = state_lib.abstract_train_state(abstract_model(BF16, rules)[1], TX)
    return state_lib.train_state_shardings(abstract, mesh, rules)


@pytest.fixture(scope="module")
def initial_state():
    """One initial train state on the host (the flag changes no param), put on the mesh per step:
    the step donates its state."""
    mesh, rules = make_mesh(MESH_SHAPE), sharding_rules()
    with jax.set_mesh(mesh):
        return jax.device_get(state_lib.init_train_state(BF16, TX, mesh, rules, _shardings(mesh, rules), seed=0))


def _fsdp_step(initial_state, flag: bool, accum: int, dump_dir: str):
    """One update by the trainer's own jitted step on an 8-device fsdp mesh, and the eval step's
    sums; returns (new params, metrics, eval sums, HLO of the step right after SPMD partitioning)."""
    cfg = BF16.replace(gather_params_in_compute_dtype=flag)
    mesh, rules = make_mesh(MESH_SHAPE), sharding_rules()
    graphdef, _ = abstract_model(cfg, rules)
    shardings, data_sh = _shardings(mesh, rules), batch_sharding(mesh, rules)
    fn = step_lib.jit_train_step(step_lib.make_train_step(graphdef, TX, SCHEDULE, accum), shardings, data_sh)
    batch = jax.device_put(synthetic_batch(cfg, batch_size=16, length=16, seed=3), data_sh)
    state = jax.device_put(initial_state, shardings)
    with jax.set_mesh(mesh):
        sums = None
        if accum == 1:
            eval_fn = jax.jit(step_lib.make_eval_step(graphdef), in_shardings=(shardings.params, data_sh))
            sums = jax.device_get(eval_fn(state.params, batch))
        # The CPU backend widens bf16 collectives to f32 later in compilation (GPUs and TPUs keep
        # them): the dtypes the partitioner chose are in the HLO right after partitioning.
        compiled = fn.lower(state, batch).compile(
            compiler_options={"xla_dump_to": dump_dir, "xla_dump_hlo_pass_re": "spmd-partitioning"})
        new_state, metrics = compiled(state, batch)
    (path,) = glob.glob(f"{dump_dir}/*after_spmd-partitioning*")
    with open(path) as f:
        hlo = f.read()
    return jax.device_get(new_state.params), jax.device_get(metrics), sums, hlo


@pytest.mark.parametrize("accum", [1, 2])
def test_params_gathered_in_compute_dtype_change_no_number_and_gather_bf16(initial_state, accum, tmp_path):
    params, metrics, sums, hlo = _fsdp_step(initial_state, True, accum, str(tmp_path / "on"))
    ref_params, ref_metrics, ref_sums, _ = _fsdp_step(initial_state, False, accum, str(tmp_path / "off"))
    # The model casts these matrices to bf16 at use anyway: casting earlier is exact, gradients
    # (so the f32 update) included.
    jax.tree.map(np.testing.assert_array_equal, metrics, ref_metrics)
    jax.tree.map(np.testing.assert_array_equal, sums, ref_sums)
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))

    flat = dict(nnx.to_flat_state(abstract_model(BF16)[1]))
    cast_shapes = {v.shape for path, v in flat.items() if path[-1] in CAST}
    forward = [(dt, shape) for dt, shape, op in _all_gathers(hlo) if "transpose(" not in op]
    for shape in cast_shapes:  # each cast matrix is gathered, and only in bf16
        assert {dt for dt, s in forward if s == shape} == {"bf16"}, (shape, forward)
    # The token table is not cast (the lookup reads it in f32): its gather for the lookup stays f32.
    assert ("f32", flat[("embed", "token")].shape) in forward
    if accum > 1:
        # Micro-batches are strided rows, so every device keeps its own rows: no batch feature
        # (int32) is ever gathered.
        assert not [g for g in _all_gathers(hlo) if g[0] == "s32"]
