"""Multi-process set-up: when to call `jax.distributed.initialize`, and each process's data.

A run is multi-process when any of these says so (first match wins per field):
- flags: `lime-jax train --coordinator_address HOST:PORT --num_processes N --process_id I`
  (they become gin bindings of `distributed_setup`, so a gin file can set them too);
- environment: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
- a cluster JAX detects by itself: SLURM (`srun`, SLURM_NTASKS > 1), Open MPI (`mpirun`), a
  multi-host Cloud TPU slice (`TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES` list > 1 host).
Otherwise the run is one process and nothing is initialised. `mode="on"` always initialises
(letting JAX auto-detect whatever is unset, e.g. from the TPU metadata server); `"off"` never.

On CPU, cross-process collectives need an implementation: `gloo` is set unless the user chose
one (`JAX_CPU_COLLECTIVES_IMPLEMENTATION`). It only affects the CPU backend, so it is harmless on
GPU/TPU hosts.

Data: `process_dataset` gives each process its share of the records. By default the records
are split into one shard per process (the loader's `record i -> process i % n`). With
`process_dataset.data_shards = S` (a multiple of the process count) every process reads S/n
shards and concatenates their batches row-wise, so the *global* batch sequence depends only on
S, not on how many processes run: 1 process with S = 2 trains on exactly the batches that
2 processes produce (same losses), which is how the multi-host tests and bench compare. The
iterator's checkpoint state is per shard (`data_state`), so a run resumes on any process count
that divides S.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import gin

log = logging.getLogger("lime_jax.trainer.distributed")

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
MODES = ("auto", "on", "off")


class DistributedError(ValueError):
    """The multi-process settings are incomplete or contradict each other."""


def _env_int(name: str, env: Mapping[str, str]) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def _cluster_processes(env: Mapping[str, str]) -> int:
    """Process count a JAX-detectable cluster launcher announces (1 when none does)."""
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")):
        return int(env["SLURM_NTASKS"])
    if "OMPI_MCA_orte_hnp_uri" in env:
        return int(env.get("OMPI_COMM_WORLD_SIZE", "1"))  # mpirun sets both
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        return len([h for h in hosts.split(",") if h.strip()])
    return 1


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, mode: str = "auto",
            env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single process.

    Explicit values win over environment variables; fields left None are auto-detected by JAX
    (SLURM, Open MPI, Cloud TPU). Raises DistributedError for contradictory settings.
    """
    if mode not in MODES:
        raise DistributedError(f"distributed_setup.mode must be one of {MODES}, got {mode!r}")
    env = os.environ if env is None else env
    if mode == "off":
        return None
    address = coordinator_address or env.get(ENV_COORDINATOR) or None
    count = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES, env)
    index = process_id if process_id is not None else _env_int(ENV_PROCESS_ID, env)
    if count is not None and count < 1:
        raise DistributedError(f"num_processes must be >= 1, got {count}")
    if index is not None and count is not None and not 0 <= index < count:
        raise DistributedError(f"process_id {index} is not in [0, {count}) (num_processes={count})")
    if address is not None and ":" not in address:
        raise DistributedError(f"coordinator address {address!r} must be HOST:PORT")
    explicit = {"coordinator_address": address, "num_processes": count, "process_id": index}
    given = {k: v for k, v in explicit.items() if v is not None}
    if mode == "on":
        return given
    if count == 1:
        return None
    if given:
        # A partial explicit set-up is only valid where JAX can fill the rest from a cluster.
        missing = [k for k, v in explicit.items() if v is None]
        if missing and _cluster_processes(env) <= 1:
            raise DistributedError(
                f"multi-process settings given ({', '.join(f'{k}={v}' for k, v in given.items())}) "
                f"but {', '.join(missing)} missing and no cluster launcher (SLURM, Open MPI, TPU) "
                f"to detect them: set --{missing[0]} or {_ENV_NAMES[missing[0]]}")
        return given
    return {} if _cluster_processes(env) > 1 else None


_ENV_NAMES = {"coordinator_address": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES,
              "process_id": ENV_PROCESS_ID}


@gin.configurable(denylist=["force"])
def distributed_setup(coordinator_address: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None, mode: str = "auto",
                      cpu_collectives: str = "gloo", initialization_timeout_s: int = 300,
                      force: bool = False) -> bool:
    """Initialises JAX's distributed runtime when this is one of several processes.

    Must run before anything touches a JAX backend (devices, arrays). Returns True when this
    call (or an earlier one) set up several processes. `force=True` is `mode="on"`.
    """
    import jax
    from jax._src import distributed as jax_distributed  # the one place that knows

    if jax_distributed.global_state.client is not None:
        return True
    kwargs = resolve(coordinator_address, num_processes, process_id, "on" if force else mode)
    if kwargs is None:
        return False
    if cpu_collectives and jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    log.info("jax.distributed.initialize(%s)", ", ".join(f"{k}={v}" for k, v in kwargs.items()) or
             "auto-detected cluster")
    jax.distributed.initialize(initialization_timeout=initialization_timeout_s, **kwargs)
    return True


