"""Lower and compile the train step of a config for a mesh of the intended size, on a machine
that has none of those devices, and report its memory per device (`lime-jax aot`).

The step is the trainer's own (`step.make_train_step` under `step.jit_train_step`: the
trainer's in/out shardings and donation), fed abstract `ShapeDtypeStruct`s: nothing is
allocated. When this process has fewer devices than the mesh, `compile_config` compiles in a
subprocess with that many fake CPU devices (`--xla_force_host_platform_device_count`), so XLA's
SPMD partitioner really splits the program over the mesh. The memory figures come from
`compiled.memory_analysis()` (per device; CPU buffer assignment, so a guide to what a GPU/TPU
will need, not a guarantee) next to an analytic estimate: parameters + gradients + optimizer
state per device, plus activations under the remat policy (`activation_estimate`). The GPU/TPU
attention kernels compile here as the XLA reference (see `compile_train_step`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

GiB = 1 << 30
_RESULT_PREFIX = "AOT_RESULT "
_CHILD_ENV = "LIME_JAX_AOT_CHILD"
# The trainer's required macros; compiling reads none of them.
_PLACEHOLDERS = ("MODEL_DIR = 'unused'", "CACHE_DIR = 'unused'", "TRAIN_STEPS = 100000")


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


def _itemsize(dtype: str) -> int:
    import jax.numpy as jnp

    return jnp.dtype(dtype).itemsize


def _kept_per_token(cfg) -> int:
    """Bytes per token and layer that the backward pass keeps under `cfg.remat_policy`.

    Remat recomputes a layer from its input x, keeping only the outputs the policy saves
    (decoder.REMAT_SAVED_NAMES): the q/k/v projections, the attention context, the output
    projection, the MLP's input (gate, up) and output projections; "minimal" saves every matmul
    without dot batch dimensions: all projections, not the attention scores or context.
    """
    act = _itemsize(cfg.dtype)
    D, F, H = cfg.d_model, cfg.d_ff, cfg.resolved_head_dim
    x, qkv, context, out = D, (cfg.n_heads + 2 * cfg.n_kv_heads) * H, cfg.n_heads * H, D
    mlpwi, mlpwo = 2 * F, D
    return act * {"full": x,
                  "minimal": x + qkv + out + mlpwi + mlpwo,
                  "save_qkv_proj": x + qkv,
                  "save_dot_except_mlp": x + qkv + out,
                  "save_dot_with_context_except_mlp": x + qkv + context + out,
                  "save_dot_except_mlpwi": x + qkv + out + mlpwo}[cfg.remat_policy]


def activation_estimate(cfg, local_batch: int, seq_len: int) -> int:
    """Rough bytes of activations alive at the start of the backward pass on one device.

    A layer without remat keeps about 10 d_model-wide and 3 d_ff-wide tensors per token in the
    compute dtype, plus, with attention="xla", the f32 attention probabilities (heads x seq_len
    per token; the flash kernels keep none). With a remat policy every layer keeps only what the
    policy saves (`_kept_per_token`), and one layer at a time is recomputed whole. Then the f32
    logits and their gradient: all positions, or one chunk of `loss_chunk_size` per row.
    """
    tokens = local_batch * seq_len
    scores = tokens * cfg.n_heads * seq_len * 4 if cfg.attention == "xla" else 0
    layer = tokens * (10 * cfg.d_model + 3 * cfg.d_ff) * _itemsize(cfg.dtype) + scores
    if cfg.remat_policy == "none":
        layers = cfg.n_layers * layer
    else:
        layers = cfg.n_layers * tokens * _kept_per_token(cfg) + layer
    logit_tokens = local_batch * min(seq_len, cfg.loss_chunk_size) if cfg.loss_chunk_size else tokens
    return layers + 2 * logit_tokens * cfg.vocab_size * 4


def compile_train_step(mesh_shape: Sequence[int], compile_: bool = True,
                       platform: str = "cpu") -> dict[str, Any]:
    """Lowers (and compiles) the gin-configured train step for a (data, fsdp, tensor) mesh.

    Gin must already be parsed. With fewer devices than the mesh, or `compile_=False`, the
    step is lowered against an `AbstractMesh` only, for `platform` ("cpu", "cuda", "tpu"):
    no compile, no memory analysis.
    """
    import jax
    from flax import nnx
    from jax.sharding import AbstractMesh, AxisType

    from lime_jax.model import ModelConfig, abstract_model, sharding
    from lime_jax.trainer import optim
    from lime_jax.trainer import state as state_lib
    from lime_jax.trainer import step as step_lib
    from lime_jax.trainer.config import DataConfig, TrainConfig, check_batch_split

    cfg = ModelConfig()
    opt_cfg = optim.OptimizerConfig()
    data = DataConfig()
    rules = sharding.sharding_rules()
    batch_size, seq_len = data.batch_size, data.seq_len
    shape = tuple(int(s) for s in mesh_shape)
    if -1 in shape:
        raise ValueError(f"--mesh {shape}: give every axis size (no -1); AOT has no devices to infer it from")
    n = math.prod(shape)
    abstract_mesh = AbstractMesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    data_shards = sharding.axis_size(abstract_mesh, rules, "batch")
    accum = opt_cfg.grad_accum_steps
    check_batch_split(batch_size, accum, data_shards, shape)
    concrete = compile_ and jax.device_count() >= n
    mesh = sharding.make_mesh(shape) if concrete else abstract_mesh
    attention = cfg.attention
    if jax.default_backend() == "cpu" and attention != "xla":
        # From a CPU host the GPU/TPU kernels would lower as their CPU emulation: compile the XLA
        # reference, whose f32 attention scores make the figure an upper bound.
        cfg = dataclasses.replace(cfg, attention="xla")

    graphdef, abstract_params = abstract_model(cfg, rules)
    tx, schedule = optim.make_optimizer(opt_cfg, TrainConfig().train_steps)
    abstract = state_lib.abstract_train_state(abstract_params, tx)
    state_sh = state_lib.train_state_shardings(abstract, mesh, rules)
    data_sh = sharding.batch_sharding(mesh, rules)
    step_fn = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, tx, schedule, accum, data.metadata_dropout), state_sh, data_sh)
    args = (state_lib.with_shardings(abstract, state_sh), _abstract_batch(cfg, batch_size, seq_len, data_sh))
    if concrete:
        with jax.set_mesh(mesh):  # as the trainer runs it: the model's activation constraints need the mesh
            lowered = step_fn.lower(*args)
    else:  # no devices to infer the platform from
        with jax.sharding.use_abstract_mesh(mesh):
            lowered = step_fn.trace(*args).lower(lowering_platforms=(platform,))

    n_params = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(abstract_params))
    params_b = _per_device_bytes(abstract.params, state_sh.params)
    opt_b = _per_device_bytes(abstract.opt_state, state_sh.opt_state)
    local_batch = batch_size // (data_shards * accum)  # rows per device per micro-batch
    act_b = activation_estimate(dataclasses.replace(cfg, attention=attention), local_batch, seq_len)
    out: dict[str, Any] = {
        "mesh": dict(zip(sharding.MESH_AXES, shape)), "devices": n, "params": n_params,
        "batch_size": batch_size, "grad_accum_steps": accum, "seq_len": seq_len, "dtype": cfg.dtype,
        "remat_policy": cfg.remat_policy, "scan_layers": cfg.scan_layers, "rows_per_device": local_batch,
        "attention": cfg.attention if cfg.attention == attention else f"{cfg.attention} (config: {attention})",
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
             f"{r['dtype']} compute, remat {r['remat_policy']}, attention {r['attention']}, "
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


# `lime-jax aot --table FILE` compiles these and rewrites the table between the markers in FILE.
TABLE_RUN = "runs/gpu.gin"
TABLE_MODELS = ("models/500m.gin", "models/1b.gin", "models/2b.gin")
TABLE_MESH = (1, 8, 1)  # one node of 8 GPUs
TABLE_VARIANTS = ((), ("ModelConfig.remat_policy = 'none'",))  # the run config's remat, then none
TABLE_BEGIN = "<!-- begin: generated by `lime-jax aot --table docs/scaling.md`; do not edit -->"
TABLE_END = "<!-- end: generated table -->"
H100_GIB = 80


def memory_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A markdown table of (model config name, compile result) rows: memory per device."""
    out = ["| model | params | remat | micro-batch per device | XLA:CPU peak | "
           "estimate: params + grads + Adam + activations | fits 90% of 80 GiB |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows:
        e = r["estimate_per_device"]
        peak = r["memory_analysis_per_device"]["peak_gib"]
        out.append(f"| {name} | {r['params'] / 1e9:.2f}B | {r['remat_policy']} | "
                   f"{r['rows_per_device']} x {r['seq_len']} | {peak:.1f} GiB | {e['params_gib']:.1f} + "
                   f"{e['grads_gib']:.1f} + {e['opt_state_gib']:.1f} + {e['activations_gib']:.1f} = "
                   f"{e['total_gib']:.1f} GiB | "
                   f"{'yes' if max(peak, e['total_gib']) <= 0.9 * H100_GIB else 'no'} |")
    return "\n".join(out)


def write_table(path: str, models: Sequence[str] = TABLE_MODELS, bindings: Sequence[str] = (),
                timeout_s: float | None = None) -> str:
    """Compiles each of `models` with TABLE_RUN (+ `bindings`) on TABLE_MESH, remat as configured
    and off, and replaces the lines between TABLE_BEGIN and TABLE_END in `path` by their table."""
    with open(path) as f:
        text = f.read()
    if text.count(TABLE_BEGIN) != 1 or text.count(TABLE_END) != 1 or text.index(TABLE_BEGIN) > text.index(TABLE_END):
        raise ValueError(f"{path} needs one pair of marker lines to write the table between:\n"
                         f"{TABLE_BEGIN}\n{TABLE_END}")
    rows = []
    for model in models:
        for variant in TABLE_VARIANTS:
            r = compile_config([TABLE_RUN, model], [*bindings, *variant], TABLE_MESH, timeout_s=timeout_s)
            print(format_report(f"{TABLE_RUN} + {model}", r), file=sys.stderr, flush=True)
            rows.append((os.path.basename(model), r))
    r0 = rows[0][1]
    caption = (f"`{TABLE_RUN}` on a {' x '.join(map(str, TABLE_MESH))} (data x fsdp x tensor) mesh of fake CPU "
               f"devices: batch {r0['batch_size']} x {r0['seq_len']} in {r0['grad_accum_steps']} micro-batch(es) "
               f"of {r0['rows_per_device']} x {r0['seq_len']} per device, "
               f"{r0['dtype']} compute, attention {r0['attention']}, scan_layers={r0['scan_layers']}.")
    table = f"{caption}\n\n{memory_table(rows)}"
    head, rest = text.split(TABLE_BEGIN)
    _, tail = rest.split(TABLE_END)
    with open(path, "w") as f:
        f.write(f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{tail}")
    return table


class AotError(RuntimeError):
    """The mesh cannot be compiled here: too few devices, or the fake-device subprocess failed."""


def compile_config(gin_files: Sequence[str], bindings: Sequence[str], mesh_shape: Sequence[int],
                   compile_: bool = True, platform: str = "cpu", timeout_s: float | None = None
                   ) -> dict[str, Any]:
    """Parses the gin files + bindings and runs `compile_train_step` for `mesh_shape`.

    With fewer devices than the mesh on CPU, compiles in a subprocess with that many fake CPU
    devices. The trainer's required paths do not matter for compiling: placeholders fill them,
    and `bindings` win over them.
    """
    import jax

    from lime_jax.trainer import train  # noqa: F401 (registers every configurable a run config binds)
    from lime_jax.trainer.gin_config import parse_gin

    shape = tuple(int(s) for s in mesh_shape)
    n = math.prod(shape)
    if compile_ and jax.device_count() < n:
        if jax.default_backend() != "cpu" or os.environ.get(_CHILD_ENV):
            raise AotError(f"mesh {shape} needs {n} devices, this process has "
                           f"{jax.device_count()} {jax.default_backend()} devices")
        return run_in_subprocess(gin_files, bindings, shape, timeout_s)
    parse_gin(gin_files, [*_PLACEHOLDERS, *bindings])
    return compile_train_step(shape, compile_=compile_, platform=platform)


def run_in_subprocess(gin_files: Sequence[str], bindings: Sequence[str], mesh_shape: Sequence[int],
                      timeout_s: float | None = None) -> dict[str, Any]:
    """`compile_config` in a fresh process with one fake CPU device per mesh position."""
    devices = math.prod(mesh_shape)
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]))
    env[_CHILD_ENV] = "1"  # a child that still lacks devices fails instead of recursing
    spec = json.dumps({"gin_files": list(gin_files), "bindings": list(bindings), "mesh": list(mesh_shape)})
    proc = subprocess.run([sys.executable, "-m", "lime_jax.trainer.aot", spec], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    raise AotError(f"compiling {' + '.join(gin_files)} for mesh {tuple(mesh_shape)} with {devices} fake devices "
                   f"failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def _child_main(spec: str) -> int:
    """The subprocess of `run_in_subprocess`: compile one JSON spec, print the result as JSON."""
    args = json.loads(spec)
    try:
        result = compile_config(args["gin_files"], args["bindings"], args["mesh"])
    except (ValueError, FileNotFoundError) as e:
        print(f"lime-jax aot: {e}", file=sys.stderr)
        return 1
    print(_RESULT_PREFIX + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
