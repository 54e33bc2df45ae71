"""Distils spaCy's tags into the causal tagger: train on an annotated cache, save a tagger dir.

Batches come from the Grain loader with `shift=+1`, which puts the tags of target piece i at
position i (docs/architecture.md, "Batches"): the tagger reads `decoder_target_tokens` (the
document's pieces) and learns `decoder_input_pos` / `decoder_input_ner` at the same position.
Documents longer than `seq_len` are split into segments exactly as for the LM; `tag()` splits
long inputs the same way, so inference never meets positions that training did not.

A tagger dir holds `checkpoints/<step>/` (Orbax, parameters only), `vocab_pos.json`,
`vocab_ner.json`, `spm.model` (copied from the cache) and, written last, `tagger.json`: its
presence marks a finished dir.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time

import jax
import optax
import orbax.checkpoint as ocp
from flax import nnx

from lime_jax.annotation.vocab import TagVocab
from lime_jax.data import cache as cache_lib
from lime_jax.data import loader
from lime_jax.model.config import ModelConfig
from lime_jax.tagger.model import TAGS, TaggerModel, tag_loss
from lime_jax.trainer.optim import OptimizerConfig, make_optimizer

FORMAT = "lime_jax.tagger.v1"
META_NAME = "tagger.json"
SPM_NAME = "spm.model"
CHECKPOINT_SUBDIR = "checkpoints"


def vocab_name(tag: str) -> str:
    return f"vocab_{tag}.json"


@dataclasses.dataclass(frozen=True)
class TaggerTrainConfig:
    """Defaults chosen on a validation slice of bundled:train (100 documents spread over the split,
    none trained on; never the held-out split), 4096-piece model, POS / NER agreement per piece:
    300 steps on 1000 documents 0.844 / 0.944; 600 steps on 4000 documents 0.872 / 0.954 (1200
    steps on them no better: 0.872 / 0.953); 1200 steps on 8000 documents spread over the whole
    split 0.890 / 0.959. seq_len 256 gave 0.847 / 0.941 (1000 documents) at a third of the
    tagging speed; a wider or deeper trunk costs tagging time in proportion, which the speed
    target (10x spaCy's annotation) cannot spare: the gains came from more documents."""

    steps: int = 1200
    batch_size: int = 32
    seq_len: int = 128
    seed: int = 0
    learning_rate: float = 5e-3
    warmup_steps: int = 100
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 192
    log_every: int = 100

    def model_config(self, vocab_size: int) -> ModelConfig:
        # f32 compute: the tagger is small and mostly runs on CPUs, where bf16 matmuls are slow.
        return ModelConfig(vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, n_kv_heads=self.n_heads, d_ff=self.d_ff,
                           dtype="float32", param_dtype="float32")


def read_cache(cache_dir: str) -> tuple[dict, dict[str, TagVocab]]:
    """The cache's verified manifest and its POS/NER vocabularies; CacheError if unusable."""
    manifest = cache_lib.verify_cache(cache_dir)
    mpath = os.path.join(cache_dir, cache_lib.MANIFEST_NAME)
    missing = [f"targets_{t}" for t in TAGS if f"targets_{t}" not in manifest["features"]]
    if missing:
        raise cache_lib.CacheError(f"{mpath}: field 'features': the tagger needs {missing}, the "
                                   f"cache has {manifest['features']}")
    for field in ("spm_model", "spm_sha256", "tokenization"):
        if field not in manifest:
            raise cache_lib.CacheError(f"{mpath}: field {field!r} missing (write the cache with "
                                       "`lime-jax annotate`)")
    vocabs = {}
    for tag in TAGS:
        path = os.path.join(cache_dir, manifest.get("vocab_files", {}).get(f"targets_{tag}", vocab_name(tag)))
        if not os.path.isfile(path):
            raise cache_lib.CacheError(f"{path}: tag vocabulary of the cache is missing")
        vocabs[tag] = TagVocab.load(path)
        if vocabs[tag].size != manifest["vocab_sizes"][f"targets_{tag}"]:
            raise cache_lib.CacheError(
                f"{path}: holds {vocabs[tag].size} tags, {mpath} field 'vocab_sizes.targets_{tag}' "
                f"says {manifest['vocab_sizes'][f'targets_{tag}']}")
    return manifest, vocabs


def _clear_out_dir(out_dir: str, overwrite: bool) -> None:
    """Makes `out_dir` empty; with `overwrite`, removes an earlier tagger's files (tagger.json
    first, so an interrupted retrain never leaves a dir that looks finished) but nothing else."""
    ours = {META_NAME, CHECKPOINT_SUBDIR, SPM_NAME, *(vocab_name(t) for t in TAGS)}
    present = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if present and not overwrite:
        raise FileExistsError(f"{out_dir}: not empty; choose another --out or pass --overwrite")
    foreign = [n for n in present if n not in ours]
    if foreign:
        raise FileExistsError(f"{out_dir}: holds {foreign[:3]}, which a tagger dir does not; "
                              "--overwrite only replaces a tagger dir")
    for name in sorted(present, key=lambda n: n != META_NAME):
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(out_dir, exist_ok=True)


def save_params(out_dir: str, step: int, model: TaggerModel) -> None:
    with ocp.CheckpointManager(os.path.join(os.path.abspath(out_dir), CHECKPOINT_SUBDIR)) as mgr:
        mgr.save(step, args=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
        mgr.wait_until_finished()


def train_tagger(cache_dir: str, out_dir: str, tc: TaggerTrainConfig = TaggerTrainConfig(),
                 overwrite: bool = False) -> dict:
    """Trains a tagger on `cache_dir` and writes the tagger dir `out_dir`; returns tagger.json."""
    if tc.steps < 1:
        raise ValueError(f"steps must be >= 1, got {tc.steps}")
    manifest, vocabs = read_cache(cache_dir)
    _clear_out_dir(out_dir, overwrite)

    cfg = tc.model_config(manifest["vocab_sizes"]["targets"])
    model = TaggerModel(cfg, {t: vocabs[t].size for t in TAGS}, rngs=nnx.Rngs(tc.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx, _ = make_optimizer(OptimizerConfig(learning_rate=tc.learning_rate,
                                           warmup_steps=min(tc.warmup_steps, tc.steps // 10)), tc.steps)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, pieces, pos, ner, segment_ids, positions):
        def loss_fn(p):
            return tag_loss(nnx.merge(graphdef, p), pieces, pos, ner, segment_ids, positions)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    data = iter(loader.build_dataset(cache_dir, tc.seq_len, tc.batch_size, shift=1, seed=tc.seed,
                                     shard_index=0, shard_count=1, read_threads=2, tags=TAGS))
    totals: dict[str, float] = {}
    t0 = time.time()
    for step in range(1, tc.steps + 1):
        b = next(data)
        params, opt_state, metrics = train_step(
            params, opt_state, b["decoder_target_tokens"], b["decoder_input_pos"],
            b["decoder_input_ner"], b["decoder_segment_ids"], b["decoder_positions"])
        if step % tc.log_every == 0 or step == tc.steps:
            m = jax.device_get(metrics)
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n = max(float(m["num_pieces"]), 1.0)
            print(f"tagger step {step}/{tc.steps}: loss pos {m['loss_pos']:.3f} ner {m['loss_ner']:.3f}, "
                  f"acc pos {m['correct_pos'] / n:.3f} ner {m['correct_ner'] / n:.3f}, "
                  f"{step * tc.batch_size * tc.seq_len / (time.time() - t0):,.0f} slots/s",
                  file=sys.stderr, flush=True)
    seconds = time.time() - t0
    nnx.update(model, params)

    save_params(out_dir, tc.steps, model)
    for tag in TAGS:
        vocabs[tag].save(os.path.join(out_dir, vocab_name(tag)))
    spm_src = os.path.join(cache_dir, manifest["spm_model"])
    shutil.copyfile(spm_src, os.path.join(out_dir, SPM_NAME))
    meta = {
        "format": FORMAT,
        "model": dataclasses.asdict(cfg),
        "tag_sizes": {t: vocabs[t].size for t in TAGS},
        "seq_len": tc.seq_len,
        "step": tc.steps,
        "spm_sha256": manifest["spm_sha256"],
        "tokenization": manifest["tokenization"],
        "spacy": manifest.get("spacy"),
        "train": {"cache": os.path.abspath(cache_dir), "config": dataclasses.asdict(tc),
                  "seconds": round(seconds, 2),
                  # accuracy over the logged batches (their pieces), as a sanity figure
                  **{f"logged_acc_{t}": round(totals[f"correct_{t}"] / max(totals["num_pieces"], 1.0), 4)
                     for t in TAGS}},
    }
    tmp = os.path.join(out_dir, f".{META_NAME}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(out_dir, META_NAME))
    return meta
