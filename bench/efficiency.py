"""Data efficiency of LIME: baseline vs LIME vs the leakage control, same tokens, several seeds.

    .venv/bin/python bench/efficiency.py [--corpus PATH] [--steps N] [--seeds K] [--out DIR]

On the bundled corpus (or the text corpus given: .txt one document per line, or .jsonl with a
`text` field; its last `--heldout-docs` documents are held out), builds SentencePiece and the
annotated caches once, then trains at the quickstart size (gin/runs/quickstart.gin) for each seed:
- baseline: no metadata tables;
- lime: POS + NER tables, position i sees the tags of input token i (METADATA_SHIFT = 0);
- control: the same tables, position i sees the previous piece's tags (METADATA_SHIFT = -1),
  which cannot carry within-word information a bidirectional tagger leaked into the word's tags.
All arms of a seed read the same cache with the same seed, hence the same batches, for the same
number of steps. Each run is evaluated on held-out text (`lime-jax eval --task heldout`, for
token cohesion), then `lime-jax report` compares them (plots and report.md under OUT/report).

Sizing (2 CPU cores, ~90 minutes): 3 seeds x 3 arms x 400 steps of 16 x 128 tokens (0.8M tokens
per run, 10 held-out evals each), plus about 3 minutes of SentencePiece and annotation. At
~3k tokens/s (an idle 2-core machine) a run takes ~5 minutes, ~50 minutes in all; at the ~1.5k
tokens/s measured on a shared machine, ~90. Each run prints its time and an estimate for the
rest. Reduce with --steps / --seeds / --train-docs. Finished runs are reused on a re-run.

Last line: lime_tokens_to_baseline_acc=<fraction, mean over seeds> seeds=<K>
baseline_final_acc=<n> lime_final_acc=<n> control_final_acc=<n>
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {
    # arm -> gin bindings on top of gin/runs/quickstart.gin (a LIME run)
    "baseline": ["ModelConfig.metadata = ()"],
    "lime": ["METADATA_SHIFT = 0"],
    "control": ["METADATA_SHIFT = -1"],
}
SPM_VOCAB = 4096  # gin/models/quickstart.gin


def _split_corpus(path: str, out: str, heldout_docs: int) -> tuple[str, str]:
    """Writes the corpus's documents as train/heldout .jsonl files (last documents held out)."""
    from lime_jax.annotation.inputs import iter_input_documents

    texts = [t for _, t in iter_input_documents([path]) if t.strip()]
    if len(texts) <= heldout_docs:
        raise ValueError(f"{path}: {len(texts)} documents, need more than --heldout-docs={heldout_docs}")
    files = {}
    for split, part in (("train", texts[:-heldout_docs]), ("heldout", texts[-heldout_docs:])):
        files[split] = os.path.join(out, f"corpus_{split}.jsonl")
        with open(files[split], "w", encoding="utf-8") as f:
            for t in part:
                f.write(json.dumps({"text": t}) + "\n")
    return files["train"], files["heldout"]


def build_caches(out: str, corpus: str | None, train_docs: int, heldout_docs: int, spm_docs: int,
                 workers: int) -> dict[str, str]:
    """SentencePiece + train/heldout caches under OUT (each reused when already complete)."""
    from lime_jax.annotation import local_runner as annotate
    from lime_jax.annotation import spm
    from lime_jax.annotation.inputs import iter_input_documents

    os.makedirs(out, exist_ok=True)
    if corpus:
        inputs = dict(zip(("train", "heldout"), _split_corpus(corpus, out, heldout_docs)))
    else:
        inputs = {"train": "bundled:train", "heldout": "bundled:heldout"}
    spm_model = os.path.join(out, "spm.model")
    if not os.path.exists(spm_model):
        print(f"training SentencePiece ({SPM_VOCAB} pieces) on {inputs['train']}", flush=True)
        texts = (t for i, (_, t) in zip(range(spm_docs), iter_input_documents([inputs["train"]])))
        spm.train_spm(texts, spm_model[:-len(".model")], SPM_VOCAB)
    caches = {}
    for split, max_docs in (("train", train_docs), ("heldout", heldout_docs)):
        cache_dir = os.path.join(out, "cache", split)
        caches[split] = cache_dir
        if os.path.exists(os.path.join(cache_dir, "manifest.json")):
            continue
        t0 = time.time()
        cli = ["--input", inputs[split], "--spm", spm_model, "--out", cache_dir, "--workers", str(workers),
               "--max-docs", str(max_docs)]
        manifest = annotate.annotate_corpus(annotate.build_parser().parse_args(cli))
        print(f"cache {split}: {manifest['counts']['records']} documents, {manifest['counts']['pieces']} pieces "
              f"({time.time() - t0:.0f} s)", flush=True)
    return caches


