"""The training loop: set-up, the steps, and the hooks that run between them.

Loop invariants:
- The `TrainState` is built (or restored) sharded from abstract shapes and updated by one
  `jax.jit` with in/out shardings and donation (`step.jit_train_step`).
- Step metrics are fetched one step late (the device always has the next step queued); the
  only other host syncs are checkpoint saves and evals.
- Checkpoint step N holds the state after N optimizer updates plus the data iterator position
  after N batches, so resuming replays exactly the same batches with the same state.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lime_jax.annotation.tag_sources import TAG_SOURCES_NAME
from lime_jax.data import cache as cache_lib
from lime_jax.data import loader
from lime_jax.hf.init import init_from_hf
from lime_jax.model import ModelConfig, abstract_model, attention, sharding
from lime_jax.model.heads import check_causal
from lime_jax.trainer import checkpoint as ckpt_lib
from lime_jax.trainer import distributed
from lime_jax.trainer import metrics as metrics_lib
from lime_jax.trainer import optim, profiling
from lime_jax.trainer import state as state_lib
from lime_jax.trainer import step as step_lib
from lime_jax.trainer.config import (CheckpointConfig, ConfigError, DataConfig, EvalConfig, TrainConfig,
                                     check_batch_split, resolve_dcn_mesh_shape, resolve_mesh_shape)
from lime_jax.trainer.gin_config import check_bindings_used

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped on a bad state (non-finite loss, gradients or parameters)."""


class Preemption:
    """Decides after each step whether SIGTERM asks to save and stop; every process decides alike.

    One process: a Python handler turns SIGTERM into a flag (main thread only). Under JAX's
    distributed runtime its preemption notifier catches SIGTERM on any process, and the processes
    agree in the background on the next step all of them can still reach
    (`multihost_utils.reached_preemption_sync_point`): all save that step and exit. Local flags
    could disagree, one process entering the save's barrier while another runs the next step's
    collectives (a hang). The per-step check is a mutex and a compare, no collective (~10 us).
    """

    def __init__(self, start_step: int):
        self._start = start_step
        self._sync = distributed.preemption_sync_active()
        self._flag = False
        self._previous = None

    def __enter__(self):
        if self._sync:
            return self  # a Python handler would replace the runtime's and hide SIGTERM from it
        if jax.process_count() > 1:
            log.warning("jax_enable_preemption_service is off: SIGTERM stops a process without a checkpoint "
                        "(the processes cannot agree on a step to save)")
        elif threading.current_thread() is threading.main_thread():  # signal() needs it
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self._flag = True

    def reached(self, step: int) -> bool:
        """Whether to save `step` and stop; call once after every step."""
        if self._sync:
            # The runtime counts this invocation's steps, which every process starts together.
            return multihost_utils.reached_preemption_sync_point(step - self._start)
        return self._flag

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _datasets(data: DataConfig, cfg: ModelConfig, seed: int) -> tuple[Iterator[dict], dict[str, tuple[str, Any]]]:
    """(this process's training batches, held-out sets {metrics prefix: (cache dir, dataset)}):
    `eval` for EVAL_CACHE_DIR, `eval_<name>` for each extra one; empty without EVAL_CACHE_DIR.

    Cache data first: a cache that does not fit the model config fails before any compile.
    """
    n_proc = jax.process_count()
    local_batch = data.batch_size // n_proc
    cache_kwargs = dict(seq_len=data.seq_len, batch_size=local_batch, shift=data.metadata_shift,
                        tags=cfg.metadata_names, heads=[(n, a) for n, _, a, _ in cfg.tag_heads],
                        read_threads=data.read_threads,
                        expected_vocab_sizes={"targets": cfg.vocab_size,
                                              **{f"targets_{n}": s for n, s in cfg.metadata},
                                              **{f"targets_{n}": s for n, s, _, _ in cfg.tag_heads}})
    if cfg.tag_heads and data.cache_dir is None:
        raise ConfigError(f"ModelConfig.tag_heads {list(cfg.head_ids)} read their targets from an annotated "
                          "cache: set CACHE_DIR (the SeqIO input, MIXTURE_OR_TASK_NAME, does not build them)")
    if data.cache_dir is not None:
        train_iter = iter(distributed.process_dataset(data.cache_dir, seed=seed, worker_count=data.worker_count,
                                                      **cache_kwargs))
    else:
        from lime_jax.data.seqio_source import seqio_batches  # imports seqio and TensorFlow

        train_iter = seqio_batches(data.mixture_or_task_name, split="train", seq_len=data.seq_len,
                                   batch_size=local_batch, shift=data.metadata_shift, tags=cfg.metadata_names,
                                   seed=seed, shard_index=jax.process_index(), shard_count=n_proc,
                                   shuffle=True, num_epochs=None)
    if not data.eval_cache_dir:
        log.warning("DataConfig.eval_cache_dir (EVAL_CACHE_DIR) is not set: no held-out evaluation")
    dirs = {"eval": data.eval_cache_dir} if data.eval_cache_dir else {}
    dirs.update({f"eval_{name}": d for name, d in data.extra_eval_cache_dirs.items()})
    return train_iter, {prefix: (d, loader.build_dataset(d, shuffle=False, num_epochs=1, **cache_kwargs))
                        for prefix, d in dirs.items()}


