"""Tokens/s of the quickstart model: 2 processes x 4 CPU devices (gloo over loopback) against
1 process x 8 devices, on the same machine, same global batches.

    .venv/bin/python bench/multihost.py [--steps 30]

Both runs train `runs/quickstart.gin` on a synthetic cache (vocab 4096, POS/NER tags) with
`process_dataset.data_shards = 2`, so they see identical global batches; step times are the
median over the steps after the first few (compilation, warm-up). The two runs go one after
the other, so the ratio is measured within one invocation. Last line:
`multihost_tps_ratio=<2proc/1proc> losses_match=<true|false>`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np

from lime_jax.trainer import distributed
from lime_jax.trainer import metrics as metrics_lib
from lime_jax.data import cache

VOCAB = 4096
SEQ_LEN = 128
BATCH = 16
SKIP = 3  # first steps: compile + warm-up


def write_cache(out_dir: str, n_docs: int = 600, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        toks = rng.zipf(1.3, size=int(rng.integers(40, 400))) % (VOCAB - 2) + 2
        toks[-1] = 1  # EOS
        docs.append(np.stack([toks, 2 + toks % 50, 2 + toks % 37]).astype(np.int32))
    cache.write_cache(out_dir, docs, {"targets": VOCAB, "targets_pos": 53, "targets_ner": 40},
                      docs_per_shard=200)


def run(num_processes: int, devices: int, model_dir: str, cache_dir: str, steps: int) -> dict:
    argv = [sys.executable, "-m", "lime_jax.cli.train", "--gin_file", "runs/quickstart.gin",
            f"--gin.MODEL_DIR={model_dir}", f"--gin.CACHE_DIR={cache_dir}", f"--gin.TRAIN_STEPS={steps}",
            f"--gin.CHECKPOINT_EVERY={steps}", f"--gin.SEQ_LEN={SEQ_LEN}", f"--gin.BATCH_SIZE={BATCH}",
            "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.progress=False", "--gin.DataConfig.read_threads=1",
            "--gin.process_dataset.data_shards=2"]
    log_dir = os.path.join(model_dir, "logs")
    codes = distributed.wait_all(distributed.spawn_local(argv, num_processes, devices, log_dir=log_dir),
                                 timeout_s=1200)
    if any(codes):
        tail = open(os.path.join(log_dir, "process_0.log")).read()[-3000:]
        raise SystemExit(f"{num_processes}-process run failed with exit codes {codes}:\n{tail}")
    rows = [r for r in metrics_lib.read_jsonl(os.path.join(model_dir, "metrics.jsonl")) if "train/loss" in r]
    times = [r["train/step_time_s"] for r in rows if "train/step_time_s" in r][SKIP:]
    step_s = statistics.median(times)
    return {"losses": {r["step"]: r["train/loss"] for r in rows}, "step_s": step_s,
            "tps": BATCH * SEQ_LEN / step_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        cache_dir = os.path.join(root, "cache")
        write_cache(cache_dir)
        one = run(1, 8, os.path.join(root, "one"), cache_dir, args.steps)
        two = run(2, 4, os.path.join(root, "two"), cache_dir, args.steps)
    steps = sorted(one["losses"])
    match = steps == sorted(two["losses"]) and bool(np.allclose(
        [two["losses"][s] for s in steps], [one["losses"][s] for s in steps], rtol=1e-4, atol=1e-5))
    print(f"1 process x 8 devices: {one['tps']:.0f} tokens/s ({one['step_s'] * 1e3:.1f} ms/step); "
          f"2 processes x 4 devices: {two['tps']:.0f} tokens/s ({two['step_s'] * 1e3:.1f} ms/step); "
          f"{len(steps)} steps, final loss {one['losses'][steps[-1]]:.4f} / {two['losses'][steps[-1]]:.4f}")
    print(f"multihost_tps_ratio={two['tps'] / one['tps']:.3f} losses_match={str(match).lower()}")


if __name__ == "__main__":
    main()
