"""Soak: a long training run on the tiny model, checkpointing often and SIGKILLed regularly.

    python bench/soak.py                 # 30 minutes, a checkpoint a minute, a kill every 5
    python bench/soak.py --minutes 6     # the same, scaled: intervals are minutes/30 and /6

The trainer runs as `python -m lime_jax.cli.batch_log` subprocesses (`lime-jax train` logging a
digest of every batch it takes). Every kill interval (randomised +-20%, seeded) the live process gets SIGKILL and a new
one resumes from the model dir; at the end the last one gets SIGTERM (save and exit 0). Then:
- exact: every process took exactly the batches an uninterrupted loader yields from the step
  it resumed at, and the final parameters equal, bit for bit, those of one uninterrupted
  in-process run of the same number of steps;
- rss_growth_mb: the largest RSS growth of one trainer process from its first checkpoint to
  its end (leaks show as growth within a life; each kill starts a fresh process).

Last line: soak_kills=<n> soak_resumes_exact=<true|false> rss_growth_mb=<n>
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from lime_jax.cli import batch_log

VOCAB = 512
TRAIN_STEPS = 1_000_000  # the schedule's horizon; runs stop by time

def _bindings(model_dir: str, cache_dir: str, checkpoint_every: int) -> list[str]:
    return [f"MODEL_DIR = {model_dir!r}", f"TRAIN_STEPS = {TRAIN_STEPS}", f"CACHE_DIR = {cache_dir!r}",
            "SEQ_LEN = 64", "BATCH_SIZE = 8", f"CHECKPOINT_EVERY = {checkpoint_every}",
            "EVAL_EVERY = 100000000", "TrainConfig.log_every = 50", "TrainConfig.progress = False",
            "DataConfig.read_threads = 1", "CheckpointConfig.keep = 2"]


def _gin_files() -> list[str]:
    return ["runs/lime.gin", "models/tiny.gin"]


def _write_cache(out_dir: str) -> None:
    from lime_jax.data import cache

    rng = np.random.default_rng(0)
    docs = []
    for _ in range(4000):
        toks = rng.integers(2, VOCAB, int(rng.integers(8, 200)))
        toks[-1] = 1
        docs.append(np.stack([toks, 2 + toks % 50, 2 + toks % 37]).astype(np.int32))
    cache.write_cache(out_dir, docs, {"targets": VOCAB, "targets_pos": 53, "targets_ner": 40},
                      docs_per_shard=1000)


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _sealed_steps(model_dir: str) -> list[int]:
    from lime_jax.trainer import checkpoint as ckpt_lib

    d = os.path.join(model_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d)
                  if n.isdigit() and os.path.exists(os.path.join(d, n, ckpt_lib.SEAL_NAME)))


def _life(args, model_dir, cache_dir, checkpoint_every, index, seconds, final: bool):
    """One trainer process for `seconds`, then SIGKILL (or SIGTERM when `final`)."""
    log_path = os.path.join(model_dir, f"batches.{index}")
    err_path = os.path.join(model_dir, f"stderr.{index}")
    argv = [a for f in _gin_files() for a in ("--gin_file", f)]
    argv += [a for b in _bindings(model_dir, cache_dir, checkpoint_every) for a in ("--gin_bindings", b)]
    env = dict(os.environ, **{batch_log.ENV_VAR: log_path})
    with open(err_path, "w") as err:
        # Not the repo: gin would take a stray `runs/` directory there for its config package.
        proc = subprocess.Popen([sys.executable, "-m", "lime_jax.cli.batch_log", *argv], cwd=model_dir, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    t_end = time.time() + seconds
    rss_first_ckpt = None
    rss_last = None
    sealed_at_start = max(_sealed_steps(model_dir), default=0)
    while time.time() < t_end and proc.poll() is None:
        time.sleep(1.0)
        rss = _rss_mb(proc.pid)
        if rss is None:
            continue
        rss_last = rss
        if rss_first_ckpt is None and max(_sealed_steps(model_dir), default=0) > sealed_at_start:
            rss_first_ckpt = rss
    if proc.poll() is not None:
        raise RuntimeError(f"trainer exited early ({proc.returncode}): {open(err_path).read()[-3000:]}")
    proc.send_signal(signal.SIGTERM if final else signal.SIGKILL)
    rc = proc.wait(timeout=300)
    if final and rc != 0:
        raise RuntimeError(f"SIGTERM did not end the run cleanly ({rc}): {open(err_path).read()[-3000:]}")
    text = open(err_path).read()
    resumed = [ln for ln in text.splitlines() if "resumed from" in ln]
    start = int(resumed[-1].rsplit("at step ", 1)[1].split()[0]) if resumed else 0
    batches = open(log_path).read().split() if os.path.exists(log_path) else []
    growth = (rss_last - rss_first_ckpt) if rss_first_ckpt is not None and rss_last is not None else 0.0
    print(f"life {index}: resumed at {start}, took {len(batches)} batches, "
          f"{'SIGTERM' if final else 'SIGKILL'}, rss growth {growth:.1f} MB", flush=True)
    return start, batches, growth


def _reference_batches(cache_dir: str, n: int) -> list[str]:
    """The first n training batches of the loader as the trainer builds it (one process)."""
    from lime_jax.data import loader

    ds = loader.build_dataset(cache_dir, seq_len=64, batch_size=8, seed=0, shard_index=0, shard_count=1,
                              read_threads=1, tags=("pos", "ner"))
    it = iter(ds)
    return [batch_log.batch_digest(next(it)) for _ in range(n)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
    args = parser.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    work = args.workdir or tempfile.mkdtemp(prefix="lime_soak_")
    cache_dir, model_dir = os.path.join(work, "cache"), os.path.join(work, "model")
    os.makedirs(model_dir, exist_ok=True)
    _write_cache(cache_dir)
    os.chdir(work)  # see _life: gin and a stray `runs/` directory in the working directory

    total_s = args.minutes * 60
    kill_every_s = total_s / 6  # 5 minutes of 30
    ckpt_every_s = total_s / 30  # 1 minute of 30
    # Step rate from a first life: checkpoints are every N steps, N set from the rate.
    rng = random.Random(args.seed)
    t0 = time.time()
    checkpoint_every = 10 ** 6
    lives = [_life(args, model_dir, cache_dir, checkpoint_every, 0, min(60.0, kill_every_s), final=False)]
    from lime_jax.trainer import metrics as metrics_lib

    rows = metrics_lib.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
    step_s = float(np.median([r["train/step_time_s"] for r in rows if "train/step_time_s" in r]))
    checkpoint_every = max(1, int(ckpt_every_s / step_s))
    print(f"step {step_s * 1e3:.1f} ms: a checkpoint every {checkpoint_every} steps (~{ckpt_every_s:.0f} s), "
          f"a kill every ~{kill_every_s:.0f} s", flush=True)
    index = 1
    while time.time() - t0 < total_s:
        left = total_s - (time.time() - t0)
        seconds = min(left, kill_every_s * rng.uniform(0.8, 1.2))
        final = left - seconds < kill_every_s * 0.2
        seconds = left if final else seconds
        lives.append(_life(args, model_dir, cache_dir, checkpoint_every, index, seconds, final))
        index += 1
        if final:
            break
    kills = len(lives) - 1

    from lime_jax.trainer import checkpoint as ckpt_lib
    from lime_jax.trainer import train as train_lib

    final_step = ckpt_lib.Checkpointer(model_dir, read_only=True).latest_step()
    # A life killed before its first checkpoint may have read past the final step: compare it too.
    ref_batches = _reference_batches(cache_dir, max(s + len(b) for s, b, _ in lives))
    order_ok = all(b == ref_batches[s:s + len(b)] for s, b, _ in lives) and \
        lives[-1][0] + len(lives[-1][1]) == final_step
    ref_dir = os.path.join(work, "reference")
    print(f"reference: {final_step} uninterrupted steps", flush=True)
    train_lib.train(_gin_files(), _bindings(ref_dir, cache_dir, 10 ** 8), stop_after_steps=final_step)

    from lime_jax.model import ModelConfig, abstract_model

    import gin
    import jax

    cfg = ModelConfig()  # the tiny model, still bound from the reference run's configs
    gin.clear_config()
    _, abstract = abstract_model(cfg)
    got, step = ckpt_lib.restore_params(model_dir, abstract)
    want, ref_step = ckpt_lib.restore_params(ref_dir, abstract)
    params_ok = step == ref_step == final_step and all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    print(f"final step {final_step}: batch order {'exact' if order_ok else 'WRONG'}, "
          f"params {'bitwise equal' if params_ok else 'DIFFERENT'}; work dir {work}", flush=True)
    growth = max(g for _, _, g in lives[1:]) if len(lives) > 1 else lives[0][2]
    print(f"soak_kills={kills} soak_resumes_exact={str(order_ok and params_ok).lower()} "
          f"rss_growth_mb={growth:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
