"""Orbax checkpoints of a training run: one step directory holds everything needed to resume.

Items in each checkpoint (`<model_dir>/checkpoints/<step>/`):
- `params`: model parameters (NNX state), restored sharded onto the current mesh;
- `opt_state`: the optimizer state;
- `train`: `{"step": int32, "rng": uint32 key data}`;
- `data`: the Grain iterator state (one JSON file per process, via Grain's Orbax handler).

Saves are async (arrays are copied off-device before `save` returns, files are written in the
background) and committed atomically by Orbax: a step directory without its commit marker is
never listed, so resume always starts from the latest *complete* checkpoint. Retention keeps
the last N and, optionally, the best by eval loss.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

log = logging.getLogger("lime_jax.checkpoint")

CHECKPOINT_SUBDIR = "checkpoints"
EVAL_LOSS_KEY = "eval_loss"


def checkpoint_dir(model_dir: str) -> str:
    return os.path.join(os.path.abspath(model_dir), CHECKPOINT_SUBDIR)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStruct tree carrying a sharding per leaf: the restore target for Orbax."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _grain_args():
    import grain.checkpoint as gc  # registers Grain's handler with Orbax

    return gc.CheckpointSave, gc.CheckpointRestore


class Checkpointer:
    """Saves and restores train state + data iterator in one Orbax CheckpointManager."""

    def __init__(self, model_dir: str, keep: int = 3, keep_best: bool = False,
                 async_save: bool = True, read_only: bool = False):
        policies: list[Any] = [cm.LatestN(n=keep)]
        if keep_best:
            # reverse=True sorts descending, and BestN keeps the tail: the lowest eval losses.
            policies.append(cm.BestN(get_metric_fn=lambda m: m[EVAL_LOSS_KEY], reverse=True, n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self.directory = checkpoint_dir(model_dir)
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, train: Any, data_iter: Any | None,
             metrics: dict[str, float] | None = None) -> None:
        """Starts an async save of `step`; returns once the arrays are off the device."""
        items = {
            "params": ocp.args.StandardSave(params),
            "opt_state": ocp.args.StandardSave(opt_state),
            "train": ocp.args.StandardSave(train),
        }
        if data_iter is not None:
            save_cls, _ = _grain_args()
            items["data"] = save_cls(data_iter)
        self._mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any,
                abstract_train: Any, data_iter: Any | None) -> tuple[Any, Any, Any]:
        """Restores `step` onto the shardings carried by the abstract trees.

        `data_iter` (a fresh Grain iterator) is set to the saved position in place.
        """
        items = {
            "params": ocp.args.StandardRestore(abstract_params),
            "opt_state": ocp.args.StandardRestore(abstract_opt_state),
            "train": ocp.args.StandardRestore(abstract_train),
        }
        if data_iter is not None:
            _, restore_cls = _grain_args()
            items["data"] = restore_cls(data_iter)
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        return out["params"], out["opt_state"], out["train"]

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def restore_params(model_dir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """Restores only the parameters (for evaluation or generation): `(params, step)`.

    `abstract_params` is an abstract NNX state (e.g. from `nnx.eval_shape`); its leaves may be
    `jax.ShapeDtypeStruct`s with shardings (see `with_shardings`), otherwise arrays land on the
    default device. `step=None` takes the latest complete checkpoint.
    """
    mngr = ocp.CheckpointManager(
        checkpoint_dir(model_dir), options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir(model_dir)}")
        if step not in mngr.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {checkpoint_dir(model_dir)}; have {list(mngr.all_steps())}")
        out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return out["params"], step
    finally:
        mngr.close()
