"""Cost of LIME's metadata tables over the baseline: jitted train-step time, quickstart size, CPU.

Both arms share every weight except the metadata tables, see the same packed batch, and run
interleaved in one process (alternating which goes first) so machine load hits both alike.
A step is forward + backward (`jax.value_and_grad` of the loss). The last line is

    lime_step_time_ratio=<median lime / median baseline> param_overhead_pct=<n>

Usage: .venv/bin/python bench/embed_overhead.py [--steps 60] [--batch-size 16] [--length 128]
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import gin
import jax
from flax import nnx

from lime_jax.model import Decoder, ModelConfig, loss_and_metrics, synthetic_batch

QUICKSTART_GIN = pathlib.Path(__file__).resolve().parents[1] / "gin" / "models" / "quickstart.gin"
METADATA = (("pos", 53), ("ner", 40))  # tag vocab sizes of docs/architecture.md


def train_step(graphdef):
    @jax.jit
    def step(state, batch):
        def objective(state):
            return loss_and_metrics(nnx.merge(graphdef, state), batch)[0]
        return jax.value_and_grad(objective)(state)
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args(argv)

    gin.parse_config_file(str(QUICKSTART_GIN))
    lime_cfg = ModelConfig(metadata=METADATA)
    base_cfg = lime_cfg.baseline()
    lime = Decoder(lime_cfg, rngs=nnx.Rngs(0))
    base = Decoder(base_cfg, rngs=nnx.Rngs(1))
    _, _, rest = nnx.split(lime, nnx.PathContains("tables"), ...)
    nnx.update(base, rest)  # identical non-metadata weights

    batch = synthetic_batch(lime_cfg, args.batch_size, args.length, seed=0)
    base_batch = {k: v for k, v in batch.items() if k[len("decoder_input_"):] not in lime_cfg.metadata_names}
    batch, base_batch = jax.device_put(batch), jax.device_put(base_batch)
    arms = {}
    for name, model, b in (("lime", lime, batch), ("baseline", base, base_batch)):
        graphdef, state = nnx.split(model)
        arms[name] = (train_step(graphdef), state, b)

    def run(name: str) -> float:
        step, state, b = arms[name]
        t0 = time.perf_counter()
        jax.block_until_ready(step(state, b))
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        run("lime"), run("baseline")
    times: dict[str, list[float]] = {"lime": [], "baseline": []}
    for i in range(args.steps):
        order = ("lime", "baseline") if i % 2 == 0 else ("baseline", "lime")
        for name in order:
            times[name].append(run(name))

    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch_size * args.length
    print(f"quickstart: {lime.param_count():,} params (LIME), batch {args.batch_size}x{args.length}, "
          f"{args.steps} interleaved steps per arm on {jax.devices()[0].platform}")
    for k in ("baseline", "lime"):
        print(f"{k:>8}: median {1e3 * med[k]:.1f} ms/step ({tokens / med[k]:,.0f} tokens/s)")
    print(f"lime_step_time_ratio={med['lime'] / med['baseline']:.4f} "
          f"param_overhead_pct={100 * lime.param_overhead():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
