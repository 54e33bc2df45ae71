"""The train state: one pytree of everything a step updates, built sharded from abstract shapes.

`TrainState(params, opt_state, step, rng)` is what the jitted step takes (donated) and returns,
what the checkpointer saves, and what a resume restores onto the current mesh.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lime_jax.model import ModelConfig, create_sharded_model, sharding


@flax.struct.dataclass
class TrainState:
    params: Any  # nnx.State of the model's nnx.Param variables
    opt_state: Any  # optax state over `params`
    step: jax.Array  # int32 []: optimizer updates applied so far
    rng: jax.Array  # uint32 key data: the run's key (metadata dropout folds the step in)


def _key_data(seed: int) -> jax.Array:
    return jax.random.key_data(jax.random.key(seed))


def abstract_train_state(abstract_params: Any, tx: optax.GradientTransformation) -> TrainState:
    """The state's shapes and dtypes (`jax.ShapeDtypeStruct` leaves), nothing allocated."""
    return TrainState(params=abstract_params, opt_state=jax.eval_shape(tx.init, abstract_params),
                      step=jax.ShapeDtypeStruct((), jnp.int32), rng=jax.eval_shape(_key_data, 0))


def train_state_shardings(abstract: TrainState, mesh, rules: sharding.Rules) -> TrainState:
    """Parameters and optimizer moments by their logical axes; step and rng replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(params=sharding.state_shardings(abstract.params, mesh, rules),
                      opt_state=sharding.state_shardings(abstract.opt_state, mesh, rules),
                      step=replicated, rng=replicated)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """A `jax.ShapeDtypeStruct` tree carrying a sharding per leaf: a restore or lowering target."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def init_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, rules: sharding.Rules,
                     shardings: TrainState, seed: int) -> TrainState:
    """A fresh state, each array created directly with its sharding (never whole on one device)."""
    _, params = create_sharded_model(cfg, mesh, rules, seed=seed)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step, rng = jax.device_put((jnp.zeros((), jnp.int32), _key_data(seed)), (shardings.step, shardings.rng))
    return TrainState(params=params, opt_state=opt_state, step=step, rng=rng)
