"""The train and eval steps: pure functions of the state and a batch, jitted with shardings.

`make_train_step` returns the unjitted step; `jit_train_step` is the one jit the trainer (and
`lime-jax aot`) run: in/out shardings of the whole `TrainState`, the state donated.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lime_jax.model import loss_and_metrics
from lime_jax.model.loss import batch_metadata_keys
from lime_jax.trainer.state import TrainState

_SUMMED = ("loss_sum", "z_loss_sum", "num_tokens", "num_correct")


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


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    accum_steps: int = 1, metadata_dropout: float = 0.0
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`step(state, batch) -> (state, metrics)` (unjitted): one optimizer update on `batch`, in
    `accum_steps` micro-batches of equal rows. The z-loss weight is the model's (`ModelConfig.z_loss`)."""

    def objective(params, batch):
        return loss_and_metrics(nnx.merge(graphdef, params), batch)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def summed(m):
        # Per-micro-batch means times their token counts add up to whole-batch sums.
        return {"loss_sum": m["loss_sum"], "z_loss_sum": m["z_loss"] * m["num_tokens"],
                "num_tokens": m["num_tokens"], "num_correct": m["num_correct"]}

    def accumulated(params, batch_BxL):
        # Micro-batches are weighted by their target-token counts, so the result equals the
        # gradient of the token-mean loss over the whole batch.
        micro_AxMxL = jax.tree.map(
            lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch_BxL)

        def body(carry, mb):
            g_sum, m_sum = carry
            (_, m), g = grad_fn(params, mb)
            n = m["num_tokens"]
            g_sum = jax.tree.map(lambda a, b: a + b * n, g_sum, g)
            m_sum = jax.tree.map(jnp.add, m_sum, summed(m))
            return (g_sum, m_sum), None

        zeros_g = jax.tree.map(jnp.zeros_like, params)
        zeros_m = {k: jnp.zeros((), jnp.float32) for k in _SUMMED}
        (g_sum, m_sum), _ = jax.lax.scan(body, (zeros_g, zeros_m), micro_AxMxL)
        denom = jnp.maximum(m_sum["num_tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        return dict(m_sum, loss=m_sum["loss_sum"] / denom, z_loss=m_sum["z_loss_sum"] / denom), grads

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        batch = drop_metadata(batch, state.rng, state.step, metadata_dropout)
        if accum_steps == 1:
            (_, m), grads = grad_fn(state.params, batch)
        else:
            m, grads = accumulated(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = {
            "loss": m["loss"],
            "accuracy": m["num_correct"] / jnp.maximum(m["num_tokens"], 1.0),
            "num_tokens": m["num_tokens"],
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "lr": schedule(state.step),
            "z_loss": m["z_loss"],  # the weighted term; 0 unless ModelConfig.z_loss is on
        }
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), out

    return step


def jit_train_step(step_fn: Callable, state_shardings: TrainState, data_sharding: NamedSharding) -> Callable:
    """One `jax.jit` of `step_fn(state, batch)`: state sharded and donated, metrics replicated."""
    replicated = NamedSharding(data_sharding.mesh, PartitionSpec())
    return jax.jit(step_fn, in_shardings=(state_shardings, data_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[object, dict], dict]:
    """`eval_step(params, batch) -> {loss_sum, num_tokens, num_correct}` (sums add over batches)."""

    def step(params, batch):
        _, m = loss_and_metrics(nnx.merge(graphdef, params), batch)
        return {k: m[k] for k in ("loss_sum", "num_tokens", "num_correct")}

    return step