def preemption_sync_active() -> bool:
    """Whether JAX's distributed runtime catches SIGTERM (its preemption notifier, installed by
    `jax.distributed.initialize` unless `jax_enable_preemption_service` is off) and lets the
    processes agree on a step to stop at (`multihost_utils.reached_preemption_sync_point`)."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.preemption_sync_manager is not None


def add_flags(parser) -> None:
    """The multi-process flags of `lime-jax train` (each overrides its environment variable)."""
    g = parser.add_argument_group("multi-process (else $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, "
                                  "$JAX_PROCESS_ID, or SLURM / Open MPI / TPU-pod auto-detection)")
    g.add_argument("--coordinator_address", help="HOST:PORT of process 0's coordinator service")
    g.add_argument("--num_processes", type=int, help="number of processes in the job")
    g.add_argument("--process_id", type=int, help="this process's index in [0, num_processes)")


def flag_bindings(args) -> list[str]:
    """Gin bindings for the multi-process flags that were given."""
    out = []
    for name in ("coordinator_address", "num_processes", "process_id"):
        value = getattr(args, name, None)
        if value is not None:
            out.append(f"distributed_setup.{name} = {value!r}")
    return out


# ----------------------------------------------------------------------------- data


@gin.configurable(denylist=["cache_dir", "batch_size"])
def process_dataset(cache_dir: str, batch_size: int, *, data_shards: int | None = None,
                    process_index: int | None = None, process_count: int | None = None,
                    **loader_kwargs):
    """This process's batches of `batch_size` rows (the global batch / process count), as a
    `data_state.ShardedIterator` (its checkpoint state is per data shard).

    `data_shards=None` is one shard per process (the loader's own split). Otherwise it must be
    a multiple of the process count; process p reads shards p*k .. p*k+k-1 (k = S/n) with
    `batch_size/k` rows each and concatenates them in shard order, which reproduces the rows
    process p holds of the global batch that S processes would build.
    """
    from lime_jax.data import loader
    from lime_jax.trainer import data_state

    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if data_shards is None:
        data_shards = process_count
    elif data_shards < 1 or data_shards % process_count:
        raise DistributedError(f"process_dataset.data_shards={data_shards} must be a positive "
                               f"multiple of the process count ({process_count})")
    per_process = data_shards // process_count
    if batch_size % per_process:
        raise DistributedError(f"per-process batch size {batch_size} is not divisible by the "
                               f"{per_process} data shards each process reads "
                               f"(process_dataset.data_shards={data_shards})")
    shards = range(process_index * per_process, (process_index + 1) * per_process)
    return data_state.ShardedIterator(
        {j: iter(loader.build_dataset(cache_dir, batch_size=batch_size // per_process, shard_index=j,
                                      shard_count=data_shards, **loader_kwargs)) for j in shards},
        data_shards)


def quiet_non_chief_logs(logger_name: str = "lime_jax") -> None:
    """Only process 0 logs INFO: the others keep warnings and errors (set after initialise)."""
    import jax

    if jax.process_index() != 0:
        logging.getLogger(logger_name).setLevel(logging.WARNING)


# ----------------------------------------------------------------------------- local launch


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(argv: Sequence[str], num_processes: int, devices_per_process: int,
                port: int | None = None, env: Mapping[str, str] | None = None,
                log_dir: str | None = None) -> list:
    """Starts `argv` as `num_processes` CPU processes of one job on this machine (loopback).

    Each process sees `devices_per_process` forced CPU devices and gets the `JAX_*` variables
    that `distributed_setup` reads. stdout/stderr go to `log_dir/process_<i>.log` when given.
    Returns the `subprocess.Popen` objects (the caller waits on them).
    """
    import subprocess

    port = free_port() if port is None else port
    base = dict(os.environ if env is None else env)
    flags = [f for f in base.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    base.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
        flags + [f"--xla_force_host_platform_device_count={devices_per_process}"]))
    procs = []
    for i in range(num_processes):
        penv = dict(base, **{ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(num_processes),
                             ENV_PROCESS_ID: str(i)})
        out = None
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            out = open(os.path.join(log_dir, f"process_{i}.log"), "w")
        procs.append(subprocess.Popen(list(argv), env=penv, stdout=out, stderr=subprocess.STDOUT if out else None))
        if out is not None:
            out.close()  # the child holds its own descriptor
    return procs


def wait_all(procs: Sequence, timeout_s: float) -> list[int]:
    """Waits for every process; on a timeout or a failure kills the rest (one hung peer would
    otherwise block the others in a collective forever). Returns the exit codes."""
    import subprocess
    import time

    deadline = time.monotonic() + timeout_s
    codes: list[int | None] = [None] * len(procs)
    while any(c is None for c in codes):
        for i, p in enumerate(procs):
            if codes[i] is None:
                codes[i] = p.poll()
        if any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
            for i, p in enumerate(procs):
                if codes[i] is None:
                    p.kill()
                    try:
                        codes[i] = p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        codes[i] = -9
            break
        time.sleep(0.2)
    return [int(c) for c in codes]
