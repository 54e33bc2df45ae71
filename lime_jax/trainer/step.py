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
from lime_jax.model import loss_and_metrics, sharding
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


def _read_in_compute_dtype(logical_axes: tuple) -> bool:
    """The params `gather_params_in_compute_dtype` casts: the matrices the model only ever reads
    cast to the compute dtype, each once per forward (attention, MLP and tag-head kernels: `embed`
    by something), so casting them earlier changes no number, gradients included. Left alone: the
    token table and an untied LM head (`vocab`: the lookup reads the table in f32 and scatter-adds
    its gradient over repeated tokens, and the chunked loss sums the head's gradient over chunks:
    sums that bf16 would round), metadata tables (replicated: nothing to gather), norm scales and
    scalars (read in f32, tiny)."""
    per_layer = [a for a in logical_axes if a != "layers"]  # scan_layers stacks a leading `layers` axis
    return len(per_layer) >= 2 and "embed" in per_layer and "vocab" not in per_layer


def compute_params(graphdef: nnx.GraphDef, params):
    """`params` as the steps hand them to the model: unchanged, or, with
    `ModelConfig.gather_params_in_compute_dtype`, the matrices of `_read_in_compute_dtype` cast to
    the compute dtype and pinned to their own sharded layout, so that their FSDP all-gathers move
    compute-dtype bytes whatever the partitioner would choose. (XLA under JAX 0.10.2 already moves
    the model's at-use cast before the gather: the partitioned train step gathers these matrices in
    bf16 with or without the flag.) The steps differentiate with respect to the result and cast
    the gradients back (`_to_param_dtype`): bitwise the gradients through the model's own cast."""
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    if not cfg.gather_params_in_compute_dtype or cfg.jnp_dtype == cfg.jnp_param_dtype:
        return params

    def cast(v):
        axes = v.get_metadata().get("logical_axes")
        if not isinstance(v, nnx.Param) or axes is None or not _read_in_compute_dtype(axes):
            return v
        return v.replace(sharding.constrain(v.get_value().astype(cfg.jnp_dtype), axes, model.rules))

    return jax.tree.map(cast, params, is_leaf=sharding.is_variable)


def _to_param_dtype(grads, params):
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    accum_steps: int = 1, metadata_dropout: float = 0.0
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`step(state, batch) -> (state, metrics)` (unjitted): one optimizer update on `batch`, in
    `accum_steps` micro-batches of equal rows. The z-loss weight is the model's (`ModelConfig.z_loss`).
    With `ModelConfig.gather_params_in_compute_dtype` the model reads `compute_params`, cast once
    per step (before the accumulation loop), and the optimizer updates the f32 params."""

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

    def accumulated(params, batch_BxL, zero_grads):
        # Micro-batch a holds rows a, A+a, 2A+a, ...: each device (and host) keeps its share of
        # every micro-batch, where contiguous row blocks would put a micro-batch on some devices
        # only and move rows between them at every micro-step.
        micro_AxMxL = jax.tree.map(
            lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1), batch_BxL)
        weights = batch_BxL["decoder_loss_weights"].astype(jnp.float32)
        totals = {"num_tokens": jnp.maximum(jnp.sum(weights), 1.0)}
        for name, _, ahead, _ in nnx.merge(graphdef, params).cfg.tag_heads:  # a head's targets: PAD is none
            tags = batch_BxL[target_feature(name, ahead)]
            totals[head_id(name, ahead)] = jnp.maximum(jnp.sum(weights * (tags != PAD_ID)), 1.0)

        def body(carry, mb):
            g_sum, m_sum, total = carry
            (share, m), g = share_grad_fn(params, mb, totals)
            g_sum = jax.tree.map(jnp.add, g_sum, _to_param_dtype(g, g_sum))  # summed in the params' dtype
            return (g_sum, jax.tree.map(jnp.add, m_sum, summed(m)), total + share), None

        first = jax.tree.map(lambda x: x[0], micro_AxMxL)
        keys = jax.eval_shape(lambda p, b: summed(loss_and_metrics(nnx.merge(graphdef, p), b)[1]), params, first)
        zeros = (zero_grads, {k: jnp.zeros((), jnp.float32) for k in keys},
                 jnp.zeros((), jnp.float32))
        (grads, m_sum, total), _ = jax.lax.scan(body, zeros, micro_AxMxL)
        denom = totals["num_tokens"]
        return dict(m_sum, loss=m_sum["loss_sum"] / denom, z_loss=m_sum["z_loss_sum"] / denom,
                    objective=total), grads

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        batch = drop_metadata(batch, state.rng, state.step, metadata_dropout)
        params = compute_params(graphdef, state.params)
        if accum_steps == 1:
            (_, m), grads = grad_fn(params, batch)
            grads = _to_param_dtype(grads, state.params)
        else:
            m, grads = accumulated(params, batch, jax.tree.map(jnp.zeros_like, state.params))
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
        _, m = loss_and_metrics(nnx.merge(graphdef, compute_params(graphdef, params)), batch)
        return {**{k: m[k] for k in ("loss_sum", "num_tokens", "num_correct")}, **_head_sums(m)}

    return step
