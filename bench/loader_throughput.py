"""Packed tokens/s the Grain loader delivers vs tokens/s the quickstart model trains on.

Both figures come from this one run (the machine is shared, so only the ratio is stable):
  loader: batches from `lime_jax.data.loader.build_dataset` over a cache (`--cache DIR`, or a
          synthetic cache of realistic size written to a temp dir), counting real (non-pad)
          tokens per second;
  train:  a jitted forward + backward of the quickstart model (gin/models/quickstart.gin with
          POS/NER tables) on batches of the same shape, tokens per second.

Last line: loader_to_train_ratio=<loader tokens/s / train tokens/s> loader_tps=<n>
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_cache(out_dir: str, num_docs: int, vocab_size: int, seed: int = 0) -> None:
    """Documents with a long-tailed length distribution (mean ~600 pieces, like speeches
    split into paragraphs and whole speeches mixed)."""
    from lime_jax.data import cache

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=5.8, sigma=1.0, size=num_docs), 4, 20000).astype(int)
    docs = [np.stack([rng.integers(2, vocab_size, n), rng.integers(1, 53, n),
                      rng.integers(1, 40, n)]).astype(np.int32) for n in lengths]
    cache.write_cache(out_dir, docs, {"targets": vocab_size, "targets_pos": 53,
                                      "targets_ner": 40}, docs_per_shard=500)


def loader_tps(cache_dir: str, seq_len: int, batch_size: int, seconds: float,
               workers: int, threads: int) -> tuple[float, float]:
    """(real packed tokens/s, real tokens per batch)."""
    from lime_jax.data import loader

    ds = loader.build_dataset(cache_dir, seq_len, batch_size, shift=0, seed=0,
                              shard_index=0, shard_count=1, worker_count=workers,
                              read_threads=threads)
    it = iter(ds)
    for _ in range(3):  # start-up (threads, worker processes) is not steady state
        next(it)
    tokens, batches, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        tokens += int(next(it)["decoder_loss_weights"].sum())
        batches += 1
    tps = tokens / (time.perf_counter() - t0)
    if workers:
        it.close()
    return tps, tokens / batches


def train_tps(seq_len: int, batch_size: int, seconds: float, tokens_per_batch: float) -> float:
    """Steps/s of the jitted forward+backward times the real tokens a loader batch holds."""
    import gin
    import jax

    from lime_jax.model import (ModelConfig, abstract_model, batch_sharding,
                                create_sharded_model, jit_loss_fn, make_mesh, state_shardings,
                                synthetic_batch)

    gin.parse_config_file(os.path.join(REPO, "gin", "models", "quickstart.gin"))
    cfg = ModelConfig(metadata=(("pos", 53), ("ner", 40)))
    mesh = make_mesh((1, 1, 1))
    graphdef, state = create_sharded_model(cfg, mesh)
    step = jit_loss_fn(graphdef, state_shardings(abstract_model(cfg)[1], mesh), mesh)
    batch = jax.device_put(synthetic_batch(cfg, batch_size, seq_len), batch_sharding(mesh))
    jax.block_until_ready(step(state, batch))  # compile
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        jax.block_until_ready(step(state, batch))
        steps += 1
    return steps * tokens_per_batch / (time.perf_counter() - t0)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", help="cache dir (default: write a synthetic one to a temp dir)")
    p.add_argument("--docs", type=int, default=4000, help="documents in the synthetic cache")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0, help="measuring time per side")
    p.add_argument("--workers", type=int, default=0, help="loader worker processes")
    p.add_argument("--threads", type=int, default=4, help="loader read threads")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache
        if cache_dir is None:
            cache_dir = os.path.join(tmp, "cache")
            t0 = time.perf_counter()
            synthetic_cache(cache_dir, args.docs, vocab_size=4096)
            print(f"synthetic cache: {args.docs} docs in {time.perf_counter() - t0:.1f}s")
        ltps, per_batch = loader_tps(cache_dir, args.seq_len, args.batch_size, args.seconds,
                          args.workers, args.threads)
        print(f"loader: {ltps:,.0f} packed tokens/s (seq_len {args.seq_len}, batch "
              f"{args.batch_size}, workers {args.workers}, threads {args.threads}; "
              f"{per_batch / (args.seq_len * args.batch_size):.1%} of positions are real)")
        ttps = train_tps(args.seq_len, args.batch_size, args.seconds, per_batch)
        print(f"train:  {ttps:,.0f} tokens/s (quickstart model, jitted forward+backward)")
    print(f"loader_to_train_ratio={ltps / ttps:.2f} loader_tps={ltps:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