def tag_sources_of(data: DataConfig) -> dict[str, str]:
    """Where each cache's tags come from (its manifest's `tag_source`; caches written before
    sources were named hold spaCy's whole-document tags: oracle)."""
    dirs = {"train": data.cache_dir, "eval": data.eval_cache_dir,
            **{f"eval_{name}": d for name, d in data.extra_eval_cache_dirs.items()}}
    return {k: cache_lib.load_manifest(d).get("tag_source", "oracle") for k, d in dirs.items() if d}


class _StepMetrics:
    """Checks and logs each step's metrics (fetched one step late) and times the steps."""

    def __init__(self, writer, bar, *, train_steps: int, end: int, log_every: int, tokens_per_step: int,
                 flops_per_step: float, peak_total: float | None, checkpointer):
        self.writer, self.bar, self.checkpointer = writer, bar, checkpointer
        self.train_steps, self.end, self.log_every = train_steps, end, log_every
        self.tokens_per_step, self.flops_per_step, self.peak_total = tokens_per_step, flops_per_step, peak_total
        self.last: dict[str, float] = {}
        self._last_t: float | None = None  # the first step of a run includes compilation: untimed
        self.timed_steps, self.timed_s = 0, 0.0

    def handle(self, step: int, dev_metrics) -> None:
        """Fetches the metrics of `step` (1-based count of updates); checks, logs them."""
        m = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
        now = time.perf_counter()
        bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(m[k])]
        if bad:
            raise TrainingError(
                f"non-finite {', '.join(f'{k}={m[k]}' for k in bad)} at step {step} (update {step} of "
                f"{self.train_steps}); the last good checkpoint is step {self.checkpointer.latest_step()} in "
                f"{self.checkpointer.directory}")
        if self._last_t is not None:
            dt = now - self._last_t
            self.timed_steps += 1
            self.timed_s += dt
            m["step_time_s"] = dt
            m["tokens_per_s"] = self.tokens_per_step / dt
            if self.peak_total:
                m["mfu"] = metrics_lib.mfu(self.flops_per_step, dt, self.peak_total)
        self._last_t = now
        self.last = m
        if step % self.log_every == 0 or step == self.end:
            self.writer.write(step, m, prefix="train/")
        self.bar.update(step, {k: m[k] for k in ("loss", "accuracy", "lr") if k in m})

    def pause(self) -> None:
        """Eval and save time is not step time: restart the clock if it runs."""
        if self._last_t is not None:
            self._last_t = time.perf_counter()

    def rates(self) -> tuple[float | None, float | None]:
        """(tokens/s, MFU) over the timed steps."""
        if not self.timed_s:
            return None, None
        steps_per_s = self.timed_steps / self.timed_s
        return (steps_per_s * self.tokens_per_step,
                steps_per_s * self.flops_per_step / self.peak_total if self.peak_total else None)


def _evaluate(eval_fn, params, eval_ds, eval_cfg: EvalConfig, eval_cache_dir: str, to_device,
              mesh) -> dict[str, float]:
    """Held-out loss, accuracy and perplexity over up to `eval_cfg.batches` batches."""
    # Every process must run the same number of (collective) eval steps, but each packs its
    # own share of the held-out documents: the short ones pad with zero-weight batches.
    n_proc = jax.process_count()
    local = list(itertools.islice(eval_ds, eval_cfg.batches))
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
    res.update({k: float(v) for k, v in step_lib.head_metrics(t).items()})
    return res


