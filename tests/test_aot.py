"""The accelerator configs lower and compile for meshes of their intended size (no such devices
here: AbstractMesh lowering in-process, fake CPU devices for compiling), memory printed."""
import math

import pytest

from lime_jax.trainer import aot
from lime_jax.trainer import train as train_lib

# (run config, model, intended mesh): 500M on one 8-GPU node, 1B on two nodes, 2B on a
# 32-chip TPU slice.
INTENDED = [("runs/gpu.gin", "models/500m.gin", (1, 8, 1)),
            ("runs/gpu.gin", "models/1b.gin", (1, 16, 1)),
            ("runs/tpu_pod.gin", "models/2b.gin", (1, 32, 1))]
UNUSED = ["MODEL_DIR = 'unused'", "CACHE_DIR = 'unused'", "TRAIN_STEPS = 1000"]


def _check_estimate(r, billions):
    assert r["params"] == pytest.approx(billions * 1e9, rel=0.1)
    e = r["estimate_per_device"]
    # f32 params split evenly over the fsdp axis (only tiny tables are replicated).
    assert e["params_gib"] * r["devices"] == pytest.approx(r["params"] * 4 / 2**30, rel=0.02)
    assert e["opt_state_gib"] == pytest.approx(2 * e["params_gib"], rel=0.02)  # Adam's two moments


@pytest.mark.parametrize("run_cfg,model,mesh,billions,platform", [
    ("runs/gpu.gin", "models/500m.gin", (1, 8, 1), 0.54, "cuda"),
    ("runs/gpu.gin", "models/1b.gin", (1, 16, 1), 1.04, "cuda"),
    ("runs/tpu_pod.gin", "models/2b.gin", (1, 32, 1), 1.97, "tpu"),
])
def test_lowers_for_intended_mesh(run_cfg, model, mesh, billions, platform):
    train_lib.parse_gin([run_cfg, model], UNUSED)
    r = aot.compile_train_step(mesh, compile_=False, platform=platform)
    print("\n" + aot.format_report(f"{run_cfg} + {model}", r))
    assert not r["compiled"] and r["lowered_for"] == platform and r["stablehlo_bytes"] > 0
    assert r["devices"] == math.prod(mesh) and r["dtype"] == "bfloat16"
    _check_estimate(r, billions)


@pytest.mark.slow
def test_500m_compiles_on_its_mesh():
    train_lib.parse_gin(["runs/gpu.gin", "models/500m.gin"], UNUSED)
    r = aot.compile_train_step((1, 8, 1))  # the test process has 8 CPU devices
    print("\n" + aot.format_report("gpu.gin + 500m.gin", r))
    assert r["compiled"]
    _check_estimate(r, 0.54)
    m = r["memory_analysis_per_device"]
    # Donation: parameters and optimizer state are updated in place.
    assert m["alias_gib"] == pytest.approx(m["output_gib"], rel=0.01)
    assert m["argument_gib"] >= 3 * r["estimate_per_device"]["params_gib"]


@pytest.mark.slow
@pytest.mark.parametrize("run_cfg,model,mesh", INTENDED[1:])
def test_compiles_with_fake_devices(run_cfg, model, mesh):
    r = aot.run_in_subprocess(["--gin_file", run_cfg, "--gin_file", model,
                               "--mesh", ",".join(map(str, mesh))], math.prod(mesh), timeout_s=600)
    print("\n" + aot.format_report(f"{run_cfg} + {model}", r))
    assert r["compiled"] and r["devices"] == math.prod(mesh)
    assert r["memory_analysis_per_device"]["peak_gib"] > 0


def test_bad_mesh_is_rejected(capsys):
    assert aot.main(["--gin_file", "runs/gpu.gin", "--mesh", "1,3,1", "--lower_only"]) == 1
    assert "does not split into 4 micro-batches over the 3 batch shards" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        aot.main(["--gin_file", "runs/gpu.gin", "--mesh", "8x2"])
