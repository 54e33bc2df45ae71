"""Orbax checkpoints of a training run: one step directory holds everything needed to resume.

Items in each checkpoint (`<model_dir>/checkpoints/<step>/`), from one `state.TrainState`:
- `params`: model parameters (NNX state), restored sharded onto the current mesh;
- `opt_state`: the optimizer state;
- `train`: `{"step": int32, "rng": uint32 key data}`;
- `data`: the data iterator's state (Grain `DatasetIterator`s: the loader's, or SeqIO's via
  `data.seqio_source`), one JSON file per data shard (`data_state`: resumable on another
  process count);
- `lime_jax_seal.json`: size and sha256 of every file above (written by lime_jax).

Every model-dir path goes through `etils.epath`, as Orbax's own do, so a model dir may be local
or on gs://.

Saves are async (arrays are copied off-device before `save` returns, files are written in the
background) and committed atomically by Orbax: a step directory without its commit marker is
never listed. Orbax does not check what it reads back (a truncated or edited file can restore
as garbage, or crash the reader), so every save is sealed: once Orbax has committed a step,
process 0 hashes its files in a background thread (outside Orbax's commit barrier, which every
process waits on) and writes the seal; the thread is joined at the next save, `wait` or
`close`. A committed step without its seal (the run stopped while sealing) counts as damaged.

A resume checks the seals once, on process 0, newest first, and shares its verdict: every
process restores the newest step that passes, process 0 warns naming each damaged newer one and
moves it to `checkpoints.damaged/` (never deleted), and all processes reload the step list once
it has. No intact step raises `CheckpointError`, and so does process 0 failing to check or move
(e.g. an I/O error), on every process: the others never wait for a verdict that will not come.
Retention keeps the last `keep` >= 2 and, optionally, the best by eval loss: Orbax deletes the
older steps as it commits a new one, before it is sealed, so with one step kept a run stopped
while sealing would leave no intact step.

Nothing here unpickles: Orbax reads OCDBT/zarr arrays and JSON, Grain reads JSON.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as cm

from lime_jax.hashing import sha256_file
from lime_jax.trainer import data_state
from lime_jax.trainer.state import TrainState

log = logging.getLogger("lime_jax.trainer.checkpoint")

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "checkpoints.damaged"
EVAL_LOSS_KEY = "eval_loss"
SEAL_NAME = "lime_jax_seal.json"
REQUIRED_ITEMS = ("params", "opt_state", "train")
# Orbax's own bookkeeping, which it may rewrite after the commit, and the seal: not sealed.
_UNSEALED = {SEAL_NAME, f".{SEAL_NAME}.tmp", "_CHECKPOINT_METADATA", "commit_success.txt"}
# Process 0's verdicts besides a step: none intact; it failed (its error says why).
_NONE_INTACT = -1
_CHIEF_FAILED = -2


class CheckpointError(RuntimeError):
    """A checkpoint save failed, or there is no intact checkpoint to restore."""


class NoIntactCheckpointError(CheckpointError, FileNotFoundError):
    """The model dir holds no checkpoint (of the asked step) whose files match their seal."""


def absolute(path: epath.PathLike) -> epath.Path:
    """`path` as an absolute epath (gs:// paths are absolute already)."""
    path = epath.Path(path)
    return path if path.is_absolute() else path.resolve()


def checkpoint_dir(model_dir: epath.PathLike) -> epath.Path:
    return absolute(model_dir) / CHECKPOINT_SUBDIR


def _sealed_files(step_dir: epath.Path) -> list[str]:
    out = []
    for root, _, files in step_dir.walk():
        out += [(root / f).relative_to(step_dir).as_posix() for f in files if f not in _UNSEALED]
    return sorted(out)


def write_seal(step_dir: epath.PathLike) -> None:
    """Records size and sha256 of every file of a committed step directory (atomically)."""
    step_dir = epath.Path(step_dir)
    files = {rel: {"bytes": (step_dir / rel).stat().length, "sha256": sha256_file(step_dir / rel)}
             for rel in _sealed_files(step_dir)}
    tmp = step_dir / f".{SEAL_NAME}.tmp"
    tmp.write_text(json.dumps({"format": "lime_jax.seal.v1", "files": files}, indent=0, sort_keys=True))
    tmp.replace(step_dir / SEAL_NAME)


def check_step_dir(step_dir: epath.PathLike, required_items: tuple[str, ...] = REQUIRED_ITEMS) -> str | None:
    """What is wrong with a committed step directory, or None when every sealed file matches."""
    step_dir = epath.Path(step_dir)
    seal_path = step_dir / SEAL_NAME
    if not seal_path.is_file():
        return (f"no {SEAL_NAME} (the run stopped before sealing this committed step, or the "
                "directory was not written by lime_jax)")
    try:
        files = json.loads(seal_path.read_text())["files"]
        if not isinstance(files, dict) or not all(
                isinstance(want, dict) and {"bytes", "sha256"} <= want.keys() for want in files.values()):
            raise TypeError("'files' is not an object of {bytes, sha256} entries")
    except (ValueError, KeyError, TypeError) as e:
        return f"{SEAL_NAME} is unreadable ({e})"
    for item in required_items:
        if not any(rel.split("/")[0] == item for rel in files):
            return f"item {item!r} was not saved in this checkpoint"
        if not (step_dir / item).is_dir():
            return f"item {item!r} is missing"
    for rel, want in sorted(files.items()):
        path = step_dir / rel
        if not path.is_file():
            return f"file {rel} is missing"
        size = path.stat().length
        if size != want["bytes"]:
            return f"file {rel} has {size} bytes, sealed with {want['bytes']} (truncated or rewritten)"
        if sha256_file(path) != want["sha256"]:
            return f"file {rel} does not match its sha256 in {SEAL_NAME} (corrupt or edited)"
    extra = sorted(set(_sealed_files(step_dir)) - set(files))
    if extra:  # Orbax reads some files by name (e.g. an item's `checkpoint`): refuse additions
        return f"file {extra[0]} was added after the checkpoint was sealed"
    return None


def _from_process_0(value: int) -> int:
    """Process 0's `value`, on every process: one process checks, all act alike."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _agree_on_newest_intact(directory: epath.Path, steps: list[int], required: tuple[str, ...],
                            damaged: Callable[[int, str], None]) -> int:
    """The first of `steps` whose files match their seal, or `_NONE_INTACT`, on every process:
    process 0 checks them in order, calling `damaged(step, problem)` for each that fails, and
    shares the verdict. Raises CheckpointError on every process when process 0 cannot check."""
    found, failure = _NONE_INTACT, None
    if jax.process_index() == 0:
        try:
            for step in steps:
                problem = check_step_dir(directory / str(step), required)
                if problem is None:
                    found = step
                    break
                damaged(step, problem)
        except Exception as e:  # e.g. an I/O error: share it, the others wait for a verdict
            found, failure = _CHIEF_FAILED, e
    found = _from_process_0(found)
    _raise_if_chief_failed(found, f"checking the checkpoint seals in {directory}", failure)
    return found


def _raise_if_chief_failed(verdict: int, what: str, error: Exception | None) -> None:
    """Raises CheckpointError on every process when process 0 shared `_CHIEF_FAILED`; process 0
    passes its own `error`, the others have only the verdict."""
    if verdict != _CHIEF_FAILED:
        return
    if error is None:
        raise CheckpointError(f"{what} failed on process 0 (its log names the error)")
    raise CheckpointError(f"{what} failed on process 0: {type(error).__name__}: {error}") from error


def _items(arg_cls, state: TrainState, data_iter: Any | None, *, restoring: bool) -> dict:
    """A checkpoint's items, for saving or restoring alike: params, optimizer state, step + RNG,
    and the data iterator's position (when there is one)."""
    items = {"params": arg_cls(state.params), "opt_state": arg_cls(state.opt_state),
             "train": arg_cls({"step": state.step, "rng": state.rng})}
    if data_iter is not None:
        sharded = data_state.as_sharded(data_iter, jax.process_index(), jax.process_count())
        items["data"] = (data_state.ShardStateRestore if restoring else data_state.ShardStateSave)(sharded)
    return items


class Checkpointer:
    """Saves and restores train state + data iterator in one Orbax CheckpointManager.

    Keeps the newest `keep` >= 2 steps: the newest is unsealed until its seal is written.
    """

    def __init__(self, model_dir: epath.PathLike, keep: int = 3, keep_best: bool = False,
                 async_save: bool = True, read_only: bool = False):
        if keep < 2:
            raise ValueError(f"Checkpointer keep={keep} must be at least 2: the newest step is unsealed "
                             "until its seal is written (see CheckpointConfig.keep)")
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
        self.model_dir = absolute(model_dir)
        self.directory = checkpoint_dir(model_dir)
        self._saving_step: int | None = None
        self._save_error: Exception | None = None
        self._seal_thread: threading.Thread | None = None
        self._seal_error: Exception | None = None
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest committed step (not yet checked against its seal)."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _seal_after_commit(self, step: int) -> None:
        """Process 0's seal thread: waits for Orbax to commit `step`, then seals it."""
        try:
            self._mngr.wait_until_finished()
        except BaseException:  # the save failed; Orbax raises it again in the main thread
            return
        try:
            if self.step_dir(step).exists():  # a retention policy may have removed it at once
                write_seal(self.step_dir(step))
        except Exception as e:
            self._seal_error = e

    def _check_previous_save(self) -> None:
        if self._save_error is not None:
            return  # reported once already; Orbax would raise it on every later call
        if self._seal_thread is not None:
            self._seal_thread.join()
            self._seal_thread = None
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            self._save_error = e
            if jax.process_index() == 0:  # free the space of the failed save (a full disk)
                for tmp in self.directory.glob(f"{self._saving_step}.orbax-checkpoint-tmp*"):
                    tmp.rmtree(missing_ok=True)
            raise CheckpointError(
                f"saving checkpoint step {self._saving_step} to {self.directory} failed: "
                f"{type(e).__name__}: {e}; the checkpoints already committed are untouched "
                f"(steps {self.all_steps()})") from e
        if self._seal_error is not None:
            self._save_error = e = self._seal_error
            raise CheckpointError(
                f"sealing checkpoint step {self._saving_step} in {self.directory} failed: "
                f"{type(e).__name__}: {e}; the step is committed but unsealed, so a resume takes "
                "the one before") from e

    def save(self, step: int, state: TrainState, data_iter: Any | None,
             metrics: dict[str, float] | None = None) -> None:
        """Starts an async save of `step`; returns once the arrays are off the device.

        Raises CheckpointError when this or the previous (background) save or seal failed.
        """
        self._check_previous_save()
        items = _items(ocp.args.StandardSave, state, data_iter, restoring=False)
        self._saving_step = step
        try:
            self._mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        except Exception as e:
            raise CheckpointError(f"saving checkpoint step {step} to {self.directory} failed: "
                                  f"{type(e).__name__}: {e}") from e
        if jax.process_index() == 0:
            self._seal_thread = threading.Thread(target=self._seal_after_commit, args=(step,),
                                                 name=f"lime_jax_seal_{step}")
            self._seal_thread.start()

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

        Process 0 checks the seals and shares which step to restore; each damaged newer step is
        reported in a warning and moved to `checkpoints.damaged/` (so the run can save that step
        again). Raises CheckpointError, on every process, if none is intact or process 0 cannot
        check or move the steps.
        """
        required = REQUIRED_ITEMS + (("data",) if data_iter is not None else ())
        chief = jax.process_index() == 0
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise NoIntactCheckpointError(f"no checkpoint in {self.directory}")
        problems: list[tuple[int, str]] = []  # process 0's findings

        def damaged(step: int, problem: str) -> None:
            log.warning("checkpoint %s is damaged: %s; falling back to an older checkpoint",
                        self.step_dir(step), problem)
            problems.append((step, problem))

        below = steps[0] + 1
        while True:
            step = _agree_on_newest_intact(self.directory, [s for s in steps if s < below], required, damaged)
            if step == _NONE_INTACT:
                break
            try:
                state = self.restore(step, abstract, data_iter)
            except Exception as e:  # sealed but unreadable here (e.g. another model config)
                raise CheckpointError(f"checkpoint {self.step_dir(step)} is intact but cannot be "
                                      f"restored into this run: {type(e).__name__}: {e}") from e
            saved_step = int(state.step)  # replicated: the same on every process
            if saved_step == step:
                self._quarantine([s for s, _ in problems])
                return step, state
            if chief:
                damaged(step, f"it holds step {saved_step}")
            below = step
        if not chief:
            raise NoIntactCheckpointError(f"no intact checkpoint in {self.directory} (process 0 "
                                          "checked the seals; its log names the damage)")
        raise NoIntactCheckpointError(f"no intact checkpoint in {self.directory}: " + "; ".join(
            f"step {s}: {p}" for s, p in problems) + ". Move the directory away to start afresh.")

    def _quarantine(self, steps: list[int]) -> None:
        """Process 0 moves `steps` (its list; the others pass none) aside; every process then
        reloads the same step list, or raises CheckpointError if process 0 could not move them."""
        dest_root, failure = self.model_dir / DAMAGED_SUBDIR, None
        if steps and jax.process_index() == 0:
            try:
                dest_root.mkdir(parents=True, exist_ok=True)
                for step in steps:
                    dest = dest_root / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
                    self.step_dir(step).rename(dest)
                    log.warning("moved damaged checkpoint %s to %s", self.step_dir(step), dest)
            except Exception as e:  # the others wait in the broadcast below: give them the verdict
                failure = e
        # The broadcast is also the barrier: no process reloads before process 0 has moved them.
        _raise_if_chief_failed(_from_process_0(_CHIEF_FAILED if failure else 0),
                               f"moving damaged checkpoints to {dest_root}", failure)
        self._mngr.reload()

    def wait(self) -> None:
        """Waits for the last save's commit and seal; raises CheckpointError if either failed."""
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


def restore_params(model_dir: epath.PathLike, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """Restores only the parameters (for evaluation or generation): `(params, step)`.

    `abstract_params` is an abstract NNX state (e.g. from `nnx.eval_shape`); its leaves may be
    `jax.ShapeDtypeStruct`s with shardings (see `state.with_shardings`), otherwise arrays land on the
    default device. `step=None` takes the newest intact checkpoint (warning about damaged newer
    ones); a given step must be intact. Raises CheckpointError otherwise. Every process calls it:
    process 0 checks the seals and shares which step all of them restore (or that it failed).
    """
    directory = checkpoint_dir(model_dir)
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        steps = sorted(mngr.all_steps(), reverse=True)
        if step is not None and step not in steps:
            raise NoIntactCheckpointError(f"no checkpoint for step {step} in {directory}; have {sorted(steps)}")
        problems = []

        def damaged(s: int, problem: str) -> None:
            log.warning("checkpoint %s is damaged: %s", directory / str(s), problem)
            problems.append(f"step {s}: {problem}")

        found = _agree_on_newest_intact(directory, [step] if step is not None else steps, ("params",), damaged)
        if found == _NONE_INTACT:
            detail = ("; ".join(problems) if jax.process_index() == 0
                      else "process 0 checked the seals; its log names the damage")
            raise NoIntactCheckpointError(f"no intact checkpoint in {directory}" + (f": {detail}" if steps else ""))
        out = mngr.restore(found, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return out["params"], found
    finally:
        mngr.close()
