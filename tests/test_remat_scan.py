"""Remat policies and scanned layers change memory and compile time, never the math.

Every policy, with and without `scan_layers`, gives today's loss and gradients; the policies
save what MaxText's names say; a scanned model has the unscanned model's weights (same seed),
shards its stacked params on a leading "layers" axis and computes the same sharded loss.
"""
import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import PartitionSpec as P

from lime_jax.hf import gemma
from lime_jax.model import ModelConfig, create_sharded_model, jit_loss_fn, make_mesh, state_shardings
from lime_jax.model import loss_and_metrics, synthetic_batch
from lime_jax.model.config import REMAT_POLICIES
from lime_jax.model.decoder import REMAT_SAVED_NAMES, Decoder
from lime_jax.tagger.model import TaggerModel

# GQA (4 query heads over 2 kv heads) and metadata tables; 2 layers (their order matters).
CFG = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  metadata=(("pos", 9), ("ner", 7)), dtype="float32")


def loss_and_grads(cfg, batch):
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    fn = jax.jit(jax.value_and_grad(lambda s, b: loss_and_metrics(nnx.merge(graphdef, s), b)[0]))
    loss, grads = fn(state, batch)
    return float(loss), gemma.flat_params(grads)  # per-layer keys for stacked grads too


@pytest.fixture(scope="module")
def batch():
    return synthetic_batch(CFG, batch_size=4, length=16, seed=1)  # 4: data x fsdp of the 8-device mesh


@pytest.fixture(scope="module")
def reference(batch):
    return {dtype: loss_and_grads(CFG.replace(dtype=dtype), batch) for dtype in ("float32", "bfloat16")}


# The policies' mapping is checked without compiling (test_policies_save_what_their_names_say);
# these three cover the loop, the scan, and remat in and out of it; the rest run with --slow.
FAST = {("none", True), ("full", False), ("minimal", True)}


@pytest.mark.parametrize("policy,scan", [
    pytest.param(policy, scan, marks=() if (policy, scan) in FAST else pytest.mark.slow)
    for policy in REMAT_POLICIES for scan in (False, True)])
def test_every_policy_and_scan_give_the_same_loss_and_grads(reference, batch, policy, scan):
    loss, grads = loss_and_grads(CFG.replace(remat_policy=policy, scan_layers=scan), batch)
    want_loss, want_grads = reference["float32"]
    assert sorted(grads) == sorted(want_grads)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for key, g in want_grads.items():
        np.testing.assert_allclose(grads[key], g, rtol=1e-5, atol=1e-7, err_msg=key)


def test_bf16_scanned_remat_gives_the_same_loss_and_grads(reference, batch):
    loss, grads = loss_and_grads(CFG.replace(dtype="bfloat16", remat_policy="save_dot_except_mlp",
                                             scan_layers=True), batch)
    want_loss, want_grads = reference["bfloat16"]
    np.testing.assert_allclose(loss, want_loss, rtol=1e-3)
    for key, g in want_grads.items():
        scale = np.abs(g).max()
        np.testing.assert_allclose(grads[key], g, atol=2e-2 * scale, err_msg=key)


def saved_residuals(cfg, batch) -> tuple[int, list[str]]:
    """(f32/i32 elements the backward pass keeps, beyond the params, and the checkpoint names among them)."""
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda s: loss_and_metrics(nnx.merge(graphdef, s), batch)[0], state)
    kept = [line for line in out.getvalue().splitlines() if "from the argument" not in line]
    size = sum(int(np.prod([int(d) for d in re.match(r"\w+\[([\d,]*)\]", line).group(1).split(",") if d]))
               for line in kept)
    return size, sorted(re.findall(r"named '(\w+)'", "\n".join(kept)))


