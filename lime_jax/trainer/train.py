"""The lime_jax trainer: gin-configured, one jitted sharded step, Orbax checkpoints, metrics.

    lime-jax train --gin_file gin/runs/lime.gin --gin.MODEL_DIR=/tmp/run --gin.CACHE_DIR=...
    python -m lime_jax.trainer.train --gin_file runs/lime.gin --gin_bindings "TRAIN_STEPS = 100"

In-process use (the quickstart): `train(config_files, bindings) -> summary dict`.

Loop invariants:
- The train state (params, optimizer state, `{"step", "rng"}`) is built sharded from abstract
  shapes and updated by one `jax.jit` with in/out shardings and donation.
- Step metrics are fetched one step late (the device always has the next step queued); the
  only other host syncs are checkpoint saves and evals.
- Checkpoint step N holds the state after N optimizer updates plus the data iterator position
  after N batches, so resuming replays exactly the same batches with the same state.
"""
from __future__ import annotations

import argparse
import ast
import itertools
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lime_jax.trainer import checkpoint as ckpt_lib
from lime_jax.trainer import distributed
from lime_jax.trainer import metrics as metrics_lib
from lime_jax.trainer import optim
from lime_jax.data import loader
from lime_jax.data.cache import CacheError
from lime_jax.model import ModelConfig, abstract_model, create_sharded_model, loss_and_metrics, sharding
from lime_jax.model.loss import batch_metadata_keys

log = logging.getLogger("lime_jax.trainer.train")

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A source checkout has the configs in gin/ beside the package; a wheel ships them as lime_jax/gin.
GIN_DIR = next((d for d in (os.path.join(os.path.dirname(_PACKAGE_DIR), "gin"), os.path.join(_PACKAGE_DIR, "gin"))
                if os.path.isdir(d)), os.path.join(_PACKAGE_DIR, "gin"))
_REQUIRED_MACRO_RE = re.compile(r"^([A-Za-z_][\w.]*)\s*=\s*%gin\.REQUIRED\s*$", re.MULTILINE)


class TrainingError(RuntimeError):
    """Training stopped on a bad state (non-finite loss, gradients or parameters)."""


class ConfigError(ValueError):
    """The gin configuration is incomplete or invalid."""


# ----------------------------------------------------------------------------- config parsing


