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

from lime_jax.features import head_id, target_feature
from lime_jax.ids import PAD_ID
from lime_jax.model import loss_and_metrics
from lime_jax.model.loss import batch_metadata_keys
from lime_jax.trainer.state import TrainState

_HEAD_SUMMED = ("loss_sum", "num_tags", "num_correct")  # per tag head, as `<head id>/<key>`


def _head_ids(metrics) -> list[str]:
    """Tag heads (`pos_ahead1`, ...) that reported metrics (`<head id>/<key>`, loss.py)."""
    return sorted({k.split("/")[0] for k in metrics if "/" in k})


def _head_sums(metrics) -> dict:
    return {f"{h}/{k}": metrics[f"{h}/{k}"] for h in _head_ids(metrics) for k in _HEAD_SUMMED}


def head_metrics(sums) -> dict:
    """`<head id>/loss` and `/accuracy` of each tag head from its summed `loss_sum`, `num_tags`
    and `num_correct` (one step's, or a held-out set's totals)."""
    out = {}
    for h in _head_ids(sums):
        n = jnp.maximum(sums[f"{h}/num_tags"], 1.0)
        out[f"{h}/loss"] = sums[f"{h}/loss_sum"] / n
        out[f"{h}/accuracy"] = sums[f"{h}/num_correct"] / n
    return out


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
                "num_tokens": m["num_tokens"], "num_correct": m["num_correct"], **_head_sums(m)}

    def micro_objective(params, mb, totals):
        """This micro-batch's share of the whole batch's objective: its sums over the whole batch's
        counts (LM targets, each head's targets), so the shares' gradients add up exactly."""
        model = nnx.merge(graphdef, params)
        _, m = loss_and_metrics(model, mb)
        share = (m["loss_sum"] + m["z_loss"] * m["num_tokens"]) / totals["num_tokens"]
        for name, _, ahead, weight in model.cfg.tag_heads:
            hid = head_id(name, ahead)
            share = share + weight * m[f"{hid}/loss_sum"] / totals[hid]
        return share, m

    share_grad_fn = jax.value_and_grad(micro_objective, has_aux=True)

    def accumulated(params, batch_BxL):
        micro_AxMxL = jax.tree.map(
            lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch_BxL)
        weights = batch_BxL["decoder_loss_weights"].astype(jnp.float32)
        totals = {"num_tokens": jnp.maximum(jnp.sum(weights), 1.0)}
        for name, _, ahead, _ in nnx.merge(graphdef, params).cfg.tag_heads:  # a head's targets: PAD is none
            tags = batch_BxL[target_feature(name, ahead)]
            totals[head_id(name, ahead)] = jnp.maximum(jnp.sum(weights * (tags != PAD_ID)), 1.0)

        def body(carry, mb):
            g_sum, m_sum, total = carry
            (share, m), g = share_grad_fn(params, mb, totals)
            return (jax.tree.map(jnp.add, g_sum, g), jax.tree.map(jnp.add, m_sum, summed(m)), total + share), None

        first = jax.tree.map(lambda x: x[0], micro_AxMxL)
        keys = jax.eval_shape(lambda p, b: summed(loss_and_metrics(nnx.merge(graphdef, p), b)[1]), params, first)
        zeros = (jax.tree.map(jnp.zeros_like, params), {k: jnp.zeros((), jnp.float32) for k in keys},
                 jnp.zeros((), jnp.float32))
        (grads, m_sum, total), _ = jax.lax.scan(body, zeros, micro_AxMxL)
        denom = totals["num_tokens"]
        return dict(m_sum, loss=m_sum["loss_sum"] / denom, z_loss=m_sum["z_loss_sum"] / denom,
                    objective=total), grads

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
            **({"total_loss": m["objective"], **head_metrics(m)} if _head_ids(m) else {}),
        }
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), out

    return step


def jit_train_step(step_fn: Callable, state_shardings: TrainState, data_sharding: NamedSharding) -> Callable:
    """One `jax.jit` of `step_fn(state, batch)`: state sharded and donated, metrics replicated."""
    replicated = NamedSharding(data_sharding.mesh, PartitionSpec())
    return jax.jit(step_fn, in_shardings=(state_shardings, data_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[object, dict], dict]:
    """`eval_step(params, batch) -> {loss_sum, num_tokens, num_correct}` plus each tag head's
    `<head id>/{loss_sum, num_tags, num_correct}` (sums add over batches)."""

    def step(params, batch):
        _, m = loss_and_metrics(nnx.merge(graphdef, params), batch)
        return {**{k: m[k] for k in ("loss_sum", "num_tokens", "num_correct")}, **_head_sums(m)}

    return step
