"""GPU check (issue 15): training tokens/s, MFU and LIME's step-time overhead on one accelerator.

    .venv/bin/python bench/gpu_check.py [--model models/500m.gin] [--seq-len 2048] [--batch 8] [--steps 20]
        [--gin.ModelConfig.remat_policy="'none'"] ...

Prepared for the device tool's H200 (at most ~8 minutes there); on a CPU run it with a small
model to check it works (`--model models/tiny.gin --seq-len 64 --batch 4 --steps 3`).
Builds the LIME model of the given size with gin/runs/gpu.gin's settings (bf16 compute, f32
params, Pallas flash attention with segment ids, remat, scanned layers; `--gin.X=V` overrides
any of them) and the same model without tables (the baseline), each as the trainer builds it (state
created sharded on a mesh of every device JAX sees, one jitted train step with the state donated),
then times their steps interleaved on one synthetic packed batch, so both see the same machine.
MFU is against the device's dense bf16 peak (lime_jax/trainer/metrics.py, KNOWN_PEAK_FLOPS; nan
when the device is not listed) with the trainer's FLOP count (model FLOPs: remat's recompute
is not counted, as MaxText counts it).

Last line: gpu_mfu=<n> gpu_tokens_per_s=<n> lime_step_time_ratio=<median lime / median baseline>
attention=<impl> remat=<policy>
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(cfg, steps: int, mesh, rules):
    """(jitted train step, sharded fresh state, param count) of one arm, as the trainer makes them."""
    import math

    from flax import nnx

    from lime_jax.model import abstract_model, batch_sharding
    from lime_jax.trainer import optim
    from lime_jax.trainer import state as state_lib
    from lime_jax.trainer import step as step_lib

    tx, schedule = optim.make_optimizer(optim.OptimizerConfig(), steps)
    graphdef, abstract_params = abstract_model(cfg, rules)
    shardings = state_lib.train_state_shardings(state_lib.abstract_train_state(abstract_params, tx), mesh, rules)
    state = state_lib.init_train_state(cfg, tx, mesh, rules, shardings, seed=0)
    step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, schedule), shardings,
                                   batch_sharding(mesh, rules))
    n_params = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(abstract_params))
    return step, state, n_params


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Prepared"):])
    p.add_argument("--model", default="models/500m.gin", help="model size config under gin/")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="sequences per step (over all devices)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per arm, interleaved")
    args, rest = p.parse_known_args(argv)
    sys.path.insert(0, REPO)
    import jax

    from lime_jax.model import ModelConfig, make_mesh, sharding_rules, synthetic_batch
    from lime_jax.model.loss import batch_metadata_keys
    from lime_jax.trainer import gin_config, loop  # noqa: F401 (loop registers every configurable the configs bind)
    from lime_jax.trainer import metrics as metrics_lib

    gin_config.parse_gin(["runs/gpu.gin", args.model], ["MODEL_DIR = '/tmp/gpu_check'", "CACHE_DIR = '/tmp/none'",
                                                         f"TRAIN_STEPS = {args.steps + 1}",
                                                         *gin_config.bindings_from_flags(rest)])
    lime_cfg = ModelConfig()
    mesh, rules = make_mesh((1, jax.device_count(), 1)), sharding_rules()
    batch = synthetic_batch(lime_cfg, args.batch, args.seq_len)
    arms = {"lime": lime_cfg, "baseline": lime_cfg.baseline()}
    built = {name: build(cfg, args.steps + 1, mesh, rules) for name, cfg in arms.items()}
    feeds = {"lime": batch, "baseline": {k: v for k, v in batch.items() if k not in batch_metadata_keys(batch)}}
    times: dict[str, list[float]] = {name: [] for name in arms}
    states = {name: b[1] for name, b in built.items()}
    with jax.set_mesh(mesh):
        for i in range(args.steps + 1):  # step 0 compiles: untimed
            for name in arms:
                t0 = time.perf_counter()
                states[name], m = built[name][0](states[name], feeds[name])
                jax.block_until_ready(m["loss"])
                if i:
                    times[name].append(time.perf_counter() - t0)
    t_lime, t_base = statistics.median(times["lime"]), statistics.median(times["baseline"])
    tokens = args.batch * args.seq_len
    flops = metrics_lib.flops_per_token(lime_cfg, built["lime"][2], args.seq_len) * tokens
    kind = jax.devices()[0].device_kind
    peak = metrics_lib.peak_flops_for(kind)
    mfu = flops / t_lime / (peak * jax.device_count()) if peak else float("nan")
    print(f"{jax.device_count()} x {kind}; model {args.model}: {built['lime'][2]:,} params (LIME), d_model "
          f"{lime_cfg.d_model}, {lime_cfg.n_layers} layers, dtype {lime_cfg.dtype}; batch {args.batch} x "
          f"{args.seq_len}; median step lime {t_lime * 1e3:.1f} ms, baseline {t_base * 1e3:.1f} ms over "
          f"{args.steps} interleaved steps; peak {peak or 'unknown'} FLOP/s per device")
    print(f"gpu_mfu={mfu:.4f} gpu_tokens_per_s={tokens / t_lime:.0f} lime_step_time_ratio={t_lime / t_base:.4f} "
          f"attention={lime_cfg.attention} remat={lime_cfg.remat_policy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
