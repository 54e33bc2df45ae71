"""The LIME tag shift and per-document preparation for packing (numpy only), shared by the
Grain loader, evaluation and `lime-jax show`.

The batch contract (docs/architecture.md, "Batches"): the metadata the model sees at position i
of a segment are the tags of target token `i - 1 + shift` of the same segment, NONE outside it.

A document longer than `seq_len` is first split into pieces of at most `seq_len`; every piece is
its own segment (input starts with BOS = 0, positions restart at 0) and the shift is applied
within the piece, so tags never cross a segment boundary. The SeqIO feature converter
(`seqio_features.py`) follows the same rule.
"""
from __future__ import annotations

import numpy as np

from lime_jax.ids import BOS_INPUT_ID, NONE_ID, PAD_ID


def split_document(doc_FxL: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Splits a [F, L] document into consecutive [F, <= seq_len] pieces."""
    length = doc_FxL.shape[1]
    return [doc_FxL[:, start:start + seq_len] for start in range(0, length, seq_len)]


def shift_tags(tags_KxN: np.ndarray, shift: int, fill: int = NONE_ID) -> np.ndarray:
    """The LIME shift: token j of a sequence carries the tags of token `j + shift` of the same
    sequence, `fill` (NONE) where that falls outside it (0 LIME, +1 LIME+1, -1 leakage control).

    The one definition of the shift; `[N]` or `[K, N]` (K tag features over the last axis).
    """
    tags_KxN = np.asarray(tags_KxN)
    n = tags_KxN.shape[-1]
    out_KxN = np.full(tags_KxN.shape, fill, dtype=np.int32)
    if 0 <= shift < n:
        out_KxN[..., :n - shift] = tags_KxN[..., shift:]
    elif 0 < -shift < n:
        out_KxN[..., -shift:] = tags_KxN[..., :n + shift]
    return out_KxN


def input_tags(tags_KxN: np.ndarray, shift: int, fill: int = NONE_ID) -> np.ndarray:
    """Tags the model sees at input position i of a segment: those of target `i - 1 + shift`.

    The inputs are BOS followed by the targets but the last, and BOS carries `fill` (NONE), as
    does every position outside the segment: this is `shift_tags` over `[fill] + tags`, cut to
    the segment's length. The TF twin (`seqio_features.input_tags_tf`) follows the same rule.
    """
    tags_KxN = np.asarray(tags_KxN)
    bos_Kx1 = np.full(tags_KxN.shape[:-1] + (1,), fill, dtype=np.int32)
    return shift_tags(np.concatenate([bos_Kx1, tags_KxN], axis=-1), shift, fill)[..., :-1]


def head_targets(tags_N: np.ndarray, ahead: int) -> np.ndarray:
    """A tag head's targets (model/heads.py): position i of a segment gets the tag of token
    t_{i+ahead} (t_0 = BOS), the input-tag rule with shift `ahead`, but PAD (no target) where that
    token is BOS or past the end, which the loss skips."""
    return input_tags(tags_N, ahead, fill=PAD_ID)


def piece_columns(piece_FxN: np.ndarray, tag_rows: list[int], shift: int,
                  head_rows: list[tuple[int, int]] = ()) -> np.ndarray:
    """One segment as an [N, 2 + K + H] array: target tokens, input tokens, K metadata inputs, then
    H tag-head targets.

    Row 0 of `piece_FxN` is `targets`; `tag_rows` selects the tag features to feed the model;
    `head_rows` the (feature row, ahead) of each tag head.
    """
    targets_N = piece_FxN[0]
    n = targets_N.shape[0]
    k = len(tag_rows)
    cols_CxN = np.empty((2 + k + len(head_rows), n), dtype=np.int32)
    cols_CxN[0] = targets_N
    cols_CxN[1, 0] = BOS_INPUT_ID
    cols_CxN[1, 1:] = targets_N[:-1]
    if tag_rows:
        cols_CxN[2:2 + k] = input_tags(piece_FxN[tag_rows], shift)
    for h, (row, ahead) in enumerate(head_rows):
        cols_CxN[2 + k + h] = head_targets(piece_FxN[row], ahead)
    return np.ascontiguousarray(cols_CxN.T)


def columns_to_batch(packed_BxLxC: np.ndarray, segment_ids_BxL: np.ndarray,
                     positions_BxL: np.ndarray, tag_names: list[str],
                     head_features: list[str] = ()) -> dict[str, np.ndarray]:
    """Packed [B, L, 2 + K + H] columns -> the batch contract's `decoder_*` arrays (int32 [B, L]);
    `head_features` names the H tag-head target columns."""
    segment_ids_BxL = segment_ids_BxL.astype(np.int32)
    real_BxL = segment_ids_BxL > 0
    batch = {
        "decoder_target_tokens": packed_BxLxC[..., 0],
        "decoder_input_tokens": packed_BxLxC[..., 1],
        "decoder_segment_ids": segment_ids_BxL,
        # Packers leave positions of padding unspecified; the contract wants 0 there.
        "decoder_positions": np.where(real_BxL, positions_BxL, 0).astype(np.int32),
        "decoder_loss_weights": real_BxL.astype(np.int32),
    }
    for k, name in enumerate(tag_names):
        batch[f"decoder_input_{name}"] = packed_BxLxC[..., 2 + k]
    for h, feature in enumerate(head_features):
        batch[feature] = packed_BxLxC[..., 2 + len(tag_names) + h]
    return {k: np.ascontiguousarray(v, dtype=np.int32) for k, v in batch.items()}
