"""Training tokens/s and MFU of the quickstart model on this machine's devices.

Both figures come from this one run (the machine may be shared, so only ratios are stable):
  peak:  the best FLOP/s of a large jitted f32 matmul (N x N @ N x N, 2 N^3 FLOPs) on the same
         devices, measured before and after training (a busy moment would understate it), used
         as the MFU denominator instead of a datasheet number;
  train: `lime_jax.trainer.train.train` end to end (Grain loader, jitted sharded step, metrics one step
         late) with the LIME run config and the quickstart model size (gin/runs/quickstart.gin)
         on a synthetic cache, no checkpoints or evals inside the timed steps. tokens/s counts
         all B*L positions per step; MFU uses the FLOP count stated in lime_jax/trainer/metrics.py.

Last line: train_mfu_vs_matmul_peak=<fraction> train_tps=<n> peak_gflops=<n>
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def matmul_peak_flops(n: int, reps: int) -> float:
    """Best observed FLOP/s of an f32 n x n matmul over all devices (one per device)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
    sh = NamedSharding(mesh, PartitionSpec("d"))
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(k1, (len(devices), n, n), jnp.float32), sh)
    b = jax.device_put(jax.random.normal(k2, (len(devices), n, n), jnp.float32), sh)
    f = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y), out_shardings=sh)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 * len(devices) / best


def synthetic_cache(out_dir: str, num_docs: int, vocab_size: int) -> None:
    from lime_jax.data import cache

    rng = np.random.default_rng(0)
    lengths = rng.integers(64, 1024, num_docs)
    docs = [np.stack([rng.integers(2, vocab_size, n), rng.integers(1, 53, n),
                      rng.integers(1, 40, n)]).astype(np.int32) for n in lengths]
    cache.write_cache(out_dir, docs, {"targets": vocab_size, "targets_pos": 53, "targets_ner": 40})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="timed train steps (after the first)")
    p.add_argument("--matmul_n", type=int, default=2048)
    p.add_argument("--matmul_reps", type=int, default=10)
    p.add_argument("--gin_bindings", action="append", default=[], help="extra gin bindings")
    args = p.parse_args(argv)

    from lime_jax import host_memory
    host_memory.keep_freed_memory()  # as `lime-jax train` runs: before JAX starts (see host_memory.py)
    from lime_jax.trainer import gin_config
    from lime_jax.trainer import train as train_lib
    from lime_jax.model import ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = os.path.join(tmp, "cache")
        gin_config.parse_gin(["runs/quickstart.gin"], [
            f"MODEL_DIR = '{tmp}/model'", f"CACHE_DIR = '{cache_dir}'"] + args.gin_bindings)
        vocab = ModelConfig().vocab_size
        synthetic_cache(cache_dir, 400, vocab)
        peak = matmul_peak_flops(args.matmul_n, args.matmul_reps)
        import jax

        summary = train_lib.train(["runs/quickstart.gin"], [
            f"MODEL_DIR = '{tmp}/model'", f"CACHE_DIR = '{cache_dir}'", "EVAL_CACHE_DIR = None",
            f"TRAIN_STEPS = {args.steps + 1}", f"CHECKPOINT_EVERY = {10 * (args.steps + 1)}",
            f"TrainConfig.peak_flops_per_device = {peak / jax.device_count()}", "TrainConfig.progress = False",
        ] + args.gin_bindings)
    cfg = ModelConfig()
    print(f"model: {summary['params']} params, vocab {cfg.vocab_size}, d_model {cfg.d_model}, "
          f"{cfg.n_layers} layers, dtype {cfg.dtype}; devices: {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}; {summary['step']} steps")
    peak_after = matmul_peak_flops(args.matmul_n, args.matmul_reps)
    best = max(peak, peak_after)
    print(f"matmul peak {best / 1e9:.1f} GFLOP/s (f32 {args.matmul_n}^2; {peak / 1e9:.1f} before training, "
          f"{peak_after / 1e9:.1f} after)")
    mfu = summary["mfu"] * peak / best  # the trainer's MFU used the peak measured before
    print(f"train_mfu_vs_matmul_peak={mfu:.4f} train_tps={summary['tokens_per_s']:.0f} "
          f"peak_gflops={best / 1e9:.1f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
