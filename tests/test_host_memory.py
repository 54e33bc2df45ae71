"""The host allocator policy (`lime_jax/host_memory.py`): XLA:CPU temporaries stop being faulted
in again at every execution. Each case runs in a fresh process, since the policy must come
before JAX starts its CPU threads."""
import os
import platform
import subprocess
import sys

import pytest

# A jitted function whose temporaries (two [2048, 8192] f32 products, 128 MiB: above the 32 MiB up
# to which glibc's own heuristics stop unmapping) are one block: the median of its executions'
# minor page faults, with the policy set (or not) before JAX starts.
_FAULTS_PER_RUN = """
import resource, statistics
from lime_jax import host_memory
applied = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x, y: jnp.sum((x @ y) * ((2 * x) @ y)))
x, y = jnp.ones((2048, 128)), jnp.full((128, 8192), 1e-3)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, y).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, statistics.median(faults[2:]))  # after compiling and the heap's first growth
"""


def _faults_per_run(policy: str) -> tuple[bool, float]:
    env = {**os.environ, "LIME_JAX_HOST_MALLOC": policy, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _FAULTS_PER_RUN], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    return out[-2] == "True", float(out[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="a glibc policy")
def test_temporaries_are_not_faulted_in_again():
    applied, faults = _faults_per_run("")
    unset, faults_without = _faults_per_run("system")
    assert applied and not unset
    if faults_without < 10_000:
        pytest.skip(f"this allocator does not fault temporaries in again ({faults_without} faults a run)")
    assert faults < 1000, (faults, faults_without)


@pytest.mark.parametrize("platforms, on_cpu", [("cpu", True), ("cpu,cuda", True), ("cuda", False),
                                               ("tpu,cpu", False)])
def test_policy_only_where_jax_computes_on_cpu(monkeypatch, platforms, on_cpu):
    from lime_jax import host_memory

    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory.jax_computes_on_cpu() is on_cpu


def test_cli_sets_it_for_jax_subcommands_only():
    from lime_jax import cli

    assert cli.JAX_COMMANDS < set(cli.COMMANDS)
    assert {"train", "eval", "generate", "quickstart"} <= cli.JAX_COMMANDS
    assert not {"spm-train", "annotate", "show", "verify-cache"} & cli.JAX_COMMANDS


def test_a_misspelt_opt_out_is_named(monkeypatch, caplog):
    from lime_jax import host_memory

    monkeypatch.setattr(host_memory, "_applied", False)  # whatever earlier tests in this process did
    monkeypatch.setenv("LIME_JAX_HOST_MALLOC", "sytem")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")  # stops before mallopt: this process keeps its allocator
    assert host_memory.keep_freed_memory() is False
    assert "LIME_JAX_HOST_MALLOC='sytem': the only setting is 'system'" in caplog.text
