"""Run-level performance hooks: a `jax.profiler` trace of chosen steps and JAX's persistent
compilation cache (`TrainConfig.profile_steps`, `TrainConfig.compilation_cache_dir`)."""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache

log = logging.getLogger(__name__)


def use_compilation_cache(cache_dir: str) -> None:
    """Caches every program this process compiles from now on in `cache_dir`, and reuses them.

    JAX's defaults skip programs that compile in under a second or are small; a restarted or
    preempted run recompiles all of them, so we cache everything. Process-wide, and it must
    run before the first compile that should be cached.
    """
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor
    if jax.config.jax_compilation_cache_dir != cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        # JAX decides once per process, at its first compile, whether a cache is in use.
        compilation_cache.reset_cache()


class StepProfiler:
    """A `jax.profiler` trace of updates `first..last` (1-based) into `<model_dir>/profile`.

    Only process 0 traces (every process of a host would write the same `<host>.xplane.pb`).
    A resumed run traces the part of the window it runs; leaving the loop early stops the trace.
    """

    def __init__(self, window: tuple[int, int] | None, model_dir: str, enabled: bool = True):
        self.window = window if enabled else None
        self.log_dir = os.path.join(model_dir, "profile")
        self.active = False

    def __enter__(self):
        return self

    def before(self, step: int, state: Any) -> None:
        """Call before dispatching update `step`."""
        if self.window and not self.active and self.window[0] <= step <= self.window[1]:
            jax.block_until_ready(state)  # start at a step boundary, not inside the previous step
            jax.profiler.start_trace(self.log_dir)
            self.active = True
            log.info("profiling steps %d-%d into %s", step, self.window[1], self.log_dir)

    def after(self, step: int, state: Any) -> None:
        """Call after dispatching update `step` (its result is `state`)."""
        if self.active and step >= self.window[1]:
            jax.block_until_ready(state)  # dispatch is async: the trace must hold the device work
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.active = False

    def __exit__(self, *exc):
        if self.active:
            self._stop()
