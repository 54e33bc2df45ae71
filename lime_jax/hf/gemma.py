"""lime_jax's decoder as transformers' Gemma (v1): config fields and tensors, both ways.

The decoder (lime_jax/model/decoder.py) is Gemma's architecture term for term, so a baseline is a
stock `GemmaForCausalLM` and a Gemma checkpoint imports without custom code:
- embedding: the token row times sqrt(d_model), the same f32 constant Gemma's scaled embedding uses;
- each block: RMSNorm (eps inside the rsqrt, f32) -> attention with rotate-half RoPE (frequencies
  theta^(-2i/head_dim)), scores scaled by head_dim^-0.5, query head n reading kv head
  n // (n_heads / n_kv_heads) -> residual; RMSNorm -> gate/up/down MLP, act(gate) * up, with
  gelu-tanh (`gelu_pytorch_tanh`) or silu -> residual;
- final RMSNorm, then the token table (tied) or an untied head.
Llama is not this function: it does not scale embeddings, so a tied Llama has no counterpart here.

The one convention that differs is RMSNorm's gain: ours multiplies by `scale`, Gemma by
`1 + weight`. Export writes `weight = scale - 1`, import reads `scale = 1 + weight`, both in f32.
Import is exact (`1 + weight` is what Gemma computes). Export is exact for every scale in
[0.5, 2^24] (`scale - 1` is then representable, so `1 + (scale - 1)` gives `scale` back); a
smaller scale comes back on the float grid near 1 (at most 2^-24 off in [-1, 0.5)).
`norm_roundtrip_error` measures it; `lime-jax export` prints it.

Parameters are flat dicts keyed by the NNX path joined with "/" (`blocks/0/attn/wq`), values numpy.
A `scan_layers` model stacks its blocks (`blocks/attn/wq` [n_layers, ...]); `flat_params` gives
per-layer keys for either layout and `stack_layers` turns them into the stacked one.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from lime_jax.ids import EOS_ID, PAD_ID

MODEL_TYPE = "gemma"
# Activation names transformers' Gemma accepts -> ModelConfig.mlp_activation. Gemma's config
# reads the legacy "gelu" as the tanh approximation, which is what jax.nn.gelu computes.
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu", "gelu": "gelu", "silu": "silu"}
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class HFError(ValueError):
    """A Hugging Face checkpoint that does not fit the model: names the file and the tensor or field."""


def flat_params(state) -> dict[str, np.ndarray]:
    """An NNX param state -> `{"blocks/0/attn/wq": array, ...}` (host numpy), per layer also
    for stacked (`scan_layers`) blocks."""
    from flax import nnx

    out = {}
    for path, v in nnx.to_flat_state(state):
        value = np.asarray(v.get_value())
        if path[0] == "blocks" and not isinstance(path[1], int):  # stacked: [n_layers, ...]
            rest = "/".join(str(k) for k in path[1:])
            out.update({f"blocks/{i}/{rest}": layer for i, layer in enumerate(value)})
        else:
            out["/".join(str(k) for k in path)] = value
    return out


def stack_layers(params: Mapping[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    """Per-layer keys (`blocks/{i}/...`) -> the `scan_layers` layout (`blocks/...` [n_layers, ...])."""
    out = {k: v for k, v in params.items() if not k.startswith("blocks/")}
    rests = sorted({k.split("/", 2)[2] for k in params if k.startswith("blocks/")})
    for rest in rests:
        out[f"blocks/{rest}"] = np.stack([params[f"blocks/{i}/{rest}"] for i in range(n_layers)])
    return out


def hf_config(cfg, max_position_embeddings: int) -> dict:
    """config.json of the Gemma model that computes what `Decoder(cfg)` computes."""
    return {
        "architectures": ["GemmaForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "gelu_pytorch_tanh" if cfg.mlp_activation == "gelu" else "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        # T5 ids: the decoder input starts with 0 (lime_jax.ids.BOS_INPUT_ID), EOS is 1.
        "bos_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "dtype": cfg.param_dtype,
    }


def norm_to_hf(scale: np.ndarray) -> np.ndarray:
    return scale.astype(np.float32) - np.float32(1)


def norm_from_hf(weight: np.ndarray) -> np.ndarray:
    return np.float32(1) + weight.astype(np.float32)


def norm_roundtrip_error(params: Mapping[str, np.ndarray]) -> float:
    """Max |scale - (1 + (scale - 1))| over every RMSNorm gain (0.0: the export is exact)."""
    errs = [np.max(np.abs(norm_from_hf(norm_to_hf(v)) - v), initial=0.0)
            for k, v in params.items() if k.endswith("/scale")]
    return float(max(errs, default=0.0))


def _hf_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every tensor a Gemma checkpoint of `cfg` holds, with its shape (torch Linear: [out, in])."""
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_ff
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}"
        shapes.update({
            f"{pre}.input_layernorm.weight": (D,),
            f"{pre}.self_attn.q_proj.weight": (N * H, D),
            f"{pre}.self_attn.k_proj.weight": (K * H, D),
            f"{pre}.self_attn.v_proj.weight": (K * H, D),
            f"{pre}.self_attn.o_proj.weight": (D, N * H),
            f"{pre}.post_attention_layernorm.weight": (D,),
            f"{pre}.mlp.gate_proj.weight": (F, D),
            f"{pre}.mlp.up_proj.weight": (F, D),
            f"{pre}.mlp.down_proj.weight": (D, F),
        })
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    return shapes


