"""`lime-jax aot`: lower and compile the train step of a config for a mesh of the intended size,
on a machine that has none of those devices, and print its memory per device.

    lime-jax aot --gin_file runs/gpu.gin --gin_file models/1b.gin --mesh 1,16,1
    lime-jax aot --gin_file runs/tpu_pod.gin --gin_file models/2b.gin --mesh 1,32,1 --gin.BATCH_SIZE=256

The step is the trainer's own (`train.make_train_step` with the trainer's in/out shardings and
donation), fed abstract `ShapeDtypeStruct`s: nothing is allocated. When this process has
fewer devices than the mesh, the command re-runs itself in a subprocess with that many fake CPU
devices (`--xla_force_host_platform_device_count`), so XLA's SPMD partitioner really splits the
program over the mesh. The memory figures come from `compiled.memory_analysis()` (per device;
CPU buffer assignment, so a guide to what a GPU/TPU will need, not a guarantee) next to an
analytic estimate: parameters + gradients + optimizer state per device, plus activations.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

GiB = 1 << 30
_RESULT_PREFIX = "AOT_RESULT "


def _gin_value(name: str):
    import gin

    value = gin.query_parameter(name)
    if isinstance(value, gin.config.ConfigurableReference):  # a %MACRO
        value = value.scoped_configurable_fn()
    return value


def _abstract_batch(cfg, batch_size: int, seq_len: int, sharding) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    names = ["decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
             "decoder_positions", "decoder_loss_weights"] + [f"decoder_input_{n}" for n in cfg.metadata_names]
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sharding) for k in names}


def _per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
    import jax

    leaves = jax.tree.leaves(abstract_tree)
    shs = jax.tree.leaves(shardings)
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(leaves, shs))


def activation_estimate(cfg, local_batch: int, seq_len: int) -> int:
    """Rough bytes of activations kept for the backward pass on one device (no remat).

    Per layer and token: about 10 d_model-wide and 3 d_ff-wide tensors in the compute dtype,
    plus the f32 attention probabilities (heads x seq_len per token); then the f32 logits and
    their gradient.
    """
    import jax.numpy as jnp

    act = jnp.dtype(cfg.dtype).itemsize
    tokens = local_batch * seq_len
    per_layer = tokens * (10 * cfg.d_model + 3 * cfg.d_ff) * act + tokens * cfg.n_heads * seq_len * 4
    return cfg.n_layers * per_layer + 2 * tokens * cfg.vocab_size * 4


def compile_train_step(mesh_shape: Sequence[int], compile_: bool = True,
                       platform: str = "cpu") -> dict[str, Any]:
    """Lowers (and compiles) the gin-configured train step for a (data, fsdp, tensor) mesh.

    Gin must already be parsed. With fewer devices than the mesh, or `compile_=False`, the
    step is lowered against an `AbstractMesh` only, for `platform` ("cpu", "cuda", "tpu"):
    no compile, no memory analysis.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

    from lime_jax.trainer import optim
    from lime_jax.trainer import train as train_lib
    from lime_jax.model import ModelConfig, abstract_model, sharding

    cfg = ModelConfig()
    opt_cfg = optim.OptimizerConfig()
    rules = sharding.sharding_rules()
    batch_size, seq_len = int(_gin_value("run.batch_size")), int(_gin_value("run.seq_len"))
    train_steps = int(_gin_value("run.train_steps"))
    shape = tuple(int(s) for s in mesh_shape)
    if -1 in shape:
        raise ValueError(f"--mesh {shape}: give every axis size (no -1); AOT has no devices to infer it from")
    n = math.prod(shape)
    data_shards = shape[0] * shape[1]  # the batch is split over (data, fsdp)
    accum = opt_cfg.grad_accum_steps
    if batch_size % (data_shards * accum):
        raise ValueError(f"run.batch_size={batch_size} does not split into {accum} micro-batches "
                         f"over the {data_shards} batch shards of mesh {shape}")
    concrete = compile_ and jax.device_count() >= n
    if concrete:
        mesh = sharding.make_mesh(shape)
    else:
        mesh = AbstractMesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)

    graphdef, abstract_params = abstract_model(cfg, rules)
    tx, schedule = optim.make_optimizer(opt_cfg, train_steps)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    param_sh = sharding.state_shardings(abstract_params, mesh, rules)
    opt_sh = sharding.state_shardings(abstract_opt, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    train_sh = {"step": replicated, "rng": replicated}
    data_sh = sharding.batch_sharding(mesh, rules)

    def with_sh(tree, shs):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shs)

    abstract_train = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                      "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)}
    step_fn = jax.jit(
        train_lib.make_train_step(graphdef, tx, schedule, opt_cfg.grad_accum_steps),
        in_shardings=(param_sh, opt_sh, train_sh, data_sh),
        out_shardings=(param_sh, opt_sh, train_sh, replicated),
        donate_argnums=(0, 1, 2))
    args = (with_sh(abstract_params, param_sh), with_sh(abstract_opt, opt_sh), abstract_train,
            _abstract_batch(cfg, batch_size, seq_len, data_sh))
    if concrete:
        lowered = step_fn.lower(*args)
    else:  # no devices to infer the platform from
        with jax.sharding.use_abstract_mesh(mesh):
            lowered = step_fn.trace(*args).lower(lowering_platforms=(platform,))

    n_params = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(abstract_params))
    params_b = _per_device_bytes(abstract_params, param_sh)
    opt_b = _per_device_bytes(abstract_opt, opt_sh)
    local_batch = batch_size // (data_shards * accum)  # rows per device per micro-batch
    act_b = activation_estimate(cfg, local_batch, seq_len)
    out: dict[str, Any] = {
        "mesh": dict(zip(sharding.MESH_AXES, shape)), "devices": n, "params": n_params,
        "batch_size": batch_size, "grad_accum_steps": accum, "seq_len": seq_len, "dtype": cfg.dtype,
        "compiled": False, "lowered_for": platform if not concrete else jax.default_backend(),
        "stablehlo_bytes": len(lowered.as_text()),
        "estimate_per_device": {"params_gib": params_b / GiB, "grads_gib": params_b / GiB,
                                "opt_state_gib": opt_b / GiB, "activations_gib": act_b / GiB,
                                "total_gib": (2 * params_b + opt_b + act_b) / GiB},
    }
    if concrete:
        compiled = lowered.compile()
        out["compiled"] = True
        mem = compiled.memory_analysis()
        if mem is not None:
            fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                      "temp_size_in_bytes", "generated_code_size_in_bytes")
            m = {f.replace("_size_in_bytes", "_gib"): getattr(mem, f) / GiB for f in fields}
            # Donated outputs alias their inputs: count those bytes once.
            m["peak_gib"] = m["argument_gib"] + m["output_gib"] - m["alias_gib"] + m["temp_gib"]
            out["memory_analysis_per_device"] = m
        cost = compiled.cost_analysis()
        if isinstance(cost, list):  # older jax returned one dict per program
            cost = cost[0] if cost else None
        if cost and "flops" in cost:
            out["flops_per_device_step"] = float(cost["flops"])
    return out


