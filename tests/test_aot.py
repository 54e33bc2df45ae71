"""The accelerator configs lower and compile for meshes of their intended size (no such devices
here: AbstractMesh lowering in-process, fake CPU devices for compiling); the compiled program's
memory and FLOPs match figures computed by hand from the config and the mesh."""
import dataclasses
import math

import pytest

from lime_jax.cli import aot as aot_cli
from lime_jax.trainer import aot

# (run config, model, intended mesh): 500M on one 8-GPU node, 1B on two nodes, 2B on a
# 32-chip TPU slice.
INTENDED = [("runs/gpu.gin", "models/500m.gin", (1, 8, 1)),
            ("runs/gpu.gin", "models/1b.gin", (1, 16, 1)),
            ("runs/tpu_pod.gin", "models/2b.gin", (1, 32, 1))]
UNUSED = ["MODEL_DIR = 'unused'", "CACHE_DIR = 'unused'", "TRAIN_STEPS = 1000"]
METADATA = (53, 40)  # gin/runs/lime.gin: POS and NER table rows


def _check_estimate(r, billions):
    assert r["params"] == pytest.approx(billions * 1e9, rel=0.1)
    e = r["estimate_per_device"]
    # f32 params split evenly over the fsdp axis (only tiny tables are replicated).
    assert e["params_gib"] * r["devices"] == pytest.approx(r["params"] * 4 / 2**30, rel=0.02)
    assert e["opt_state_gib"] == pytest.approx(2 * e["params_gib"], rel=0.02)  # Adam's two moments