def train_and_eval(model_dir: str, caches: dict[str, str], bindings: list[str], steps: int, eval_every: int,
                   eval_batches: int, seed: int) -> dict:
    """Trains one run (skipped when already finished) and writes its held-out eval_results.json."""
    from lime_jax.evaluation import evaluate
    from lime_jax.inference import model_dir as model_dir_lib
    from lime_jax.trainer import train

    results_path = os.path.join(model_dir, evaluate.RESULTS_NAME)
    if os.path.exists(results_path):
        with open(results_path, encoding="utf-8") as f:
            if json.load(f).get("step") == steps:
                return {"skipped": True}
    summary = train.train(["runs/quickstart.gin"], [
        f"MODEL_DIR = '{model_dir}'", f"CACHE_DIR = '{caches['train']}'",
        f"EVAL_CACHE_DIR = '{caches['heldout']}'", f"TRAIN_STEPS = {steps}", f"EVAL_EVERY = {eval_every}",
        f"CHECKPOINT_EVERY = {steps}", f"SEED = {seed}", f"run.eval_batches = {eval_batches}",
        "run.progress = False", *bindings])
    loaded = model_dir_lib.load(model_dir)
    evaluate.write_results(model_dir, evaluate.evaluate(loaded, ["heldout"]))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("On the bundled"):])
    p.add_argument("--corpus", default=None, help="text corpus (.txt/.jsonl, optionally .gz/.xz); default bundled")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "bench_efficiency"))
    p.add_argument("--steps", type=int, default=400, help="training steps per run (16 x 128 tokens each)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-every", dest="eval_every", type=int, default=None,
                   help="steps between held-out evals (default: steps / 10)")
    p.add_argument("--eval-batches", dest="eval_batches", type=int, default=16)
    p.add_argument("--train-docs", dest="train_docs", type=int, default=4000)
    p.add_argument("--heldout-docs", dest="heldout_docs", type=int, default=200)
    p.add_argument("--spm-docs", dest="spm_docs", type=int, default=6000)
    p.add_argument("--workers", type=int, default=2, help="annotation processes")
    args = p.parse_args(argv)
    if args.steps < 2 or args.seeds < 1:
        p.error("--steps must be >= 2 and --seeds >= 1")
    eval_every = args.eval_every or max(1, args.steps // 10)
    sys.path.insert(0, REPO)
    import logging

    logging.getLogger("lime_jax").setLevel(logging.WARNING)
    from lime_jax.evaluation import report

    t_start = time.time()
    caches = build_caches(args.out, args.corpus, args.train_docs, args.heldout_docs, args.spm_docs, args.workers)
    run_dirs = []
    jobs = [(seed, arm) for seed in range(args.seeds) for arm in ARMS]
    for i, (seed, arm) in enumerate(jobs):
        model_dir = os.path.join(args.out, f"{arm}_seed{seed}")
        t0 = time.time()
        s = train_and_eval(model_dir, caches, ARMS[arm], args.steps, eval_every, args.eval_batches, seed)
        dt = time.time() - t0
        if s.get("skipped"):
            print(f"[{i + 1}/{len(jobs)}] {arm} seed {seed}: already done ({model_dir})", flush=True)
        else:
            print(f"[{i + 1}/{len(jobs)}] {arm} seed {seed}: eval acc {s['eval_accuracy']:.4f} loss "
                  f"{s['eval_loss']:.4f}, {s['tokens_per_s'] or 0:.0f} tokens/s, {dt:.0f} s; about "
                  f"{dt * (len(jobs) - i - 1) / 60:.0f} min left", flush=True)
        run_dirs.append(model_dir)
    summary = report.report(run_dirs, os.path.join(args.out, "report"))
    arms = summary["arms"]
    print(f"report: {os.path.join(args.out, 'report', 'report.md')} ({time.time() - t_start:.0f} s in all)")
    frac = arms["lime"].get("tokens_to_baseline_acc")
    if arms["lime"].get("reached", 0) < args.seeds:
        print(f"note: LIME reached the baseline's final accuracy in {arms['lime'].get('reached', 0)} of "
              f"{args.seeds} seeds; the mean is over those")
    print(f"lime_tokens_to_baseline_acc={'nan' if frac is None else f'{frac:.4f}'} seeds={args.seeds} "
          f"baseline_final_acc={arms['baseline']['final_accuracy']:.4f} "
          f"lime_final_acc={arms['lime']['final_accuracy']:.4f} "
          f"control_final_acc={arms['control(-1)']['final_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