def parse_gin(config_files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parses run configs; unknown configurables/parameters and unset REQUIRED macros raise.

    Relative config paths are looked up in the current directory, then in the repo's `gin/`.
    """
    gin.clear_config()
    # The repo's gin/ first: gin tries the bare path before the search path, and for
    # `include 'runs/x.gin'` that imports any `runs` directory in the working directory as a
    # Python package (a quickstart's output, say), which fails.
    if GIN_DIR not in gin.config._LOCATION_PREFIXES:
        gin.config._LOCATION_PREFIXES.insert(0, GIN_DIR)
    files = [_find_gin_file(f) for f in config_files]
    root = logging.getLogger()
    root.addFilter(_quiet_gin_path_probe)
    try:
        gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False, skip_unknown=False)
    finally:
        root.removeFilter(_quiet_gin_path_probe)
    missing = _REQUIRED_MACRO_RE.findall(gin.config_str())
    if missing:
        raise ConfigError(
            "required gin macro(s) not set: " + ", ".join(missing) +
            "; set each with --gin.NAME=VALUE (e.g. --gin." + missing[0] + "=...) or in a --gin_file")
    gin.finalize()


def _quiet_gin_path_probe(record: logging.LogRecord) -> bool:
    # gin probes each include as a Python-package resource first and logs an ERROR for every
    # miss before finding the file in the search path; those are not errors.
    return not record.getMessage().startswith("Path not found:")


def _find_gin_file(path: str) -> str:
    for candidate in (path, os.path.join(GIN_DIR, path)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"gin file {path!r} not found (looked in . and {GIN_DIR})")


def _binding_from_flag(key: str, value: str) -> str:
    """`--gin.KEY=VALUE` -> a gin binding; a bare word or path becomes a string literal."""
    if not value.startswith(("%", "@")):
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError):
            value = repr(value)
    return f"{key} = {value}"


def parse_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    parser = argparse.ArgumentParser(
        prog="lime-jax train",
        description="Train a lime_jax model from gin configs (T5X-style flags). "
                    "Extra flags --gin.KEY=VALUE bind a macro or parameter, e.g. --gin.MODEL_DIR=/tmp/run.")
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin config file (repeatable; relative paths also searched in the repo's gin/)")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="a gin binding line such as 'TRAIN_STEPS = 100' (repeatable)")
    distributed.add_flags(parser)
    args, rest = parser.parse_known_args(list(argv))
    bindings = list(args.gin_bindings) + distributed.flag_bindings(args)
    for arg in rest:
        if not arg.startswith("--gin.") or "=" not in arg:
            parser.error(f"unrecognized argument {arg!r} (expected --gin.KEY=VALUE)")
        key, value = arg[len("--gin."):].split("=", 1)
        bindings.append(_binding_from_flag(key, value))
    if not args.gin_file:
        parser.error("at least one --gin_file is required (e.g. --gin_file runs/lime.gin)")
    return args.gin_file, bindings


# ----------------------------------------------------------------------------- the train step


def _resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    shape = [int(s) for s in shape]
    if shape.count(-1) > 1:
        raise ConfigError(f"train.mesh_shape={tuple(shape)}: at most one -1 allowed")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if num_devices % rest:
            raise ConfigError(f"train.mesh_shape={tuple(shape)} does not divide {num_devices} devices")
        shape[shape.index(-1)] = num_devices // rest
    return tuple(shape)


def drop_metadata(batch: dict, key_data: jax.Array, step: jax.Array, rate: float) -> dict:
    """Sets all tags of a random `rate` of the positions to PAD (0, which adds nothing), so a
    model also learns to predict without metadata, e.g. unguided LIME+1 decoding.

    The mask depends only on the run's RNG and the step: a resumed run drops the same positions.
    """
    tag_keys = batch_metadata_keys(batch)
    if not rate or not tag_keys:
        return batch
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
    keep = ~jax.random.bernoulli(key, rate, batch[tag_keys[0]].shape)
    return {**batch, **{k: jnp.where(keep, batch[k], 0) for k in tag_keys}}


def make_train_step(graphdef, tx, schedule, accum_steps: int, metadata_dropout: float = 0.0):
    """`step(params, opt_state, train, batch) -> (params, opt_state, train, metrics)` (unjitted)."""

    def objective(params, batch):
        return loss_and_metrics(nnx.merge(graphdef, params), batch)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def accumulated(params, batch):
        # Micro-batches are weighted by their target-token counts, so the result equals the
        # gradient of the token-mean loss over the whole batch.
        micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

        def body(carry, mb):
            g_sum, m_sum = carry
            (_, m), g = grad_fn(params, mb)
            n = m["num_tokens"]
            g_sum = jax.tree.map(lambda a, b: a + b * n, g_sum, g)
            m_sum = {k: m_sum[k] + m[k] for k in ("loss_sum", "num_tokens", "num_correct")}
            return (g_sum, m_sum), None

        zeros_g = jax.tree.map(jnp.zeros_like, params)
        zeros_m = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "num_tokens", "num_correct")}
        (g_sum, m_sum), _ = jax.lax.scan(body, (zeros_g, zeros_m), micro)
        denom = jnp.maximum(m_sum["num_tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        return dict(m_sum, loss=m_sum["loss_sum"] / denom), grads

    def step(params, opt_state, train, batch):
        batch = drop_metadata(batch, train["rng"], train["step"], metadata_dropout)
        if accum_steps == 1:
            (_, m), grads = grad_fn(params, batch)
        else:
            m, grads = accumulated(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        out = {
            "loss": m["loss"],
            "accuracy": m["num_correct"] / jnp.maximum(m["num_tokens"], 1.0),
            "num_tokens": m["num_tokens"],
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "lr": schedule(train["step"]),
        }
        return params, opt_state, {"step": train["step"] + 1, "rng": train["rng"]}, out

    return step


def make_eval_step(graphdef):
    def step(params, batch):
        _, m = loss_and_metrics(nnx.merge(graphdef, params), batch)
        return {k: m[k] for k in ("loss_sum", "num_tokens", "num_correct")}

    return step


# ----------------------------------------------------------------------------- the loop


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal() needs it
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@gin.configurable(denylist=["stop_after_steps"])
def run(
    model_dir: str = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    cache_dir: str = gin.REQUIRED,
    seq_len: int = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    eval_cache_dir: str | None = None,
    eval_every: int = 1000,
    eval_batches: int | None = 16,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 3,
    keep_best_checkpoint: bool = False,
    async_checkpointing: bool = True,
    seed: int = 0,
    metadata_shift: int = 0,
    metadata_dropout: float = 0.0,
    mesh_shape: Sequence[int] = (-1, 1, 1),
    log_every: int = 10,
    peak_flops_per_device: float | None = None,
    read_threads: int = 4,
    worker_count: int = 0,
    check_cache_hashes: bool = True,
    initialize_distributed: bool = False,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Trains (or resumes) the gin-configured model; returns a summary dict.

    `batch_size` is global (split over processes); the model comes from the gin-bound
    `ModelConfig`, the optimizer from `OptimizerConfig`, the logical-axis rules from
    `sharding_rules`. `stop_after_steps` (Python callers only) stops this invocation after that
    many steps with a checkpoint, as a preemption would.
    """
    t_start = time.perf_counter()
    # Flags, JAX_* variables or a cluster launcher make this one of several processes.
    distributed.distributed_setup(force=initialize_distributed)
    for name, value in (("train_steps", train_steps), ("seq_len", seq_len), ("batch_size", batch_size),
                        ("eval_every", eval_every), ("checkpoint_every", checkpoint_every), ("log_every", log_every)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"run.{name} must be a positive int, got {value!r}")
    if not 0.0 <= metadata_dropout < 1.0:
        raise ConfigError(f"run.metadata_dropout must be in [0, 1), got {metadata_dropout!r}")
    cfg = ModelConfig()
    opt_cfg = optim.OptimizerConfig()
    rules = sharding.sharding_rules()
    n_proc = jax.process_count()
    if batch_size % (n_proc * opt_cfg.grad_accum_steps):
        raise ConfigError(f"run.batch_size={batch_size} must be divisible by processes ({n_proc}) x "
                          f"OptimizerConfig.grad_accum_steps ({opt_cfg.grad_accum_steps})")
    is_chief = jax.process_index() == 0
    distributed.quiet_non_chief_logs()
    os.makedirs(model_dir, exist_ok=True)

    mesh = sharding.make_mesh(_resolve_mesh_shape(mesh_shape, jax.device_count()))
    data_sharding = sharding.batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    # Data first: a cache that does not fit the model config fails before any compile.
    expected_sizes = {"targets": cfg.vocab_size, **{f"targets_{n}": s for n, s in cfg.metadata}}
    data_kwargs = dict(seq_len=seq_len, batch_size=batch_size // n_proc, shift=metadata_shift,
                       tags=cfg.metadata_names, expected_vocab_sizes=expected_sizes,
                       check_hashes=check_cache_hashes, read_threads=read_threads)
    train_ds = distributed.process_dataset(cache_dir, seed=seed, worker_count=worker_count, **data_kwargs)
    eval_ds = None
    if eval_cache_dir:
        eval_ds = loader.build_dataset(eval_cache_dir, shuffle=False, num_epochs=1, **data_kwargs)
    else:
        log.warning("run.eval_cache_dir is not set: no held-out evaluation")
    data_iter = iter(train_ds)

    # Abstract shapes -> shardings -> state built (or restored) directly sharded.
    graphdef, abstract_params = abstract_model(cfg, rules)
    non_params = [p for p, v in nnx.to_flat_state(abstract_params) if not isinstance(v, nnx.Param)]
    if non_params:
        raise TypeError(f"model state has non-parameter variables {non_params}; the trainer expects params only")
    tx, schedule = optim.make_optimizer(opt_cfg, train_steps)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    param_sh = sharding.state_shardings(abstract_params, mesh, rules)
    opt_sh = sharding.state_shardings(abstract_opt, mesh, rules)
    train_sh = {"step": replicated, "rng": replicated}

    checkpointer = ckpt_lib.Checkpointer(model_dir, keep=keep_checkpoints, keep_best=keep_best_checkpoint,
                                         async_save=async_checkpointing)
    start = checkpointer.latest_step()
    with jax.set_mesh(mesh):
        if start is None:
            _, params = create_sharded_model(cfg, mesh, rules, seed=seed)
            opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
            train_state = jax.device_put(
                {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(seed))}, train_sh)
            start = 0
        else:
            abstract_train = {"step": jax.ShapeDtypeStruct((), jnp.int32),
                              "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(seed)))}
            # The newest checkpoint whose files match their seal; damaged newer ones are
            # reported and moved aside, none intact raises CheckpointError.
            start, (params, opt_state, train_state) = checkpointer.restore_newest_intact(
                ckpt_lib.with_shardings(abstract_params, param_sh),
                ckpt_lib.with_shardings(abstract_opt, opt_sh),
                ckpt_lib.with_shardings(abstract_train, train_sh),
                data_iter)
            log.info("resumed from %s at step %d", checkpointer.directory, start)

    step_fn = jax.jit(
        make_train_step(graphdef, tx, schedule, opt_cfg.grad_accum_steps, metadata_dropout),
        in_shardings=(param_sh, opt_sh, train_sh, data_sharding),
        out_shardings=(param_sh, opt_sh, train_sh, replicated),
        donate_argnums=(0, 1, 2))
    eval_fn = jax.jit(make_eval_step(graphdef), in_shardings=(param_sh, data_sharding), out_shardings=replicated)

    # The operative config lists every parameter actually used, now that all are called.
    if is_chief:
        with open(os.path.join(model_dir, "config.gin"), "w") as f:
            f.write(gin.operative_config_str())

    n_params = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(abstract_params))
    tokens_per_step = batch_size * seq_len
    flops_per_step = metrics_lib.flops_per_token(cfg, n_params, seq_len) * tokens_per_step
    peak = peak_flops_per_device or metrics_lib.peak_flops_for(mesh.devices.flat[0].device_kind)
    peak_total = peak * mesh.size if peak else None
    log.info("model %d params (%d metadata), mesh %s, %d tokens/step, %.3g FLOPs/step",
             n_params, sum(s * cfg.d_model for _, s in cfg.metadata), dict(mesh.shape), tokens_per_step,
             flops_per_step)

    writer = metrics_lib.MetricsWriter(model_dir, enabled=is_chief, resume_step=start)
    end = train_steps if stop_after_steps is None else min(train_steps, start + stop_after_steps)
    bar = metrics_lib.Progress(train_steps, start, log_every, enabled=is_chief and progress)
    summary: dict[str, Any] = {"model_dir": os.path.abspath(model_dir), "params": n_params,
                               "start_step": start}
    timing = {"last_t": None, "steps": 0, "seconds": 0.0}
    last_eval: dict[str, float] = {}
    last_train: dict[str, float] = {}

    def to_device(batch_np):
        return {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in batch_np.items()}

    def handle(step: int, dev_metrics) -> None:
        """Fetches the metrics of `step` (1-based count of updates); checks, logs them."""
        m = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
        now = time.perf_counter()
        bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(m[k])]
        if bad:
            raise TrainingError(
                f"non-finite {', '.join(f'{k}={m[k]}' for k in bad)} at step {step} (update {step} of "
                f"{train_steps}); the last good checkpoint is step {checkpointer.latest_step()} in "
                f"{checkpointer.directory}")
        if timing["last_t"] is not None:  # the first step of a run includes compilation
            dt = now - timing["last_t"]
            timing["steps"] += 1
            timing["seconds"] += dt
            m["step_time_s"] = dt
            m["tokens_per_s"] = tokens_per_step / dt
            if peak_total:
                m["mfu"] = metrics_lib.mfu(flops_per_step, dt, peak_total)
        timing["last_t"] = now
        last_train.clear()
        last_train.update(m)
        if step % log_every == 0 or step == end:
            writer.write(step, m, prefix="train/")
        bar.update(step, {k: m[k] for k in ("loss", "accuracy", "lr") if k in m})

    def evaluate(step: int) -> dict[str, float]:
        # Every process must run the same number of (collective) eval steps, but each packs its
        # own share of the held-out documents: the short ones pad with zero-weight batches.
        local = list(itertools.islice(eval_ds, eval_batches))
        counts = ([len(local)] if n_proc == 1 else
                  [int(c) for c in multihost_utils.process_allgather(np.int32(len(local)))])
        if min(counts) == 0:
            raise ConfigError(f"eval cache {eval_cache_dir} yielded no batch on process(es) "
                              f"{[i for i, c in enumerate(counts) if c == 0]} of {n_proc}: it needs at least "
                              "one batch of held-out documents per process")
        local += [jax.tree.map(np.zeros_like, local[0])] * (max(counts) - len(local))
        totals = None
        with jax.set_mesh(mesh):
            for batch_np in local:
                out = eval_fn(params, to_device(batch_np))
                totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        t = {k: float(v) for k, v in jax.device_get(totals).items()}
        n = max(t["num_tokens"], 1.0)
        res = {"loss": t["loss_sum"] / n, "accuracy": t["num_correct"] / n, "num_tokens": t["num_tokens"]}
        res["perplexity"] = math.exp(min(res["loss"], 700.0))
        writer.write(step, res, prefix="eval/")
        bar.write(f"eval step {step}: loss={res['loss']:.4f} ppl={res['perplexity']:.2f} "
                  f"accuracy={res['accuracy']:.4f}")
        return res

    def save(step: int, eval_metrics: dict[str, float] | None) -> None:
        t0 = time.perf_counter()
        checkpointer.save(step, params, opt_state, train_state, data_iter,
                          metrics={ckpt_lib.EVAL_LOSS_KEY: eval_metrics["loss"]} if eval_metrics else None)
        writer.write(step, {"checkpoint_save_s": time.perf_counter() - t0}, prefix="train/")

    pending = None
    step = start
    preempted = False
    try:
        with _Preemption() as preemption:
            while step < end:
                batch = to_device(next(data_iter))
                with jax.set_mesh(mesh):
                    params, opt_state, train_state, dev_metrics = step_fn(params, opt_state, train_state, batch)
                step += 1
                if pending is not None:
                    handle(*pending)
                pending = (step, dev_metrics)
                eval_due = eval_ds is not None and (step % eval_every == 0 or step == train_steps)
                save_due = step % checkpoint_every == 0 or step == end or preemption.requested
                if eval_due or save_due:
                    handle(*pending)  # never save or evaluate a state whose step went bad
                    pending = None
                eval_metrics = evaluate(step) if eval_due else None
                if eval_metrics:
                    last_eval = eval_metrics
                if save_due:
                    save(step, eval_metrics)
                if (eval_due or save_due) and timing["last_t"] is not None:
                    timing["last_t"] = time.perf_counter()  # eval and save time is not step time
                if preemption.requested:
                    preempted = True
                    log.warning("SIGTERM: saved a checkpoint at step %d; exiting", step)
                    break
            if pending is not None:
                handle(*pending)
            if not last_eval and eval_ds is not None and step == train_steps:
                last_eval = evaluate(step)  # resumed a finished run: still report its eval
        checkpointer.wait()
    finally:
        bar.close()
        writer.close()
        checkpointer.close()

    summary.update(
        step=step,
        preempted=preempted,
        train_loss=last_train.get("loss"),
        train_accuracy=last_train.get("accuracy"),
        eval_loss=last_eval.get("loss"),
        eval_accuracy=last_eval.get("accuracy"),
        eval_perplexity=last_eval.get("perplexity"),
        tokens_per_s=(timing["steps"] * tokens_per_step / timing["seconds"]) if timing["seconds"] else None,
        mfu=(timing["steps"] * flops_per_step / timing["seconds"] / peak_total)
        if timing["seconds"] and peak_total else None,
        wall_s=time.perf_counter() - t_start,
    )
    return summary


# ----------------------------------------------------------------------------- entry points


def train(config_files: Sequence[str], bindings: Sequence[str] = (), **overrides) -> dict[str, Any]:
    """Parses gin configs + bindings, then trains. Returns the summary of `run`.

    `overrides` go to `run` directly (e.g. `stop_after_steps=5` for a simulated preemption).
    """
    parse_gin(config_files, bindings)
    return run(**overrides)


def _setup_logging() -> None:
    pkg = logging.getLogger("lime_jax")
    if not pkg.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)
        pkg.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    _setup_logging()
    files, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
    try:
        parse_gin(files, bindings)
    except (ValueError, FileNotFoundError) as e:  # gin reports unknown bindings as ValueError
        log.error("bad gin config: %s", e)
        return 2
    try:
        summary = run()
    except (ConfigError, TrainingError, CacheError, ckpt_lib.CheckpointError) as e:
        log.error("%s", e)
        return 1
    log.info("done: %s", {k: v for k, v in summary.items() if v is not None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
