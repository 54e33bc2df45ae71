"""Next-token loss and metrics on a T5X-style decoder batch, plus a jitted sharded version.

Batch features (int32 [B, L]): `decoder_input_tokens`, `decoder_target_tokens`,
`decoder_loss_weights`, optionally `decoder_segment_ids` and `decoder_positions` (both or
neither), and `decoder_input_<name>` for each metadata table of the model config.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lime_jax.features import head_id, target_feature
from lime_jax.ids import NONE_ID, NUM_RESERVED_TAGS, PAD_ID
from lime_jax.model import sharding
from lime_jax.model.config import ModelConfig
from lime_jax.model.embed import check_ids

METADATA_PREFIX = "decoder_input_"
_REQUIRED = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")


def batch_metadata_keys(batch: Mapping[str, jax.Array]) -> list[str]:
    """The batch's metadata features: every `decoder_input_<name>` but the tokens."""
    return [k for k in batch if k.startswith(METADATA_PREFIX) and k != "decoder_input_tokens"]


def metadata_from_batch(
    cfg: ModelConfig, batch: Mapping[str, jax.Array], allow_unused_metadata: bool = False
) -> dict[str, jax.Array]:
    """Picks `decoder_input_<name>` for each metadata table of `cfg`.

    A metadata feature in the batch that the config has no table for is an error (a LIME batch
    fed to a baseline model is usually a config mistake) unless `allow_unused_metadata`.
    """
    missing = [f"{METADATA_PREFIX}{n}" for n in cfg.metadata_names if f"{METADATA_PREFIX}{n}" not in batch]
    if missing:
        raise ValueError(f"batch lacks metadata feature(s) {missing} required by ModelConfig.metadata="
                         f"{cfg.metadata}; batch has {sorted(batch)}")
    extra = [k for k in batch_metadata_keys(batch) if k[len(METADATA_PREFIX):] not in cfg.metadata_names]
    if extra and not allow_unused_metadata:
        raise ValueError(f"batch has metadata feature(s) {sorted(extra)} but ModelConfig.metadata="
                         f"{cfg.metadata} has no table for them (pass allow_unused_metadata=True to drop them)")
    return {n: batch[f"{METADATA_PREFIX}{n}"] for n in cfg.metadata_names}