def run(train_cfg: TrainConfig, data: DataConfig, eval_cfg: EvalConfig, ckpt_cfg: CheckpointConfig, *,
        bindings: Sequence[str] = (), stop_after_steps: int | None = None) -> dict[str, Any]:
    """Trains (or resumes) the gin-configured model; returns a summary dict.

    The model comes from the gin-bound `ModelConfig`, the optimizer from `OptimizerConfig`, the
    logical-axis rules from `sharding_rules`. `bindings` (the caller's gin bindings) must each
    have been used once everything is built (`gin_config.check_bindings_used`).
    `stop_after_steps` stops this invocation after that many steps with a checkpoint, as a
    preemption would.
    """
    t_start = time.perf_counter()
    if train_cfg.compilation_cache_dir:
        profiling.use_compilation_cache(train_cfg.compilation_cache_dir)  # before anything compiles
    # Flags, JAX_* variables or a cluster launcher make this one of several processes.
    distributed.distributed_setup(force=train_cfg.initialize_distributed)
    cfg = ModelConfig()
    try:
        check_causal(cfg.tag_heads, data.metadata_shift, bool(cfg.metadata))
        attention.check_packed_support(cfg.attention, data.seq_len)  # training batches are always packed
    except ValueError as e:
        raise ConfigError(str(e)) from None
    opt_cfg = optim.OptimizerConfig()
    rules = sharding.sharding_rules()
    n_proc = jax.process_count()
    if data.batch_size % (n_proc * opt_cfg.grad_accum_steps):
        raise ConfigError(f"DataConfig.batch_size={data.batch_size} must be divisible by processes ({n_proc}) x "
                          f"OptimizerConfig.grad_accum_steps ({opt_cfg.grad_accum_steps})")
    is_chief = jax.process_index() == 0
    distributed.quiet_non_chief_logs()

    mesh_shape = resolve_mesh_shape(train_cfg.mesh_shape, jax.device_count())
    mesh = sharding.make_mesh(mesh_shape, resolve_dcn_mesh_shape(train_cfg.dcn_mesh_shape, mesh_shape,
                                                                 sharding.num_slices()))
    check_batch_split(data.batch_size, opt_cfg.grad_accum_steps, sharding.axis_size(mesh, rules, "batch"),
                      mesh_shape)
    data_sharding = sharding.batch_sharding(mesh, rules)
    train_iter, eval_sets = _datasets(data, cfg, train_cfg.seed)

    graphdef, abstract_params = abstract_model(cfg, rules)
    non_params = [p for p, v in nnx.to_flat_state(abstract_params) if not isinstance(v, nnx.Param)]
    if non_params:
        raise TypeError(f"model state has non-parameter variables {non_params}; the trainer expects params only")
    tx, schedule = optim.make_optimizer(opt_cfg, train_cfg.train_steps)
    # Every configurable the run uses has been called: a binding that did nothing fails here,
    # before any state is built or compiled, and the operative config is complete.
    hf_init = init_from_hf(cfg)  # INIT_FROM_HF: checked now, applied to a fresh state below
    check_bindings_used(bindings)
    model_dir = ckpt_lib.absolute(train_cfg.model_dir)  # an epath, as Orbax's: local or gs://
    model_dir.mkdir(parents=True, exist_ok=True)
    if is_chief:
        (model_dir / "config.gin").write_text(gin.operative_config_str())
        # Every figure of the run is labelled with where its tags came from (oracle or honest).
        (model_dir / TAG_SOURCES_NAME).write_text(json.dumps(tag_sources_of(data), indent=1))

    abstract = state_lib.abstract_train_state(abstract_params, tx)
    state_sh = state_lib.train_state_shardings(abstract, mesh, rules)
    checkpointer = ckpt_lib.Checkpointer(train_cfg.model_dir, keep=ckpt_cfg.keep, keep_best=ckpt_cfg.keep_best,
                                         async_save=ckpt_cfg.async_save)
    with jax.set_mesh(mesh):
        if checkpointer.latest_step() is None:
            state = state_lib.init_train_state(cfg, tx, mesh, rules, state_sh, train_cfg.seed)
            if hf_init is not None:
                state = hf_init(state, tx)
            start = 0
        else:
            # The newest checkpoint whose files match their seal; damaged newer ones are
            # reported and moved aside, none intact raises CheckpointError.
            start, state = checkpointer.restore_newest_intact(state_lib.with_shardings(abstract, state_sh),
                                                              train_iter)
            log.info("resumed from %s at step %d", checkpointer.directory, start)

    step_fn = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, tx, schedule, opt_cfg.grad_accum_steps, data.metadata_dropout),
        state_sh, data_sharding)
    eval_fn = jax.jit(step_lib.make_eval_step(graphdef), in_shardings=(state_sh.params, data_sharding),
                      out_shardings=NamedSharding(mesh, PartitionSpec()))

    n_params = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(abstract_params))
    tokens_per_step = data.batch_size * data.seq_len
    flops_per_step = metrics_lib.flops_per_token(cfg, n_params, data.seq_len) * tokens_per_step
    peak = train_cfg.peak_flops_per_device or metrics_lib.peak_flops_for(mesh.devices.flat[0].device_kind)
    log.info("model %d params (%d metadata), mesh %s, %d tokens/step, %.3g FLOPs/step, z_loss %g",
             n_params, sum(s * cfg.d_model for _, s in cfg.metadata), dict(mesh.shape), tokens_per_step,
             flops_per_step, cfg.z_loss)

    train_steps = train_cfg.train_steps
    end = train_steps if stop_after_steps is None else min(train_steps, start + stop_after_steps)
    writer = metrics_lib.MetricsWriter(train_cfg.model_dir, enabled=is_chief, resume_step=start)
    bar = metrics_lib.Progress(train_steps, start, train_cfg.log_every, enabled=is_chief and train_cfg.progress)
    step_metrics = _StepMetrics(writer, bar, train_steps=train_steps, end=end, log_every=train_cfg.log_every,
                                tokens_per_step=tokens_per_step, flops_per_step=flops_per_step,
                                peak_total=peak * mesh.size if peak else None, checkpointer=checkpointer)

    def to_device(batch_np):
        return {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in batch_np.items()}

    def evaluate(step: int) -> dict[str, dict[str, float]]:
        """Metrics of every held-out set, by metrics prefix (`eval`: EVAL_CACHE_DIR)."""
        out = {}
        for prefix, (cache_dir, ds) in eval_sets.items():
            out[prefix] = res = _evaluate(eval_fn, state.params, ds, eval_cfg, cache_dir, to_device, mesh)
            writer.write(step, res, prefix=f"{prefix}/")
            bar.write(f"{prefix} step {step}: loss={res['loss']:.4f} ppl={res['perplexity']:.2f} "
                      f"accuracy={res['accuracy']:.4f}")
        return out

    last_evals: dict[str, dict[str, float]] = {}
    pending = None  # (step, device metrics) not fetched yet
    step = start
    preempted = False
    try:
        with Preemption(start) as preemption, profiling.StepProfiler(
                train_cfg.profile_steps, train_cfg.model_dir, enabled=is_chief) as profiler:
            while step < end:
                batch = to_device(next(train_iter))
                profiler.before(step + 1, state)
                with jax.set_mesh(mesh):
                    state, dev_metrics = step_fn(state, batch)
                step += 1
                profiler.after(step, state)
                if pending is not None:
                    step_metrics.handle(*pending)
                pending = (step, dev_metrics)
                eval_due = bool(eval_sets) and (step % eval_cfg.every == 0 or step == train_steps)
                stop = preemption.reached(step)
                save_due = step % ckpt_cfg.every == 0 or step == end or stop
                if eval_due or save_due:
                    step_metrics.handle(*pending)  # never save or evaluate a state whose step went bad
                    pending = None
                evals = evaluate(step) if eval_due else {}
                if evals:
                    last_evals = evals
                if save_due:
                    t0 = time.perf_counter()
                    best_by = {ckpt_lib.EVAL_LOSS_KEY: evals["eval"]["loss"]} if evals else None
                    checkpointer.save(step, state, train_iter, metrics=best_by)
                    writer.write(step, {"checkpoint_save_s": time.perf_counter() - t0}, prefix="train/")
                if eval_due or save_due:
                    step_metrics.pause()
                if stop:
                    preempted = True
                    log.warning("SIGTERM: saved a checkpoint at step %d; exiting", step)
                    break
            if pending is not None:
                step_metrics.handle(*pending)
            if not last_evals and eval_sets and step == train_steps:
                last_evals = evaluate(step)  # resumed a finished run: still report its eval
        checkpointer.wait()
    finally:
        bar.close()
        writer.close()
        checkpointer.close()

    tokens_per_s, mfu = step_metrics.rates()
    last_eval = last_evals.get("eval", {})
    return {
        "model_dir": str(model_dir),
        "params": n_params,
        "start_step": start,
        "step": step,
        "preempted": preempted,
        "train_loss": step_metrics.last.get("loss"),
        "train_accuracy": step_metrics.last.get("accuracy"),
        "eval_loss": last_eval.get("loss"),
        "eval_accuracy": last_eval.get("accuracy"),
        "eval_perplexity": last_eval.get("perplexity"),
        "extra_evals": {k: v for k, v in last_evals.items() if k != "eval"},
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "wall_s": time.perf_counter() - t_start,
    }
