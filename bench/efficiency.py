"""Data efficiency of LIME with oracle and honest tags: same batches, same seeds, paired init.

    .venv/bin/python bench/efficiency.py [--corpus PATH] [--steps N] [--seeds K] [--out DIR]

On the bundled corpus (or the text corpus given: .txt one document per line, or .jsonl with a
`text` field; its last `--heldout-docs` documents are held out), builds SentencePiece and the
annotated (oracle) caches once, distils the causal tagger (`lime-jax tagger train`) from 3000
training documents spread over the training split, re-tags caches with honest sources
(`lime-jax annotate --from-cache`: same pieces, other tags), then trains at the quickstart size (gin/runs/quickstart.gin) per seed:
- `baseline`: no metadata tables;
- `lime`: trained on oracle tags (spaCy over whole documents, the paper's recipe) and evaluated
  on the held-out text three ways: oracle tags -> `lime (oracle)`; prefix tags (spaCy over the
  text up to each piece, what re-annotation gives at generation time) -> `lime (oracle, eval
  prefix)`; causal-tagger tags -> `lime (oracle, eval tagger)`;
- `lime_tagger`: trained and evaluated on causal-tagger tags (causal throughout) -> `lime (tagger)`;
- `prev_piece`: position i sees the previous piece's oracle tags (METADATA_SHIFT = -1) ->
  `prev-piece (oracle)`. Not leak-free: from a word's third piece on, the previous piece carries
  the same whole-word (and right-context) tags.
All arms of a seed read one token stream with the same seed, hence the same batches, and start
from the same non-metadata weights (the tables draw from their own RNG stream). Held-out prefix
tags are computed per 128-piece window (the model's sequence length). Each run is evaluated for
token cohesion (`lime-jax eval --task heldout` on each held-out cache), then `lime-jax report`
compares the arms, labelling each oracle or honest (OUT/report).

Sizing (2 CPU cores): 3 seeds x 4 runs x 400 steps of 16 x 128 tokens, ~4 min a run on an idle
machine (~50 min), plus ~10 min of SentencePiece, annotation, tagger and re-tagging. Reduce with
--steps / --seeds / --train-docs. Finished stages and runs are reused on a re-run.

Last line: lime_tokens_to_baseline_acc=<oracle LIME, mean over seeds> seeds=<K>
baseline_final_acc=<n> lime_final_acc=<n> control_final_acc=<prev-piece> lime_prefix_acc=<n>
lime_tagger_acc=<n> gain_share_prefix=<n> gain_share_tagger=<n>
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# run -> (gin bindings on top of gin/runs/quickstart.gin (a LIME run), training cache, held-out
# caches: the main one, then extra ones by name)
ARMS = {
    "baseline": (["ModelConfig.metadata = ()"], "train", "heldout", {}),
    "lime": (["METADATA_SHIFT = 0"], "train", "heldout", {"prefix": "heldout_prefix", "tagger": "heldout_tagger"}),
    "lime_tagger": (["METADATA_SHIFT = 0"], "train_tagger", "heldout_tagger", {}),
    "prev_piece": (["METADATA_SHIFT = -1"], "train", "heldout", {}),
}
SEQ_LEN = 128  # gin/runs/quickstart.gin
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
                 tagger_docs: int, workers: int) -> dict[str, str]:
    """SentencePiece + train/heldout caches under OUT (each reused when already complete), and
    the tagger's training cache: `tagger_docs` documents spread evenly over the training split
    (a corpus sorted by time, like the bundled one, would otherwise teach the tagger one era)."""
    from lime_jax.annotation import local_runner, spm
    from lime_jax.annotation.inputs import iter_input_documents
    from lime_jax.annotation.worker import ProcessorSpec

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
    spread = os.path.join(out, "corpus_tagger_train.jsonl")
    if not os.path.exists(spread):
        texts = [t for _, t in iter_input_documents([inputs["train"]])]
        with open(spread, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts[::max(len(texts) // tagger_docs, 1)][:tagger_docs])
    inputs["tagger_train"] = spread
    caches = {}
    for split, max_docs in (("train", train_docs), ("heldout", heldout_docs), ("tagger_train", tagger_docs)):
        cache_dir = os.path.join(out, "cache", split)
        caches[split] = cache_dir
        if os.path.exists(os.path.join(cache_dir, "manifest.json")):
            continue
        t0 = time.time()
        manifest = local_runner.annotate_corpus([inputs[split]], cache_dir, ProcessorSpec(spm_model),
                                                workers=workers, max_docs=max_docs)
        print(f"cache {split}: {manifest['counts']['records']} documents, {manifest['counts']['pieces']} pieces "
              f"({time.time() - t0:.0f} s)", flush=True)
    return caches


def honest_caches(out: str, caches: dict[str, str], workers: int) -> dict[str, str]:
    """The causal tagger distilled from its training cache, and the caches re-tagged by it and by
    the prefix source (each stage reused when complete; a tagger trained on another cache is
    retrained, and the caches it tagged are re-tagged)."""
    from lime_jax.annotation import retag, tag_sources
    from lime_jax.tagger.infer import CausalTagger
    from lime_jax.tagger.train import train_tagger

    tagger_dir = os.path.join(out, "tagger")
    meta_path = os.path.join(tagger_dir, "tagger.json")
    trained_on = None
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            trained_on = json.load(f)["train"]["cache"]
    if trained_on != os.path.abspath(caches["tagger_train"]):
        t0 = time.time()
        train_tagger(os.path.abspath(caches["tagger_train"]), tagger_dir, overwrite=True)
        print(f"tagger: trained in {time.time() - t0:.0f} s ({tagger_dir})", flush=True)
    tagger = CausalTagger.load(tagger_dir)
    jobs = {"heldout_prefix": (caches["heldout"], tag_sources.PREFIX, SEQ_LEN),
            "heldout_tagger": (caches["heldout"], tag_sources.TagSource("tagger", tagger_dir), None),
            "train_tagger": (caches["train"], tag_sources.TagSource("tagger", tagger_dir), None)}
    out_caches = dict(caches)
    for name, (src, source, window) in jobs.items():
        out_caches[name] = os.path.join(out, "cache", name)
        t0 = time.time()
        m = retag.retag_cache(src, out_caches[name], source, tagger=tagger if source.kind == "tagger" else None,
                              window=window, workers=workers, overwrite=True)
        print(f"cache {name}: {m['counts']['records']} documents re-tagged with {source} ({time.time() - t0:.0f} s)",
              flush=True)
    return out_caches


def train_and_eval(model_dir: str, caches: dict[str, str], arm: str, steps: int, eval_every: int,
                   eval_batches: int, seed: int) -> dict:
    """Trains one run (skipped when already finished) and writes its held-out eval results, one
    file per held-out cache (each names its tag source)."""
    from lime_jax.evaluation import evaluate
    from lime_jax.inference import model_dir as model_dir_lib
    from lime_jax.trainer import train

    bindings, train_cache, eval_cache, extra = ARMS[arm]
    eval_caches = [caches[eval_cache], *(caches[c] for c in extra.values())]
    config = os.path.join(model_dir, "config.gin")
    if os.path.exists(config) and max(os.path.getmtime(os.path.join(c, "manifest.json"))
                                      for c in [caches[train_cache], *eval_caches]) > os.path.getmtime(config):
        shutil.rmtree(model_dir)  # a cache it read was rebuilt since (e.g. re-tagged by a new tagger)
    results = [evaluate.results_path(model_dir, _source_of(c)) for c in eval_caches]
    if all(os.path.exists(r) for r in results):
        with open(results[0], encoding="utf-8") as f:
            if json.load(f).get("step") == steps:
                return {"skipped": True}
    extra_dirs = {name: caches[c] for name, c in extra.items()}
    summary = train.train(["runs/quickstart.gin"], [
        f"MODEL_DIR = '{model_dir}'", f"CACHE_DIR = '{caches[train_cache]}'",
        f"EVAL_CACHE_DIR = '{caches[eval_cache]}'", f"DataConfig.extra_eval_cache_dirs = {extra_dirs!r}",
        f"TRAIN_STEPS = {steps}", f"EVAL_EVERY = {eval_every}", f"CHECKPOINT_EVERY = {steps}", f"SEED = {seed}",
        f"EvalConfig.batches = {eval_batches}", "TrainConfig.progress = False", *bindings])
    loaded = model_dir_lib.load(model_dir)
    for cache_dir in eval_caches:  # the tags each held-out cache holds; cohesion per source
        evaluate.write_results(model_dir, evaluate.evaluate(loaded, ["heldout"], eval_cache_dir=cache_dir))
    return summary


def _source_of(cache_dir: str) -> str:
    from lime_jax.data import cache as cache_lib

    return cache_lib.load_manifest(cache_dir).get("tag_source", "oracle")


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
    p.add_argument("--tagger-docs", dest="tagger_docs", type=int, default=3000,
                   help="training documents the causal tagger learns from, spread over the training split")
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
    caches = build_caches(args.out, args.corpus, args.train_docs, args.heldout_docs, args.spm_docs,
                          args.tagger_docs, args.workers)
    caches = honest_caches(args.out, caches, args.workers)
    run_dirs = []
    jobs = [(seed, arm) for seed in range(args.seeds) for arm in ARMS]
    for i, (seed, arm) in enumerate(jobs):
        model_dir = os.path.join(args.out, f"{arm}_seed{seed}")
        t0 = time.time()
        s = train_and_eval(model_dir, caches, arm, args.steps, eval_every, args.eval_batches, seed)
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
    print("\n".join(report.summary_lines(summary)))
    oracle = arms["lime (oracle)"]
    if oracle.get("reached", 0) < args.seeds:
        print(f"note: oracle LIME reached the baseline's final accuracy in {oracle.get('reached', 0)} of "
              f"{args.seeds} seeds; the mean is over those")

    def fmt(x):
        return "nan" if x is None else f"{x:.4f}"

    prefix, tagger = arms["lime (oracle, eval prefix)"], arms["lime (tagger)"]
    print(f"lime_tokens_to_baseline_acc={fmt(oracle.get('tokens_to_baseline_acc'))} seeds={args.seeds} "
          f"baseline_final_acc={fmt(arms['baseline']['final_accuracy'])} "
          f"lime_final_acc={fmt(oracle['final_accuracy'])} "
          f"control_final_acc={fmt(arms['prev-piece (oracle)']['final_accuracy'])} "
          f"lime_prefix_acc={fmt(prefix['final_accuracy'])} lime_tagger_acc={fmt(tagger['final_accuracy'])} "
          f"gain_share_prefix={fmt(prefix.get('gain_share'))} gain_share_tagger={fmt(tagger.get('gain_share'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