def loss_and_metrics(
    model, batch: Mapping[str, jax.Array], *, allow_unused_metadata: bool = False
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked mean cross entropy (f32) over `decoder_loss_weights`, plus `z_loss * mean(logZ^2)`
    with `z_loss` from the model's config.

    Metrics (f32 scalars): `loss` (cross entropy only), `loss_sum`, `z_loss`, `num_tokens`
    (sum of weights), `num_correct` (weighted hits: targets whose logit is the row's largest, an
    exact tie included), `objective` (the returned loss), and per tag head (`heads.py`)
    `<head id>/loss`, `<head id>/loss_sum`, `<head id>/num_tags`, `<head id>/num_correct`. The
    returned loss is the objective to differentiate: cross entropy + z-loss term + each head's
    `weight * loss`.

    `ModelConfig.loss_chunk_size > 0` computes the LM head's logits a chunk at a time
    (`_chunked_token_stats`): the same numbers, without ever holding the f32 [B, L, V] logits.
    """
    for key in _REQUIRED:
        if key not in batch:
            raise ValueError(f"batch lacks feature {key!r}; batch has {sorted(batch)}")
    metadata = metadata_from_batch(model.cfg, batch, allow_unused_metadata)
    shape = tuple(batch["decoder_input_tokens"].shape)
    targets_BxL, weights_BxL = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    check_ids("decoder_target_tokens", targets_BxL, model.cfg.vocab_size, shape=shape,
              traced=model.cfg.check_ids)
    if tuple(weights_BxL.shape) != shape:
        raise ValueError(f"decoder_loss_weights: expected shape {shape}, got {tuple(weights_BxL.shape)}")
    weights_BxL = weights_BxL.astype(jnp.float32)
    head_targets = {}
    for name, size, ahead, _ in model.cfg.tag_heads:
        feature = target_feature(name, ahead)
        if feature not in batch:
            raise ValueError(f"batch lacks feature {feature!r} for tag head {head_id(name, ahead)!r} "
                             f"(ModelConfig.tag_heads); batch has {sorted(batch)}")
        check_ids(feature, batch[feature], size, shape=shape, traced=model.cfg.check_ids)
        head_targets[head_id(name, ahead)] = batch[feature]
    x_BxLxD = model.trunk(batch["decoder_input_tokens"], metadata=metadata,
                          segment_ids=batch.get("decoder_segment_ids"), positions=batch.get("decoder_positions"))
    head_logits = model.head_logits(x_BxLxD)
    if model.cfg.loss_chunk_size:
        nll_BxL, logz_BxL, correct_BxL = _chunked_token_stats(model, x_BxLxD, targets_BxL)
    else:
        nll_BxL, logz_BxL, correct_BxL = _lm_token_stats(model, x_BxLxD, targets_BxL)
    ce_sum = jnp.sum(nll_BxL * weights_BxL)
    num_tokens = jnp.sum(weights_BxL)
    denom = jnp.maximum(num_tokens, 1.0)
    ce = ce_sum / denom
    z_term = model.cfg.z_loss * jnp.sum(jnp.square(logz_BxL) * weights_BxL) / denom
    metrics = {
        "loss": ce,
        "loss_sum": ce_sum,
        "z_loss": z_term,
        "num_tokens": num_tokens,
        "num_correct": jnp.sum(correct_BxL * weights_BxL),
    }
    objective = ce + z_term
    for (_, _, _, weight), (hid, tags_BxL) in zip(model.cfg.tag_heads, head_targets.items()):
        head_sum, num_tags, head_correct = _tag_cross_entropy(head_logits[hid], tags_BxL, weights_BxL)
        head_loss = head_sum / jnp.maximum(num_tags, 1.0)
        objective = objective + weight * head_loss
        metrics.update({f"{hid}/loss": head_loss, f"{hid}/loss_sum": head_sum, f"{hid}/num_tags": num_tags,
                        f"{hid}/num_correct": head_correct})
    metrics["objective"] = objective
    return objective, metrics


def _lm_token_stats(model, x_BxLxD: jax.Array, targets_BxL: jax.Array):
    """(-log p(target), logZ, hit) per position, f32 [B, L], from the LM head's logits.

    A hit is a target whose logit is the largest: the max that logZ subtracts anyway, where an
    argmax would be one more pass over the [B, L, V] logits (a tenth of a CPU train step). Only an
    exact tie for the top logit tells them apart (counted as a hit here, as a hit only for the
    first of the tied ids by argmax)."""
    logits_BxLxV = model.lm_logits(x_BxLxD).astype(jnp.float32)
    target_BxL, logz_BxL, max_BxL = _target_logz_max(logits_BxLxV, targets_BxL)
    return logz_BxL - target_BxL, logz_BxL, (target_BxL >= max_BxL).astype(jnp.float32)


def _chunked_token_stats(model, x_BxLxD: jax.Array, targets_BxL: jax.Array):
    """`_lm_token_stats` over chunks of `loss_chunk_size` positions of every row, one chunk's f32
    [B, C, V] logits alive at a time, in the forward and (rematerialised) in the backward.

    Chunks cut the length, not the flattened B*L tokens: the batch dim keeps its ("data", "fsdp")
    sharding, so every device computes its own rows' logits with no data movement, whereas a
    chunk of B*L tokens lies on one device's rows (or straddles two) and the loop would hand it
    around the mesh. A chunk thus holds B * loss_chunk_size tokens; a tail shorter than a chunk is
    padded (target 0, a valid id) and its positions are dropped from the outputs. Under data
    parallelism the backward reduces the LM head's gradient across devices once per chunk (the loop
    cannot carry an unreduced sum): fewer, longer chunks communicate less.
    """
    B, L, D = x_BxLxD.shape
    C = min(model.cfg.loss_chunk_size, L)
    K = -(-L // C)
    pad = K * C - L
    x_KxBxCxD = jnp.pad(x_BxLxD, ((0, 0), (0, pad), (0, 0))).reshape(B, K, C, D).swapaxes(0, 1)
    x_KxBxCxD = sharding.constrain(x_KxBxCxD, (None, "batch", "length", None), model.rules)
    targets_KxBxC = jnp.pad(targets_BxL, ((0, 0), (0, pad))).reshape(B, K, C).swapaxes(0, 1)

    # Checkpointed: the backward recomputes a chunk's logits rather than the scan saving every
    # chunk's softmax (which would be the full [B, L, V] again). No CSE to prevent inside a scan.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_stats(xs):
        return _lm_token_stats(model, *xs)

    stats_KxBxC = jax.lax.map(chunk_stats, (x_KxBxCxD, targets_KxBxC))
    return tuple(s.swapaxes(0, 1).reshape(B, K * C)[:, :L] for s in stats_KxBxC)


def _target_logz_max(logits_BxLxC: jax.Array, targets_BxL: jax.Array):
    """(target logit, logZ, largest logit), each f32 [B, L]. Like the embedding lookups, a target
    outside [0, C), negative too, reads NaN."""
    max_BxL = jax.lax.stop_gradient(jnp.max(logits_BxLxC, axis=-1))
    # jax.nn.logsumexp's formula for finite logits, sharing the max with the caller.
    logz_BxL = max_BxL + jnp.log(jnp.sum(jnp.exp(logits_BxLxC - max_BxL[..., None]), axis=-1))
    target_BxL = jnp.take_along_axis(logits_BxLxC, targets_BxL[..., None], axis=-1, mode="fill",
                                     fill_value=jnp.nan, wrap_negative_indices=False)[..., 0]
    return target_BxL, logz_BxL, max_BxL


def _token_nll(logits_BxLxC: jax.Array, targets_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(-log p(target) [B, L], logZ [B, L]) in f32."""
    target_BxL, logz_BxL, _ = _target_logz_max(logits_BxLxC, targets_BxL)
    return logz_BxL - target_BxL, logz_BxL


