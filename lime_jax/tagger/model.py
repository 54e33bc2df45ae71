"""A causal POS/NER tagger: the decoder's trunk (embedding, causal blocks) with two tag heads.

The tag of piece i is predicted from pieces <= i only, so LIME (and previous-piece) runs can use
it as an honest tag source in training, evaluation and generation (a LIME+1 run would need the
tags of the piece not yet generated). Causality is by construction: the blocks are
`lime_jax.model.decoder.Block`s under causal, within-segment attention, and every
other layer (embedding, norms, MLPs, heads) acts per position. Packed batches work as in the
decoder: segment ids keep documents apart, positions restart at 0 per document.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lime_jax.model import sharding
from lime_jax.model.config import ModelConfig
from lime_jax.model.decoder import RMSNorm, apply_blocks, make_blocks
from lime_jax.model.embed import LimeEmbed

TAGS = ("pos", "ner")  # head order; tag() returns rows in this order


class TaggerModel(nnx.Module):
    """`model(pieces_BxL, segment_ids=..., positions=...)` -> (pos [B, L, P], ner [B, L, N]) f32
    logits.

    `cfg` shapes the trunk (its `metadata` must be empty: the tagger reads pieces only);
    `tag_sizes` maps each of TAGS to its vocabulary size (reserved ids included).
    """

    def __init__(self, cfg: ModelConfig, tag_sizes: dict[str, int], *, rngs: nnx.Rngs):
        if cfg.metadata:
            raise ValueError(f"the tagger reads pieces only; its ModelConfig.metadata must be empty, "
                             f"got {cfg.metadata}")
        if sorted(tag_sizes) != sorted(TAGS):
            raise ValueError(f"tag_sizes must give a size for each of {TAGS}, got {tag_sizes}")
        self.cfg = cfg
        self.tag_sizes = dict(tag_sizes)
        self.rules = sharding.resolve_rules(None)
        self.embed = LimeEmbed(cfg, rngs=rngs, rules=self.rules)
        self.blocks = make_blocks(cfg, self.rules, rngs)
        self.final_norm = RMSNorm(cfg)
        std = 1.0 / math.sqrt(cfg.d_model)
        self.heads = nnx.Dict({
            name: sharding.init_param(rngs.params(), (cfg.d_model, tag_sizes[name]), ("embed", "tags"),
                                      cfg.param_dtype, std=std)
            for name in TAGS})

    def __call__(self, pieces_BxL: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        if (segment_ids is None) != (positions is None):
            raise ValueError("pass segment_ids and positions together (packed batches), or neither")
        if segment_ids is None:  # one document per row
            positions = jnp.broadcast_to(jnp.arange(pieces_BxL.shape[1], dtype=jnp.int32), pieces_BxL.shape)
        x_BxLxD = self.embed(pieces_BxL)
        x_BxLxD = self.final_norm(apply_blocks(self.blocks, self.cfg, self.rules, x_BxLxD, positions, segment_ids))
        dt = self.cfg.jnp_dtype
        return tuple(jnp.einsum("bld,dt->blt", x_BxLxD, self.heads[name][...].astype(dt),
                                preferred_element_type=jnp.float32) for name in TAGS)


def tag_loss(model: TaggerModel, pieces_BxL, pos_BxL, ner_BxL, segment_ids_BxL, positions_BxL):
    """Summed POS + NER cross entropy, each a mean over real pieces (segment id > 0).

    Returns (loss, metrics) with f32 `loss_pos`, `loss_ner`, `correct_pos`, `correct_ner` and
    `num_pieces`. PAD (0) only sits on padding, which has weight 0: it is never a target.
    """
    logits = model(pieces_BxL, segment_ids_BxL, positions_BxL)
    w_BxL = (segment_ids_BxL > 0).astype(jnp.float32)
    n = jnp.maximum(w_BxL.sum(), 1.0)
    loss, metrics = 0.0, {"num_pieces": w_BxL.sum()}
    for name, logits_BxLxT, tags_BxL in zip(TAGS, logits, (pos_BxL, ner_BxL)):
        logp_BxLxT = jax.nn.log_softmax(logits_BxLxT, axis=-1)
        nll_BxL = -jnp.take_along_axis(logp_BxLxT, tags_BxL[..., None], axis=-1)[..., 0]
        mean = (nll_BxL * w_BxL).sum() / n
        loss = loss + mean
        metrics[f"loss_{name}"] = mean
        metrics[f"correct_{name}"] = ((logits_BxLxT.argmax(-1) == tags_BxL) * w_BxL).sum()
    return loss, metrics