def test_policies_save_what_their_names_say(batch):
    sizes = {}
    for policy in REMAT_POLICIES:
        sizes[policy], names = saved_residuals(CFG.replace(remat_policy=policy), batch)
        if policy in REMAT_SAVED_NAMES:
            allowed = set(REMAT_SAVED_NAMES[policy])
            # The MLP output only joins the residual stream, whose backward needs none of it.
            assert allowed - {"mlpwo"} <= set(names) <= allowed, (policy, names)
            assert all(names.count(n) == CFG.n_layers for n in set(names)), (policy, names)
        if policy != "none":
            scanned, _ = saved_residuals(CFG.replace(remat_policy=policy, scan_layers=True), batch)
            assert scanned == sizes[policy], policy  # the scan saves per layer what the loop saves
    assert sizes["full"] < sizes["save_qkv_proj"] < sizes["save_dot_except_mlp"] \
        < sizes["save_dot_with_context_except_mlp"] < sizes["minimal"] < sizes["none"], sizes
    # "full" keeps each block's input only: [B, L, D] per layer, nothing of the attention or MLP.
    assert saved_residuals(CFG.replace(remat_policy="full"), batch)[1] == []


def test_scanned_model_has_the_same_weights_in_both_layouts():
    flat = gemma.flat_params(nnx.state(Decoder(CFG, rngs=nnx.Rngs(3)), nnx.Param))
    scanned = Decoder(CFG.replace(scan_layers=True), rngs=nnx.Rngs(3))
    stacked = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(scanned, nnx.Param))}
    assert stacked["blocks/attn/wq"].get_metadata()["logical_axes"] == ("layers", "embed", "heads", "kv")
    assert stacked["blocks/attn/wq"].shape == (CFG.n_layers, 32, 4, 8)
    want = gemma.stack_layers(flat, CFG.n_layers)
    assert sorted(want) == sorted(stacked)
    for key, v in stacked.items():
        np.testing.assert_array_equal(np.asarray(v.get_value()), want[key], err_msg=key)
    unstacked = gemma.flat_params(nnx.state(scanned, nnx.Param))
    assert sorted(unstacked) == sorted(flat)
    assert all(np.array_equal(unstacked[k], flat[k]) for k in flat)
    assert scanned.param_count() == Decoder(CFG, rngs=nnx.Rngs(0)).param_count()


def test_scanned_model_shards_layers_and_matches_unsharded(reference, batch):
    cfg = CFG.replace(scan_layers=True, remat_policy="save_dot_except_mlp")
    mesh = make_mesh((2, 2, 2))
    graphdef, state = create_sharded_model(cfg, mesh, seed=0)
    wq = state["blocks"]["attn"]["wq"]
    assert wq.get_metadata()["logical_axes"][0] == "layers"
    assert wq.get_value().sharding.spec == P(None, "fsdp", "tensor", None)
    assert state["blocks"]["mlp"]["w_down"].get_value().sharding.spec == P(None, "tensor", "fsdp")
    unsharded = nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)))
    np.testing.assert_array_equal(np.asarray(wq.get_value()), np.asarray(unsharded["blocks"]["attn"]["wq"][...]))

    run = jit_loss_fn(graphdef, state_shardings(state, mesh), mesh, with_grad=False)
    loss, _ = run(state, batch)
    np.testing.assert_allclose(float(loss), reference["float32"][0], rtol=1e-5)  # the unscanned, unsharded loss


def test_tagger_scans_its_blocks_too():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, dtype="float32")
    sizes = {"pos": 7, "ner": 5}
    pieces = jnp.asarray(np.random.default_rng(0).integers(2, 64, (2, 12)), jnp.int32)
    want = nnx.jit(lambda m, x: m(x))(TaggerModel(cfg, sizes, rngs=nnx.Rngs(0)), pieces)
    scanned = TaggerModel(cfg.replace(scan_layers=True, remat_policy="full"), sizes, rngs=nnx.Rngs(0))
    got = nnx.jit(lambda m, x: m(x))(scanned, pieces)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
