"""Host allocator policy: freed memory stays in the process for the next step (glibc only).

XLA:CPU allocates all of an execution's temporaries as one block (224 MB for the quickstart
train step) with `posix_memalign`, from a worker thread. glibc serves a block that large from a
fresh `mmap` in the thread's arena and unmaps it on `free`, so every step faults the whole block
in again, page by page: 55,000 minor faults a step, a third of a 2-core machine's time spent in
the kernel (`bench/train_throughput.py`). With a single arena (which grows by `brk` without a
size cap), no `mmap` for large blocks and no trimming, a freed block is reused by the next step.
The price: the process keeps its peak heap until it exits, as a caching allocator would, which
is why the policy is only set where JAX will compute on the CPU (`JAX_PLATFORMS` starting with
`cpu`, or no GPU or TPU plugin installed): an accelerator host's large host buffers (a restored
checkpoint on its way to the devices) go back to the system.

Threads choose their arena at their first allocation, so the policy only reaches XLA's CPU
threads if it is set before JAX creates its CPU client: `lime-jax` sets it first thing for its
JAX subcommands; a Python script calls `keep_freed_memory()` before its first JAX computation
(as `bench/train_throughput.py` does). `LIME_JAX_HOST_MALLOC=system` leaves glibc's defaults alone.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

OPT_OUT_ENV = "LIME_JAX_HOST_MALLOC"
# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = -1  # mallopt(3): a trim threshold of -1 disables trimming

_applied = False


def keep_freed_memory() -> bool:
    """Sets the policy (once per process); True when it is in force."""
    global _applied
    if _applied:
        return True
    choice = os.environ.get(OPT_OUT_ENV, "").strip().lower()
    if choice == "system":
        return False
    if choice:
        log.warning("%s=%r: the only setting is 'system' (glibc's defaults); setting the host allocator "
                    "policy", OPT_OUT_ENV, os.environ[OPT_OUT_ENV])
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False  # other allocators (musl, macOS) have neither the problem's cause nor mallopt
    if not jax_computes_on_cpu():
        return False
    libc = ctypes.CDLL("libc.so.6")
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
    if not ok:
        log.warning("mallopt refused the host allocator policy; XLA:CPU steps will page-fault their "
                    "temporaries in again every step")
    _applied = ok
    return ok


def jax_computes_on_cpu() -> bool:
    """Whether JAX's default backend will be its CPU client, judged without starting JAX:
    `JAX_PLATFORMS` names cpu first, or it is unset and no accelerator plugin (`jax_plugins`,
    as jax[cuda] installs, or libtpu) is installed for JAX to prefer."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    from importlib import metadata

    return (importlib.util.find_spec("libtpu") is None and importlib.util.find_spec("jax_plugins") is None
            and not list(metadata.entry_points(group="jax_plugins")))
