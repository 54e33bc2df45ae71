"""Training from gin configs, in-process: `train(config_files, bindings) -> summary dict`.

    from lime_jax.trainer import train
    summary = train.train(["runs/lime.gin"], ["MODEL_DIR = '/tmp/run'", "CACHE_DIR = '...'"])

The command line (`lime-jax train`, `python -m lime_jax.cli.train`) is `lime_jax.cli.train`.
The pieces: `config` (the run's dataclasses), `gin_config` (parsing, unused-binding checks),
`state` (the `TrainState`), `step` (the jitted steps), `loop` (set-up, loop, hooks),
`checkpoint`, `metrics`, `optim`, `distributed`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lime_jax.trainer import loop
from lime_jax.trainer.config import CheckpointConfig, DataConfig, EvalConfig, TrainConfig
from lime_jax.trainer.gin_config import parse_gin


def run_from_gin(bindings: Sequence[str] = (), *, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Trains with the already parsed gin config; `bindings` are the caller's, checked for use."""
    return loop.run(TrainConfig(), DataConfig(), EvalConfig(), CheckpointConfig(), bindings=bindings,
                    stop_after_steps=stop_after_steps)


def train(config_files: Sequence[str], bindings: Sequence[str] = (), *,
          stop_after_steps: int | None = None) -> dict[str, Any]:
    """Parses gin configs + bindings, then trains (or resumes). Returns the summary of `loop.run`.

    `stop_after_steps=N` stops after N steps with a checkpoint, as a preemption would.
    """
    parse_gin(config_files, bindings)
    return run_from_gin(bindings, stop_after_steps=stop_after_steps)