def format_report(name: str, r: dict[str, Any]) -> str:
    e = r["estimate_per_device"]
    lines = [f"{name}: {r['params'] / 1e9:.3f}B params, mesh {r['mesh']} ({r['devices']} devices), "
             f"batch {r['batch_size']} x {r['seq_len']} in {r['grad_accum_steps']} micro-batches, "
             f"{r['dtype']} compute, "
             f"{'compiled' if r['compiled'] else 'lowered only'} for {r['lowered_for']}",
             f"  estimate per device: params {e['params_gib']:.2f} GiB + grads {e['grads_gib']:.2f} + "
             f"optimizer {e['opt_state_gib']:.2f} + activations {e['activations_gib']:.2f} = "
             f"{e['total_gib']:.2f} GiB"]
    m = r.get("memory_analysis_per_device")
    if m:
        lines.append(f"  XLA memory_analysis per device: arguments {m['argument_gib']:.2f} GiB, outputs "
                     f"{m['output_gib']:.2f} (aliased {m['alias_gib']:.2f}), temp {m['temp_gib']:.2f}, "
                     f"peak ~{m['peak_gib']:.2f} GiB")
    return "\n".join(lines)


def _parse_mesh(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected DATA,FSDP,TENSOR positive ints, e.g. 1,16,1")
    return shape  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lime-jax aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--gin_file", action="append", default=[], required=True,
                   help="gin config file (repeatable), e.g. runs/gpu.gin then models/1b.gin")
    p.add_argument("--gin_bindings", action="append", default=[], help="a gin binding line (repeatable)")
    p.add_argument("--mesh", type=_parse_mesh, required=True, help="DATA,FSDP,TENSOR mesh, e.g. 1,16,1")
    p.add_argument("--lower_only", action="store_true", help="lower against an AbstractMesh; skip compile")
    p.add_argument("--platform", choices=["cpu", "cuda", "tpu"], default="cpu",
                   help="target of --lower_only lowering")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return p


def run_in_subprocess(argv: Sequence[str], devices: int, timeout_s: float | None = None) -> dict[str, Any]:
    """Runs `lime-jax aot argv` in a fresh process with `devices` fake CPU devices."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]))
    proc = subprocess.run([sys.executable, "-m", "lime_jax.trainer.aot", *argv, "--json"], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    raise RuntimeError(f"lime-jax aot {' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    from lime_jax.trainer import train as train_lib

    try:
        _, flag_bindings = train_lib.parse_flags(["--gin_file", "unused", *rest])
    except SystemExit:
        return 2
    # The trainer's required paths do not matter for compiling; the user's bindings win.
    bindings = ["MODEL_DIR = 'unused'", "CACHE_DIR = 'unused'", "TRAIN_STEPS = 100000",
                *args.gin_bindings, *flag_bindings]
    n = math.prod(args.mesh)
    import jax

    if not args.lower_only and jax.device_count() < n:
        if jax.default_backend() != "cpu" or os.environ.get("LIME_JAX_AOT_CHILD"):
            print(f"lime-jax aot: mesh {args.mesh} needs {n} devices, this process has "
                  f"{jax.device_count()} {jax.default_backend()} devices", file=sys.stderr)
            return 1
        os.environ["LIME_JAX_AOT_CHILD"] = "1"
        try:
            result = run_in_subprocess(argv, n)
        except RuntimeError as e:
            print(f"lime-jax aot: {e}", file=sys.stderr)
            return 1
    else:
        try:
            train_lib.parse_gin(args.gin_file, bindings)
            result = compile_train_step(args.mesh, compile_=not args.lower_only, platform=args.platform)
        except (ValueError, FileNotFoundError) as e:
            print(f"lime-jax aot: {e}", file=sys.stderr)
            return 1
    name = " + ".join(os.path.basename(f) for f in args.gin_file)
    if args.json:
        print(_RESULT_PREFIX + json.dumps(result))
    else:
        print(format_report(name, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