def _tag_cross_entropy(logits_BxLxT: jax.Array, tags_BxL: jax.Array, weights_BxL: jax.Array):
    """(summed cross entropy, number of targets, argmax hits) over real positions whose target is
    not PAD (no such token: past a segment's end or BOS)."""
    w_BxL = weights_BxL * (tags_BxL != PAD_ID)
    nll_BxL, _ = _token_nll(logits_BxLxT, tags_BxL)
    # PAD means "no tag": a prediction is the best real tag (as self tags forecast it).
    hits_BxL = (jnp.argmax(logits_BxLxT[..., PAD_ID + 1:], axis=-1) + PAD_ID + 1 == tags_BxL).astype(jnp.float32)
    return jnp.sum(nll_BxL * w_BxL), jnp.sum(w_BxL), jnp.sum(hits_BxL * w_BxL)


def jit_loss_fn(
    graphdef: nnx.GraphDef,
    state_sharding: Any,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules | None = None,
    *,
    with_grad: bool = True,
) -> Callable:
    """One `jax.jit` of forward + loss (+ gradients) with in/out shardings (what pjit was).

    Returns `fn(state, batch) -> (loss, metrics, grads)` (grads sharded like the params), or
    `(loss, metrics)` when `with_grad=False`. Batch arrays are sharded over the rules' batch
    axes; put them there with `jax.device_put(batch, sharding.batch_sharding(mesh, rules))`
    (or `jax.make_array_from_process_local_data` on several hosts).
    """
    rules = sharding.resolve_rules(rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def objective(state, batch):
        return loss_and_metrics(nnx.merge(graphdef, state), batch)

    if with_grad:
        def step(state, batch):
            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state, batch)
            return loss, metrics, grads
        out_shardings = (replicated, replicated, state_sharding)
    else:
        step, out_shardings = objective, (replicated, replicated)

    jitted = jax.jit(step, in_shardings=(state_sharding, sharding.batch_sharding(mesh, rules)),
                     out_shardings=out_shardings)

    def run(state, batch):
        with jax.set_mesh(mesh):  # activation constraints read the mesh while tracing
            return jitted(state, batch)

    return run


def synthetic_batch(cfg: ModelConfig, batch_size: int, length: int, seed: int = 0,
                    docs_per_row: int = 2) -> dict[str, np.ndarray]:
    """A random packed batch in the loader's format (for tests and benchmarks).

    Each row holds `docs_per_row` documents then padding: segment ids 1.., positions
    restarting at 0, BOS (0) input at each segment start, tags NONE there, and all
    features 0 on padding. Row 0 has no padding so full-length rows are covered too.
    """
    rng = np.random.default_rng(seed)
    names = ["decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
             "decoder_positions", "decoder_loss_weights"] + [METADATA_PREFIX + n for n in cfg.metadata_names] + [
                 target_feature(n, a) for n, _, a, _ in cfg.tag_heads]
    batch = {k: np.zeros((batch_size, length), np.int32) for k in names}
    for b in range(batch_size):
        used = length if b == 0 else int(rng.integers(length // 2, length + 1))
        cuts = np.sort(rng.choice(np.arange(2, used - 1), docs_per_row - 1, replace=False))
        for seg, (start, end) in enumerate(zip([0, *cuts], [*cuts, used]), start=1):
            n = end - start
            targets = rng.integers(2, cfg.vocab_size, n)
            batch["decoder_target_tokens"][b, start:end] = targets
            batch["decoder_input_tokens"][b, start + 1:end] = targets[:-1]
            batch["decoder_segment_ids"][b, start:end] = seg
            batch["decoder_positions"][b, start:end] = np.arange(n)
            batch["decoder_loss_weights"][b, start:end] = 1
            for name, size in cfg.metadata:
                tags = batch[METADATA_PREFIX + name]
                tags[b, start:end] = rng.integers(NUM_RESERVED_TAGS, size, n)  # labels
                tags[b, start] = NONE_ID  # on the BOS input
            for name, size, ahead, _ in cfg.tag_heads:
                # Position i's target is token i+ahead's tag: PAD (no target) at BOS and past the end.
                i_N = np.arange(n)
                real_N = (i_N + ahead >= 1) & (i_N + ahead <= n)
                batch[target_feature(name, ahead)][b, start:end] = np.where(
                    real_N, rng.integers(NUM_RESERVED_TAGS, size, n), PAD_ID)
    return batch
