"""`lime-jax quickstart`: the whole method on the bundled corpus, in minutes on a laptop CPU.

Trains a SentencePiece model, annotates and caches a slice of the bundled corpus (and its
held-out split), trains a baseline and a LIME model of the quickstart size on the same token
stream, evaluates both on held-out text and prints a table. Every stage reuses what an
earlier run left in the output directory, so a second run only re-trains what is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

QUICKSTART_VOCAB = 4096  # ModelConfig.vocab_size in gin/models/quickstart.gin
ARMS = {
    # arm name -> extra gin bindings on top of gin/runs/quickstart.gin (a LIME run)
    "baseline": ["ModelConfig.metadata = ()"],
    "lime": [],
}


def _build_caches(args) -> dict[str, str]:
    from lime_jax.annotation import local_runner as annotate
    from lime_jax import corpus
    from lime_jax.annotation import spm

    os.makedirs(args.out, exist_ok=True)
    spm_model = os.path.join(args.out, "spm.model")
    if not os.path.exists(spm_model):
        print(f"[1/4] training SentencePiece ({QUICKSTART_VOCAB} pieces) on the bundled corpus", flush=True)
        texts = (t for i, (_, t) in zip(range(args.spm_docs), corpus.iter_documents(corpus.BUNDLED["train"])))
        spm.train_spm(texts, spm_model[: -len(".model")], QUICKSTART_VOCAB)
    caches = {}
    for split, max_docs in (("train", args.train_docs), ("heldout", args.heldout_docs)):
        out = os.path.join(args.out, "cache", f"sotu_{split}")
        print(f"[2/4] annotating {max_docs} documents of bundled:{split} -> {out}", flush=True)
        cli = ["--input", f"bundled:{split}", "--spm", spm_model, "--out", out,
               "--workers", str(args.workers), "--max-docs", str(max_docs)]
        manifest = annotate.annotate_corpus(annotate.build_parser().parse_args(cli))
        print(f"      {manifest['counts']['records']} documents, {manifest['counts']['pieces']} pieces", flush=True)
        # Absolute: each run's config.gin names its caches, and eval/generate run from anywhere.
        caches[split] = os.path.abspath(out)
    return caches


def _train_arms(args, caches: dict[str, str]) -> dict[str, dict]:
    from lime_jax.trainer import train

    results = {}
    for arm in args.arms:
        model_dir = os.path.join(args.out, arm)
        print(f"[3/4] training {arm} -> {model_dir}", flush=True)
        bindings = [
            f"MODEL_DIR = '{model_dir}'",
            f"CACHE_DIR = '{caches['train']}'",
            f"EVAL_CACHE_DIR = '{caches['heldout']}'",
            *ARMS[arm],
            *([f"TRAIN_STEPS = {args.steps}"] if args.steps else []),
        ]
        summary = train.train(["runs/quickstart.gin"], bindings)
        results[arm] = summary
    return results


def format_table(results: dict[str, dict]) -> str:
    header = f"{'run':<10} {'val loss':>9} {'val acc':>8} {'val ppl':>9} {'tokens/s':>9} {'steps':>6}"
    lines = [header, "-" * len(header)]
    for arm, s in results.items():
        lines.append(f"{arm:<10} {s['eval_loss']:>9.4f} {s['eval_accuracy']:>8.4f} "
                     f"{s['eval_perplexity']:>9.2f} {s['tokens_per_s'] or 0:>9.0f} {s['step']:>6d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lime-jax quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/quickstart", help="where everything is written")
    p.add_argument("--train-docs", type=int, default=3000, help="bundled training documents to annotate")
    p.add_argument("--heldout-docs", type=int, default=200, help="held-out documents to annotate")
    p.add_argument("--spm-docs", type=int, default=6000, help="documents to train SentencePiece on")
    p.add_argument("--workers", type=int, default=2, help="annotation processes")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the gin config's)")
    p.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        caches = _build_caches(args)
        results = _train_arms(args, caches)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"lime-jax quickstart: {e}", file=sys.stderr)
        return 1
    print(f"[4/4] held-out evaluation ({args.heldout_docs} documents of the 2000s speeches)\n")
    print(format_table(results))
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\nDone in {time.time() - t0:.0f} s. Outputs in {os.path.abspath(args.out)}:")
    print("  spm.model, cache/ (ArrayRecord caches), <run>/ (checkpoints, TensorBoard events, "
          "metrics.jsonl, config.gin), summary.json")
    print(f"  TensorBoard: tensorboard --logdir {args.out}")
    return 0
