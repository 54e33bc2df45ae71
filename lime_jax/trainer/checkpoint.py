"""Orbax checkpoints of a training run: one step directory holds everything needed to resume.

Items in each checkpoint (`<model_dir>/checkpoints/<step>/`), from one `state.TrainState`:
- `params`: model parameters (NNX state), restored sharded onto the current mesh;
- `opt_state`: the optimizer state;
- `train`: `{"step": int32, "rng": uint32 key data}`;
- `data`: the data iterator's state (a Grain `DatasetIterator`: the loader's, or SeqIO's via
  `data.seqio_source`), one JSON file per process, via Grain's Orbax handler;
- `lime_jax_seal.json`: size and sha256 of every file above (written by lime_jax).

Saves are async (arrays are copied off-device before `save` returns, files are written in the
background) and committed atomically by Orbax: a step directory without its commit marker is
never listed. Orbax does not check what it reads back (a truncated or edited file can restore
as garbage, or crash the reader), so every save is sealed: the seal is written into the
temporary step directory just before Orbax commits it, and a restore first checks every file
against it. Resume takes the newest checkpoint that passes, warns naming each damaged one
(moved aside to `checkpoints.damaged/`, never deleted), and fails with `CheckpointError` if
none is intact. Retention keeps the last N and, optionally, the best by eval loss.

Nothing here unpickles: Orbax reads OCDBT/zarr arrays and JSON, Grain reads JSON.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from lime_jax.hashing import sha256_file
from lime_jax.trainer.state import TrainState

log = logging.getLogger("lime_jax.trainer.checkpoint")

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "checkpoints.damaged"
EVAL_LOSS_KEY = "eval_loss"
SEAL_NAME = "lime_jax_seal.json"
REQUIRED_ITEMS = ("params", "opt_state", "train")
# Files Orbax writes or rewrites while committing, after the seal: not sealed.
_UNSEALED = {SEAL_NAME, "_CHECKPOINT_METADATA", "commit_success.txt"}


class CheckpointError(RuntimeError):
    """A checkpoint save failed, or there is no intact checkpoint to restore."""


class NoIntactCheckpointError(CheckpointError, FileNotFoundError):
    """The model dir holds no checkpoint (of the asked step) whose files match their seal."""


def checkpoint_dir(model_dir: str) -> str:
    return os.path.join(os.path.abspath(model_dir), CHECKPOINT_SUBDIR)


def _grain_args():
    import grain.checkpoint as gc  # registers Grain's handler with Orbax

    return gc.CheckpointSave, gc.CheckpointRestore


def _sealed_files(step_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(root, f), step_dir) for f in files if f not in _UNSEALED]
    return sorted(out)


def write_seal(step_dir: str) -> None:
    """Records size and sha256 of every file of a written step directory (atomically)."""
    files = {rel: {"bytes": os.path.getsize(os.path.join(step_dir, rel)),
                   "sha256": sha256_file(os.path.join(step_dir, rel))} for rel in _sealed_files(step_dir)}
    tmp = os.path.join(step_dir, f".{SEAL_NAME}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": "lime_jax.seal.v1", "files": files}, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, SEAL_NAME))


def check_step_dir(step_dir: str, required_items: tuple[str, ...] = REQUIRED_ITEMS) -> str | None:
    """What is wrong with a committed step directory, or None when every sealed file matches."""
    seal_path = os.path.join(step_dir, SEAL_NAME)
    if not os.path.isfile(seal_path):
        return (f"no {SEAL_NAME} (the save was interrupted before its commit finished, or the "
                "directory was not written by lime_jax)")
    try:
        with open(seal_path, encoding="utf-8") as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError) as e:
        return f"{SEAL_NAME} is unreadable ({e})"
    for item in required_items:
        if not any(rel.split(os.sep)[0] == item for rel in files):
            return f"item {item!r} was not saved in this checkpoint"
        if not os.path.isdir(os.path.join(step_dir, item)):
            return f"item {item!r} is missing"
    for rel, want in sorted(files.items()):
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            return f"file {rel} is missing"
        size = os.path.getsize(path)
        if size != want["bytes"]:
            return f"file {rel} has {size} bytes, sealed with {want['bytes']} (truncated or rewritten)"
        if sha256_file(path) != want["sha256"]:
            return f"file {rel} does not match its sha256 in {SEAL_NAME} (corrupt or edited)"
    extra = sorted(set(_sealed_files(step_dir)) - set(files))
    if extra:  # Orbax reads some files by name (e.g. an item's `checkpoint`): refuse additions
        return f"file {extra[0]} was added after the checkpoint was sealed"
    return None


def _items(arg_cls, state: TrainState, data_iter: Any | None, *, restoring: bool) -> dict:
    """A checkpoint's items, for saving or restoring alike: params, optimizer state, step + RNG,
    and the data iterator's position (when there is one)."""
    items = {"params": arg_cls(state.params), "opt_state": arg_cls(state.opt_state),
             "train": arg_cls({"step": state.step, "rng": state.rng})}
    if data_iter is not None:
        save_cls, restore_cls = _grain_args()
        items["data"] = (restore_cls if restoring else save_cls)(data_iter)
    return items


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
            # Runs in the save thread after all files are written, before Orbax commits.
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_saving_step)
            if async_save else None,
        )
        self.model_dir = os.path.abspath(model_dir)
        self.directory = checkpoint_dir(model_dir)
        self._async = async_save
        self._saving_step: int | None = None
        self._save_error: Exception | None = None
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest committed step (not yet checked against its seal)."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _seal_saving_step(self) -> None:
        if jax.process_index() != 0 or self._saving_step is None:
            return
        # Not yet committed: the step's files sit in Orbax's temporary directory (renamed on
        # commit), or, on filesystems where Orbax commits with a marker file, in the final one.
        tmp = sorted(glob.glob(os.path.join(self.directory, f"{self._saving_step}.orbax-checkpoint-tmp*")))
        write_seal(tmp[-1] if tmp else self.step_dir(self._saving_step))

    def _check_previous_save(self) -> None:
        if self._save_error is not None:
            return  # reported once already; Orbax would raise it on every later call
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            self._save_error = e
            if jax.process_index() == 0:  # free the space of the failed save (a full disk)
                for tmp in glob.glob(os.path.join(self.directory, f"{self._saving_step}.orbax-checkpoint-tmp*")):
                    shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"saving checkpoint step {self._saving_step} to {self.directory} failed: "
                f"{type(e).__name__}: {e}; the checkpoints already committed are untouched "
                f"(steps {self.all_steps()})") from e

    def save(self, step: int, state: TrainState, data_iter: Any | None,
             metrics: dict[str, float] | None = None) -> None:
        """Starts an async save of `step`; returns once the arrays are off the device.

        Raises CheckpointError when this or the previous (background) save failed.
        """
        self._check_previous_save()
        items = _items(ocp.args.StandardSave, state, data_iter, restoring=False)
        self._saving_step = step
        try:
            self._mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        except Exception as e:
            raise CheckpointError(f"saving checkpoint step {step} to {self.directory} failed: "
                                  f"{type(e).__name__}: {e}") from e
        if not self._async and jax.process_index() == 0:
            write_seal(self.step_dir(step))  # sync saves are committed when save() returns

    def restore(self, step: int, abstract: TrainState, data_iter: Any | None) -> TrainState:
        """Restores `step` (unchecked) onto the shardings carried by `abstract`'s leaves
        (`state.with_shardings`).

        `data_iter` (a fresh iterator) is set to the saved position in place.
        """
        items = _items(ocp.args.StandardRestore, abstract, data_iter, restoring=True)
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        return TrainState(params=out["params"], opt_state=out["opt_state"],
                          step=out["train"]["step"], rng=out["train"]["rng"])

    def restore_newest_intact(self, abstract: TrainState, data_iter: Any | None) -> tuple[int, TrainState]:
        """Restores the newest checkpoint whose files match their seal: `(step, state)`.

        Each damaged newer one is reported in a warning and moved to `checkpoints.damaged/`
        (so the run can save that step again); raises CheckpointError if none is intact.
        """
        required = REQUIRED_ITEMS + (("data",) if data_iter is not None else ())
        problems = []
        for step in sorted(self.all_steps(), reverse=True):
            problem = check_step_dir(self.step_dir(step), required)
            if problem is None:
                try:
                    state = self.restore(step, abstract, data_iter)
                except Exception as e:  # sealed but unreadable here (e.g. another model config)
                    raise CheckpointError(f"checkpoint {self.step_dir(step)} is intact but cannot be "
                                          f"restored into this run: {type(e).__name__}: {e}") from e
                saved_step = int(state.step)
                if saved_step == step:
                    self._quarantine([s for s, _ in problems])
                    return step, state
                problem = f"it holds step {saved_step}"
            log.warning("checkpoint %s is damaged: %s; falling back to an older checkpoint",
                        self.step_dir(step), problem)
            problems.append((step, problem))
        if not problems:
            raise NoIntactCheckpointError(f"no checkpoint in {self.directory}")
        raise NoIntactCheckpointError(f"no intact checkpoint in {self.directory}: " + "; ".join(
            f"step {s}: {p}" for s, p in problems) + ". Move the directory away to start afresh.")

    def _quarantine(self, steps: list[int]) -> None:
        if not steps or jax.process_index() != 0:
            return
        dest_root = os.path.join(self.model_dir, DAMAGED_SUBDIR)
        os.makedirs(dest_root, exist_ok=True)
        for step in steps:
            dest = os.path.join(dest_root, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
            shutil.move(self.step_dir(step), dest)
            log.warning("moved damaged checkpoint %s to %s", self.step_dir(step), dest)
        self._mngr.reload()

    def wait(self) -> None:
        self._check_previous_save()

    def close(self) -> None:
        try:
            self._check_previous_save()
        finally:
            try:
                self._mngr.close()
            except Exception:
                if self._save_error is None:
                    raise


def restore_params(model_dir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """Restores only the parameters (for evaluation or generation): `(params, step)`.

    `abstract_params` is an abstract NNX state (e.g. from `nnx.eval_shape`); its leaves may be
    `jax.ShapeDtypeStruct`s with shardings (see `state.with_shardings`), otherwise arrays land on the
    default device. `step=None` takes the newest intact checkpoint (warning about damaged newer
    ones); a given step must be intact. Raises CheckpointError otherwise.
    """
    directory = checkpoint_dir(model_dir)
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        steps = sorted(mngr.all_steps(), reverse=True)
        if step is not None and step not in steps:
            raise NoIntactCheckpointError(f"no checkpoint for step {step} in {directory}; have {sorted(steps)}")
        problems = []
        for s in ([step] if step is not None else steps):
            problem = check_step_dir(os.path.join(directory, str(s)), ("params",))
            if problem is None:
                out = mngr.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
                return out["params"], s
            log.warning("checkpoint %s is damaged: %s", os.path.join(directory, str(s)), problem)
            problems.append(f"step {s}: {problem}")
        raise NoIntactCheckpointError(f"no intact checkpoint in {directory}" + (": " + "; ".join(problems) if problems else ""))
    finally:
        mngr.close()