def to_hf(cfg, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our parameters -> Gemma's tensors (metadata tables not included)."""
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    out = {"model.embed_tokens.weight": params["embed/token"],
           "model.norm.weight": norm_to_hf(params["final_norm/scale"])}
    for i in range(cfg.n_layers):
        b, pre = f"blocks/{i}", f"model.layers.{i}"
        out.update({
            f"{pre}.input_layernorm.weight": norm_to_hf(params[f"{b}/attn_norm/scale"]),
            f"{pre}.self_attn.q_proj.weight": params[f"{b}/attn/wq"].reshape(D, N * H).T,
            f"{pre}.self_attn.k_proj.weight": params[f"{b}/attn/wk"].reshape(D, K * H).T,
            f"{pre}.self_attn.v_proj.weight": params[f"{b}/attn/wv"].reshape(D, K * H).T,
            f"{pre}.self_attn.o_proj.weight": params[f"{b}/attn/wo"].reshape(N * H, D).T,
            f"{pre}.post_attention_layernorm.weight": norm_to_hf(params[f"{b}/mlp_norm/scale"]),
            f"{pre}.mlp.gate_proj.weight": params[f"{b}/mlp/w_gate"].T,
            f"{pre}.mlp.up_proj.weight": params[f"{b}/mlp/w_up"].T,
            f"{pre}.mlp.down_proj.weight": params[f"{b}/mlp/w_down"].T,
        })
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["head"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf(cfg, tensors: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Gemma's tensors -> our parameters, in `cfg.param_dtype`, metadata tables zero (a LIME
    model that computes exactly what the checkpoint computes until the tables learn)."""
    tensors = dict(tensors)
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        # Some checkpoints store the tied head anyway; it must be the embedding itself.
        if not np.array_equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
            raise HFError(f"{source}: tensor lm_head.weight differs from model.embed_tokens.weight, but "
                          "the model ties its head to the embedding (ModelConfig.tie_embeddings = True)")
        del tensors["lm_head.weight"]
    shapes = _hf_shapes(cfg)
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        raise HFError(f"{source}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}: "
                      "not part of a Gemma decoder of this ModelConfig")
    for name, shape in shapes.items():
        if name not in tensors:
            raise HFError(f"{source}: tensor {name} is missing (the ModelConfig needs shape {list(shape)})")
        if tuple(tensors[name].shape) != shape:
            raise HFError(f"{source}: tensor {name} has shape {list(tensors[name].shape)}, the ModelConfig "
                          f"needs {list(shape)} ({_config_summary(cfg)})")
    t = {k: v.astype(np.float32) for k, v in tensors.items()}
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    out = {"embed/token": t["model.embed_tokens.weight"], "final_norm/scale": norm_from_hf(t["model.norm.weight"])}
    for i in range(cfg.n_layers):
        b, pre = f"blocks/{i}", f"model.layers.{i}"
        out.update({
            f"{b}/attn_norm/scale": norm_from_hf(t[f"{pre}.input_layernorm.weight"]),
            f"{b}/attn/wq": t[f"{pre}.self_attn.q_proj.weight"].T.reshape(D, N, H),
            f"{b}/attn/wk": t[f"{pre}.self_attn.k_proj.weight"].T.reshape(D, K, H),
            f"{b}/attn/wv": t[f"{pre}.self_attn.v_proj.weight"].T.reshape(D, K, H),
            f"{b}/attn/wo": t[f"{pre}.self_attn.o_proj.weight"].T.reshape(N, H, D),
            f"{b}/mlp_norm/scale": norm_from_hf(t[f"{pre}.post_attention_layernorm.weight"]),
            f"{b}/mlp/w_gate": t[f"{pre}.mlp.gate_proj.weight"].T,
            f"{b}/mlp/w_up": t[f"{pre}.mlp.up_proj.weight"].T,
            f"{b}/mlp/w_down": t[f"{pre}.mlp.down_proj.weight"].T,
        })
    if not cfg.tie_embeddings:
        out["head"] = t["lm_head.weight"].T
    for name, size in cfg.metadata:
        out[f"embed/tables/{name}"] = np.zeros((size, D), np.float32)
        if cfg.metadata_weight == "learned":
            out[f"embed/weights/{name}"] = np.asarray(cfg.metadata_weight_init, np.float32)
    dtype = np.dtype(cfg.param_dtype)
    return {k: np.ascontiguousarray(v, dtype=dtype) for k, v in out.items()}


def from_hf_keys(cfg) -> set[str]:
    """The parameters `from_hf` gives: the Gemma decoder's and the metadata tables (and weights)."""
    keys = {"embed/token", "final_norm/scale"} | ({"head"} if not cfg.tie_embeddings else set())
    for i in range(cfg.n_layers):
        keys |= {f"blocks/{i}/{k}" for k in ("attn_norm/scale", "attn/wq", "attn/wk", "attn/wv", "attn/wo",
                                              "mlp_norm/scale", "mlp/w_gate", "mlp/w_up", "mlp/w_down")}
    for name, _ in cfg.metadata:
        keys.add(f"embed/tables/{name}")
        if cfg.metadata_weight == "learned":
            keys.add(f"embed/weights/{name}")
    return keys


def _config_summary(cfg) -> str:
    return (f"vocab_size={cfg.vocab_size}, d_model={cfg.d_model}, n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, "
            f"n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.resolved_head_dim}, d_ff={cfg.d_ff}, "
            f"tie_embeddings={cfg.tie_embeddings}")


def check_config(hf: Mapping, cfg, source: str) -> None:
    """Raises HFError unless the checkpoint's config.json describes `Decoder(cfg)`'s function,
    listing every field that differs with the gin binding that would match it."""
    model_type = hf.get("model_type")
    if model_type != MODEL_TYPE:
        why = ("Llama does not scale embeddings by sqrt(hidden_size), so it is another function than "
               "lime_jax's decoder" if model_type == "llama" else
               "a lime_jax LIME export; resume its training run's model dir instead" if model_type == "lime_gemma"
               else "lime_jax's decoder is Gemma's architecture")
        raise HFError(f"{source}: model_type is {model_type!r}, expected {MODEL_TYPE!r} ({why})")
    problems = []
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope type {rope.get('rope_type', rope.get('type'))!r}: lime_jax's RoPE is the default kind")
    for field in ("attention_bias", "use_bidirectional_attention"):
        if hf.get(field):
            problems.append(f"{field}={hf[field]!r}: lime_jax's attention has no bias and is causal")
    act = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")
    hidden_size, n_heads = hf.get("hidden_size"), hf.get("num_attention_heads")
    theirs = {
        "vocab_size": hf.get("vocab_size"), "d_model": hidden_size, "n_layers": hf.get("num_hidden_layers"),
        "n_heads": n_heads, "n_kv_heads": hf.get("num_key_value_heads", n_heads),
        "head_dim": hf.get("head_dim") or (hidden_size // n_heads if hidden_size and n_heads else None),
        "d_ff": hf.get("intermediate_size"), "norm_eps": hf.get("rms_norm_eps"),
        "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10_000.0)),
        "tie_embeddings": hf.get("tie_word_embeddings", True), "mlp_activation": _ACTIVATIONS.get(act),
    }
    fields = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
              "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
              "d_ff": "intermediate_size", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
              "tie_embeddings": "tie_word_embeddings", "mlp_activation": "hidden_act"}
    if theirs["mlp_activation"] is None:
        problems.append(f"hidden_act={act!r}: lime_jax's MLP computes {sorted(_ACTIVATIONS)} only")
        del theirs["mlp_activation"]
    ours = {f: (cfg.resolved_head_dim if f == "head_dim" else getattr(cfg, f)) for f in theirs}
    for f, value in theirs.items():
        if value != ours[f]:
            problems.append(f"{fields[f]}={value!r} but ModelConfig.{f}={ours[f]!r} "
                            f"(bind ModelConfig.{f} = {value!r})")
    if problems:
        raise HFError(f"{source}: the checkpoint does not match the model config:\n  " + "\n  ".join(problems))


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise HFError(f"{path}: not found; is {hf_dir} a Hugging Face model directory?")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise HFError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def _safetensors():
    try:
        import safetensors.numpy
    except ImportError:
        raise HFError("reading and writing Hugging Face checkpoints needs the hf extra: "
                      "pip install 'lime_jax[hf]'") from None
    return safetensors


def read_tensors(hf_dir: str) -> tuple[dict[str, np.ndarray], str]:
    """Every tensor of `hf_dir`'s safetensors checkpoint (one file or an index of shards), and the
    file that names them (for errors)."""
    safetensors = _safetensors()
    index = os.path.join(hf_dir, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        source = index
    else:
        files, source = [SAFETENSORS], os.path.join(hf_dir, SAFETENSORS)
    out = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise HFError(f"{path}: not found (lime_jax reads safetensors checkpoints only)")
        out.update(safetensors.numpy.load_file(path))
    return out, source


def write_tensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    # transformers refuses safetensors files without this format tag.
    _safetensors().numpy.save_file(dict(tensors), path, metadata={"format": "pt"})
