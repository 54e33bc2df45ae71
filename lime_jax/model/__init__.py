"""LIME model: config, metadata-aware embedding, sharded decoder and loss (no data/TF imports)."""
from lime_jax.model.config import ModelConfig
from lime_jax.model.decoder import Decoder, abstract_model, create_sharded_model
from lime_jax.model.embed import LimeEmbed
from lime_jax.model.loss import jit_loss_fn, loss_and_metrics, metadata_from_batch, synthetic_batch
from lime_jax.model.sharding import (
    DEFAULT_RULES,
    LOGICAL_AXES,
    MESH_AXES,
    batch_sharding,
    create_sharded,
    logical_to_pspec,
    make_mesh,
    sharding_rules,
    state_shardings,
)

__all__ = [
    "DEFAULT_RULES", "LOGICAL_AXES", "MESH_AXES", "Decoder", "LimeEmbed", "ModelConfig",
    "abstract_model", "batch_sharding", "create_sharded", "create_sharded_model",
    "jit_loss_fn", "logical_to_pspec", "loss_and_metrics", "make_mesh", "metadata_from_batch",
    "sharding_rules", "state_shardings", "synthetic_batch",
]
