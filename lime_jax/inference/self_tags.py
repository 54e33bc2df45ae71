"""Self tags (`--tags self`): a model with tag heads feeds itself its own forecast.

Position i is fed the tags of token t_{i+shift} (docs/architecture.md, "Batches"). The head of
table `d` with `ahead = shift + 1` (model/heads.py), read at position i-1, forecasts exactly those
tags, before t_i is known. So one pass per position suffices: after position i-1 runs, its head
logits give the tags position i is fed. Tags of BOS and before are NONE, as in training; position
0 of a shift >= 1 model needs the tags of t_1, which nothing has forecast yet: PAD (no metadata).
A table without such a head gets PAD at every position (`forecast_heads` says which).

Self tags never see the text they help predict, for any shift: honest (tag_sources.is_honest).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from lime_jax.features import head_id
from lime_jax.ids import NONE_ID, PAD_ID


def forecast_heads(cfg, shift: int) -> list[str | None]:
    """Per metadata table, the id of the head that forecasts its input tags, or None."""
    have = set(cfg.head_ids)
    return [head_id(name, shift + 1) if head_id(name, shift + 1) in have else None for name in cfg.metadata_names]


def require_forecast(cfg, shift: int, model_dir: str) -> list[str | None]:
    """`forecast_heads`, or a clear error when the model forecasts none of its tables."""
    heads = forecast_heads(cfg, shift)
    if not cfg.metadata_names or not any(heads):
        raise ValueError(
            f"--tags self: {model_dir} has no tag head forecasting its input tags (metadata "
            f"{list(cfg.metadata_names)}, shift {shift}, heads {list(cfg.head_ids)}); self tags need "
            f"ModelConfig.tag_heads with ahead = {shift + 1} (gin/runs/lime_self.gin, lime_plus1_self.gin)")
    return heads


def first_tags(shift: int, num_tables: int) -> np.ndarray:
    """Tags fed at position 0 (BOS): NONE when they are BOS's own or earlier, else PAD."""
    return np.full((num_tables,), NONE_ID if shift <= 0 else PAD_ID, np.int32)


def _forecast_KxBxT(head_logits, heads: Sequence[str | None], batch: int, xp=np):
    """int32 [K, B, T] tags of every position's head logits ([B, T, tags]; at least one head),
    by numpy or, traced, by jax.numpy (`xp`): PAD is never forecast (it means "no metadata"),
    and tables without a head get PAD."""
    pad_BxT = xp.full((batch, next(iter(head_logits.values())).shape[1]), PAD_ID, xp.int32)
    return xp.stack([pad_BxT if hid is None else
                     (xp.argmax(head_logits[hid][..., PAD_ID + 1:], axis=-1) + PAD_ID + 1).astype(xp.int32)
                     for hid in heads])


def forecast_all(head_logits: Mapping[str, np.ndarray], heads: Sequence[str | None], batch: int) -> np.ndarray:
    """int32 [K, B, T] tags forecast at every position of head logits [B, T, tags] (device or
    host arrays; the logits of the heads in use come to the host, explicitly)."""
    import jax

    return _forecast_KxBxT(jax.device_get({hid: head_logits[hid] for hid in heads if hid is not None}),
                           heads, batch)


def forecast(head_logits: Mapping[str, np.ndarray], heads: Sequence[str | None], batch: int) -> np.ndarray:
    """int32 [K, B] tags from the last position's head logits ([B, T, tags])."""
    return forecast_all(head_logits, heads, batch)[:, :, -1]


@functools.cache
def _scored_step(heads: tuple[str | None, ...], batch: int):
    """One jitted step result, compiled once per shape: (nll [B], hit [B], forecast [K, B]) of a
    step's logits [B, 1, V], head logits and targets [B]."""
    import jax
    import jax.numpy as jnp

    def fn(logits_Bx1xV, head_logits, targets_B):
        logits_BxV = logits_Bx1xV[:, 0]
        target_B = jnp.take_along_axis(logits_BxV, targets_B[:, None], -1)[:, 0]
        return (jax.nn.logsumexp(logits_BxV, -1) - target_B, jnp.argmax(logits_BxV, -1) == targets_B,
                _forecast_KxBxT(head_logits, heads, batch, jnp)[:, :, -1])

    return jax.jit(fn)


def score_self(inc, shift: int, rows: Sequence[dict], length: int, batch_rows: int
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
    """Teacher-forced scoring with self tags: per row (nll [n], hits [n], fed tags [K, n],
    {head id: forecast hits [n] against the row's `head:<id>` targets, PAD targets excluded}).

    Rows hold `tokens` and `targets` ([n], n <= length, one segment from position 0) and
    optional `head:<id>` targets. Positions run one at a time through the KV cache, each fed the
    forecast of the one before. `inc`: a ShardedDecoder (`LoadedModel.decoder`) or an
    IncrementalDecoder; each step moves its token, tags and target in and (nll, hit, forecast) out.
    """
    import jax

    from lime_jax.inference.generate import as_sharded

    inc = as_sharded(inc)
    cfg = inc.cfg
    names = cfg.metadata_names
    heads = require_forecast(cfg, shift, "the model")
    used = [hid for hid in heads if hid is not None]
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start:start + batch_rows]
        B = len(chunk)
        tokens, targets = np.zeros((B, length), np.int32), np.zeros((B, length), np.int32)
        for r, row in enumerate(chunk):
            tokens[r, :len(row["tokens"])] = row["tokens"]
            targets[r, :len(row["targets"])] = row["targets"]
        cache = inc.init_cache(B, length)
        nll, hits = np.zeros((B, length), np.float32), np.zeros((B, length), bool)
        fed = np.zeros((len(names), B, length), np.int32)
        predicted = {hid: np.zeros((B, length), np.int32) for hid in used}
        tags_KxB = np.repeat(first_tags(shift, len(names))[:, None], B, axis=1)
        for j in range(max(len(r["tokens"]) for r in chunk)):
            fed[:, :, j] = tags_KxB
            logits, head_logits, cache = inc.extend(
                cache, tokens[:, j:j + 1], {n: tags_KxB[k][:, None] for k, n in enumerate(names)}, heads=True)
            step = _scored_step(tuple(heads), B)(logits, {h: head_logits[h] for h in used},
                                                 inc.put(targets[:, j], B))
            nll[:, j], hits[:, j], forecast_KxB = jax.device_get(step)
            # Where t_{j+1+shift} is BOS or earlier (shift < 0), its tags are NONE, as in training.
            tags_KxB = forecast_KxB if j + 1 + shift > 0 else first_tags(shift, len(names))[:, None]
            tags_KxB = np.broadcast_to(tags_KxB, (len(names), B)).copy()
            for hid in predicted:
                predicted[hid][:, j] = tags_KxB[heads.index(hid)]
        for r, row in enumerate(chunk):
            n = len(row["targets"])
            # The forecast made at j is position j+1's input: the head's target at j.
            yield nll[r, :n], hits[r, :n], fed[:, r, :n], head_hits({h: p[r, :n] for h, p in predicted.items()}, row)


def head_hits(predicted: Mapping[str, np.ndarray], row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{head id: hits} of each head's predictions ([n]) against the row's `head:<id>` targets,
    positions without a target (PAD) left out."""
    out = {}
    for hid, pred_N in predicted.items():
        tgt_N = row.get(f"head:{hid}")
        if tgt_N is not None:
            tgt_N = tgt_N[:len(pred_N)]
            out[hid] = (pred_N == tgt_N)[tgt_N != PAD_ID]
    return out