def _param_bytes_per_device(V, D, N, K, F, L, fsdp, head_dim=None):
    """(parameter count, f32 parameter bytes per device) of a tied-embedding LIME decoder whose
    every tensor but the metadata tables has one d_model axis, split over `fsdp` devices."""
    H = head_dim or D // N
    sharded = V * D + L * (2 * D * N * H + 2 * D * K * H + 3 * D * F + 2 * D) + D
    replicated = sum(METADATA) * D
    assert (D // fsdp) * fsdp == D
    return sharded + replicated, 4 * (sharded // fsdp + replicated)


def _check_state_memory(r, param_bytes):
    """Arguments = params + Adam's two moments + the batch shard + step, RNG key and optimizer
    step counters (a few int32 scalars); the whole state is donated (aliased to the outputs)."""
    m = {k: round(v * aot.GiB) for k, v in r["memory_analysis_per_device"].items()}
    rows = r["batch_size"] // (r["mesh"]["data"] * r["mesh"]["fsdp"])
    batch_bytes = rows * r["seq_len"] * 4 * (5 + len(METADATA))  # int32 decoder_* features
    state_bytes = 3 * param_bytes + 4 + 8  # + step (int32) and the RNG key data (2 x uint32)
    assert 0 <= m["argument_gib"] - state_bytes - batch_bytes <= 64
    assert 0 <= m["alias_gib"] - state_bytes <= 64
    assert m["output_gib"] >= m["alias_gib"]


def test_compiled_memory_and_flops_match_the_config():
    V, D, N, K, F, S, B = 2048, 256, 4, 2, 1024, 128, 16
    # One micro-batch: XLA's cost analysis counts a loop body (the accumulation scan) once. No
    # remat: the formula counts no recomputed forward.
    r = aot.compile_config(["runs/gpu.gin"], [
        f"SEQ_LEN = {S}", f"BATCH_SIZE = {B}", "OptimizerConfig.grad_accum_steps = 1",
        "ModelConfig.remat_policy = 'none'",
        f"ModelConfig.vocab_size = {V}", f"ModelConfig.d_model = {D}", f"ModelConfig.n_heads = {N}",
        f"ModelConfig.n_kv_heads = {K}", f"ModelConfig.d_ff = {F}", "ModelConfig.n_layers = 1"], (1, 8, 1))
    print("\n" + aot.format_report("gpu.gin (small)", r))
    assert r["compiled"] and r["devices"] == 8
    n_params, param_bytes = _param_bytes_per_device(V, D, N, K, F, 1, fsdp=8)
    assert r["params"] == n_params
    _check_state_memory(r, param_bytes)
    # PaLM accounting: 6 x matmul parameters (all but the lookup tables, plus the tied LM head)
    # + 12 x layers x heads x head_dim x seq_len per token, for this device's B*S/8 tokens.
    matmul = n_params - (V + sum(METADATA)) * D + V * D
    expected = (6 * matmul + 12 * 1 * N * (D // N) * S) * B * S / 8
    # Above it: elementwise work (norms, softmax, the optimizer update) that the formula leaves out.
    assert expected <= r["flops_per_device_step"] <= 1.15 * expected


@pytest.mark.parametrize("run_cfg,model,mesh,billions,platform", [
    ("runs/gpu.gin", "models/500m.gin", (1, 8, 1), 0.54, "cuda"),
    ("runs/gpu.gin", "models/1b.gin", (1, 16, 1), 1.04, "cuda"),
    ("runs/tpu_pod.gin", "models/2b.gin", (1, 32, 1), 1.97, "tpu"),
])
def test_lowers_for_intended_mesh(run_cfg, model, mesh, billions, platform):
    r = aot.compile_config([run_cfg, model], UNUSED, mesh, compile_=False, platform=platform)
    print("\n" + aot.format_report(f"{run_cfg} + {model}", r))
    assert not r["compiled"] and r["lowered_for"] == platform and r["stablehlo_bytes"] > 0
    assert r["devices"] == math.prod(mesh) and r["dtype"] == "bfloat16"
    _check_estimate(r, billions)


@pytest.mark.slow
def test_500m_compiles_on_its_mesh():
    r = aot.compile_config(["runs/gpu.gin", "models/500m.gin"], UNUSED, (1, 8, 1))  # the test's 8 CPU devices
    print("\n" + aot.format_report("gpu.gin + 500m.gin", r))
    assert r["compiled"]
    _check_estimate(r, 0.54)
    # gin/models/500m.gin: head_dim 128 with 10 heads, 2 KV heads.
    n_params, param_bytes = _param_bytes_per_device(32768, 1280, 10, 2, 6144, 18, fsdp=8, head_dim=128)
    assert r["params"] == n_params
    _check_state_memory(r, param_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("run_cfg,model,mesh", INTENDED[1:])
def test_compiles_with_fake_devices(run_cfg, model, mesh):
    r = aot.run_in_subprocess([run_cfg, model], [], mesh, timeout_s=600)
    print("\n" + aot.format_report(f"{run_cfg} + {model}", r))
    assert r["compiled"] and r["devices"] == math.prod(mesh)
    assert r["memory_analysis_per_device"]["peak_gib"] > 0


def test_bad_mesh_is_rejected(capsys):
    assert aot_cli.main(["--gin_file", "runs/gpu.gin", "--mesh", "1,3,1", "--lower_only"]) == 1
    assert ("DataConfig.batch_size=128 does not split into 1 micro-batches (OptimizerConfig.grad_accum_steps) "
            "over the 3 batch shards of mesh (1, 3, 1)") in capsys.readouterr().err
    # 500m's 2 KV heads over tensor=4: named, not silently replicated.
    assert aot_cli.main(["--gin_file", "runs/gpu.gin", "--gin_file", "models/500m.gin", "--mesh", "1,2,4",
                         "--lower_only"]) == 1
    assert "logical axis 'heads' (dim 2 of shape (18, 1280, 2, 128), size 2)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        aot_cli.main(["--gin_file", "runs/gpu.gin", "--mesh", "8x2"])
    with pytest.raises(SystemExit):
        aot_cli.main(["--table", "docs/scaling.md", "--mesh", "1,8,1"])


def test_activation_estimate_follows_remat_attention_and_loss_chunks():
    from lime_jax.model import ModelConfig

    cfg = ModelConfig(vocab_size=32768, d_model=2560, n_layers=20, n_heads=20, n_kv_heads=4, head_dim=128,
                      d_ff=10240)
    est = {p: aot.activation_estimate(dataclasses.replace(cfg, remat_policy=p), 16, 2048)
           for p in ("none", "minimal", "save_dot_except_mlp", "save_qkv_proj", "full")}
    assert est["none"] > est["minimal"] > est["save_dot_except_mlp"] > est["save_qkv_proj"] > est["full"]
    # Full remat keeps one d_model vector per token and layer (+ one layer recomputed, + logits).
    tokens, act = 16 * 2048, 2
    layer = tokens * (10 * 2560 + 3 * 10240) * act + tokens * 20 * 2048 * 4
    assert est["full"] == 20 * tokens * 2560 * act + layer + 2 * tokens * 32768 * 4
    flash = aot.activation_estimate(dataclasses.replace(cfg, attention="pallas_gpu"), 16, 2048)
    assert est["none"] - flash == 20 * tokens * 20 * 2048 * 4  # no f32 L x L scores per layer
    chunked = aot.activation_estimate(dataclasses.replace(cfg, loss_chunk_size=256), 16, 2048)
    assert est["none"] - chunked == 2 * 16 * (2048 - 256) * 32768 * 4


@pytest.mark.slow
def test_table_is_written_between_the_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\nbefore\n{aot.TABLE_BEGIN}\nold table\n{aot.TABLE_END}\nafter\n")
    # The tiny model at a short length: the same code path as the 500m/1b/2b table, in seconds.
    table = aot.write_table(str(doc), models=["models/tiny.gin"], bindings=["SEQ_LEN = 64", "BATCH_SIZE = 16"])
    text = doc.read_text()
    assert text.startswith(f"# Title\nbefore\n{aot.TABLE_BEGIN}\n") and text.endswith(f"{aot.TABLE_END}\nafter\n")
    assert "old table" not in text and table in text
    rows = [line for line in table.splitlines() if line.startswith("| tiny.gin |")]
    assert [row.split(" | ")[2] for row in rows] == ["save_dot_except_mlp", "none"]  # runs/gpu.gin's, then off
    assert all(row.split(" | ")[3] == "2 x 64" for row in rows)  # 16 sequences over 8 devices
    assert "attention xla (config: pallas_gpu)" in table
    bad = tmp_path / "bad.md"
    bad.write_text("no markers\n")
    with pytest.raises(ValueError, match="needs one pair of marker lines"):
        aot.write_table(str(bad))


@pytest.mark.slow
def test_2b_with_remat_fits_an_80gib_gpu():
    # runs/gpu.gin as shipped (remat, scan, 16 sequences of 2048 per GPU) on one 8-GPU node.
    r = aot.compile_config(["runs/gpu.gin", "models/2b.gin"], UNUSED, (1, 8, 1))
    print("\n" + aot.format_report("gpu.gin + 2b.gin", r))
    assert r["compiled"] and r["remat_policy"] != "none"
    assert r["memory_analysis_per_device"]["peak_gib"] <= 0.9 * 80
    assert r["estimate_per_device"]["total_gib"] <= 0.9 * 80
