"""Data efficiency of LIME with oracle and honest tags: same batches, same seeds, paired init.

    .venv/bin/python bench/efficiency.py [--corpus PATH] [--steps N] [--seeds K] [--out DIR]

On the bundled corpus (or the text corpus given: .txt one document per line, or .jsonl with a
`text` field; its last `--heldout-docs` documents are held out), builds SentencePiece and the
annotated (oracle) caches once, distils the causal tagger (`lime-jax tagger train`, its
defaults) from 8000 training documents spread evenly over the training split, re-tags caches
with honest sources (`lime-jax annotate --from-cache`: same pieces, other tags), then trains at the quickstart size (gin/runs/quickstart.gin) per seed:
- `baseline`: no metadata tables;
- `lime`: trained on oracle tags (spaCy over whole documents, the paper's recipe) and evaluated
  on the held-out text three ways: oracle tags -> `lime (oracle)`; prefix tags (spaCy over the
  text up to each piece, what re-annotation gives at generation time) -> `lime (oracle, eval
  prefix)`; causal-tagger tags -> `lime (oracle, eval tagger)`;
- `lime_tagger`: trained and evaluated on causal-tagger tags (causal throughout) -> `lime (tagger)`;
- `prev_piece`: position i sees the previous piece's oracle tags (METADATA_SHIFT = -1) ->
  `prev-piece (oracle)`. Not leak-free: from a word's third piece on, the previous piece carries
  the same whole-word (and right-context) tags.
- `aux`: the baseline's inputs plus heads that predict the next token's POS and NER tags
  (gin/runs/aux.gin): metadata as training targets only, nothing at inference -> `aux` (honest).
- `lime_plus1_self`: LIME+1 plus heads that forecast the tags of token i+2 (gin/runs/
  lime_plus1_self.gin), trained on oracle tags like LIME+1, evaluated with its own forecasts
  (`lime-jax eval`, mode `self`) at every checkpoint -> `lime+1+heads (self)` (honest). Its curve
  comes from `lime-jax eval` (every held-out piece, one window at a time); so do the baseline and
  oracle figures it is compared with (`gain_share_self`, `plus1_self_tokens_to_baseline_acc`).
All arms of a seed read one token stream with the same seed, hence the same batches, and start
from the same non-metadata weights (the tables draw from their own RNG stream). Held-out prefix
tags are computed per 128-piece window (the model's sequence length). Each run is evaluated for
token cohesion (`lime-jax eval --task heldout` on each held-out cache), then `lime-jax report`
compares the arms, labelling each oracle or honest (OUT/report).

Sizing (2 CPU cores): 3 seeds x 6 runs x 400 steps of 16 x 128 tokens, ~4 min a run on an idle
machine (~50 min), plus ~10 min of SentencePiece, annotation, tagger and re-tagging. Reduce with
--steps / --seeds / --train-docs. Finished stages and runs are reused on a re-run.

Last line: lime_tokens_to_baseline_acc=<oracle LIME, mean over seeds> seeds=<K>
baseline_final_acc=<n> lime_final_acc=<n> control_final_acc=<prev-piece> lime_prefix_acc=<n>
lime_tagger_acc=<n> gain_share_prefix=<n> gain_share_tagger=<n> aux_acc=<n> plus1_self_acc=<n>
best_honest_arm=<name> best_honest_tokens_to_baseline_acc=<n or nan>
(the first keys come from the trainer's held-out curves, as before; aux_acc, plus1_self_acc and
the best honest arm from `lime-jax eval` over every held-out piece, the same for every arm)
(an honest arm's held-out tags never saw the text after the predicted piece; the best is the one
with the highest final held-out accuracy by `lime-jax eval`, the same protocol for every arm)
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
# `{heads:K}` becomes ModelConfig.tag_heads predicting POS and NER of token i+K (sizes from the cache).
ARMS = {
    "baseline": (["ModelConfig.metadata = ()"], "train", "heldout", {}),
    "lime": (["METADATA_SHIFT = 0"], "train", "heldout", {"prefix": "heldout_prefix", "tagger": "heldout_tagger"}),
    "lime_tagger": (["METADATA_SHIFT = 0"], "train_tagger", "heldout_tagger", {}),
    "prev_piece": (["METADATA_SHIFT = -1"], "train", "heldout", {}),
    "aux": (["ModelConfig.metadata = ()", "{heads:1}"], "train", "heldout", {}),
    "lime_plus1_self": (["METADATA_SHIFT = 1", "{heads:2}"], "train", "heldout", {}),
}
SELF_ARMS = ("lime_plus1_self",)  # evaluated with their own forecasts at every checkpoint
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
            n = min(tagger_docs, len(texts))  # documents k * total // n: evenly over the whole split
            f.writelines(json.dumps({"text": texts[k * len(texts) // n]}) + "\n" for k in range(n))
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
    the prefix source (each stage reused when complete; a tagger trained on another cache or with
    other settings is retrained, and the caches it tagged are re-tagged)."""
    import dataclasses

    from lime_jax.annotation import retag, tag_sources
    from lime_jax.tagger.infer import CausalTagger
    from lime_jax.tagger.train import TaggerTrainConfig, train_tagger

    tagger_dir = os.path.join(out, "tagger")
    meta_path = os.path.join(tagger_dir, "tagger.json")
    trained = None
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            trained = json.load(f)["train"]
    wanted = {"cache": os.path.abspath(caches["tagger_train"]), "config": dataclasses.asdict(TaggerTrainConfig())}
    if trained is None or any(trained.get(k) != v for k, v in wanted.items()):
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
        done = os.path.join(out_caches[name], "manifest.json")
        inputs = [os.path.join(src, "manifest.json")] + ([meta_path] if source.kind == "tagger" else [])
        if os.path.exists(done) and os.path.getmtime(done) > max(map(os.path.getmtime, inputs)):
            continue  # re-tagged after its source cache and tagger were last written
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
    if all(os.path.exists(r) for r in results) and (
            arm not in SELF_ARMS or os.path.exists(os.path.join(model_dir, SELF_CURVE))):
        with open(results[0], encoding="utf-8") as f:
            if json.load(f).get("step") == steps:
                return {"skipped": True}
    extra_dirs = {name: caches[c] for name, c in extra.items()}
    # A self arm keeps a checkpoint per eval step: its honest curve is evaluated from them.
    every = eval_every if arm in SELF_ARMS else steps
    summary = train.train(["runs/quickstart.gin"], [
        f"MODEL_DIR = '{model_dir}'", f"CACHE_DIR = '{caches[train_cache]}'",
        f"EVAL_CACHE_DIR = '{caches[eval_cache]}'", f"DataConfig.extra_eval_cache_dirs = {extra_dirs!r}",
        f"TRAIN_STEPS = {steps}", f"EVAL_EVERY = {eval_every}", f"CHECKPOINT_EVERY = {every}", f"SEED = {seed}",
        f"CheckpointConfig.keep = {max(2, steps // every + 1)}",  # the seal needs two (CheckpointConfig)
        f"EvalConfig.batches = {eval_batches}", "TrainConfig.progress = False",
        *(heads_binding(b, caches[train_cache]) for b in bindings)])
    if arm in SELF_ARMS:
        write_self_curve(model_dir, caches[eval_cache], steps, every)
    loaded = model_dir_lib.load(model_dir)
    for cache_dir in eval_caches:  # the tags each held-out cache holds; cohesion per source
        evaluate.write_results(model_dir, evaluate.evaluate(loaded, ["heldout"], eval_cache_dir=cache_dir))
    return summary


def heads_binding(binding: str, cache_dir: str) -> str:
    """`{heads:K}` -> tag heads for POS and NER of token i+K, sized by the cache's vocabularies."""
    if not binding.startswith("{heads:"):
        return binding
    from lime_jax.data import cache as cache_lib

    ahead = int(binding[len("{heads:"):-1])
    sizes = cache_lib.load_manifest(cache_dir)["vocab_sizes"]
    heads = tuple((n, sizes[f"targets_{n}"], ahead, 1.0) for n in ("pos", "ner"))
    return f"ModelConfig.tag_heads = {heads!r}"


SELF_CURVE = "self_curve.json"


def write_self_curve(model_dir: str, eval_cache: str, steps: int, every: int) -> None:
    """Held-out accuracy at every checkpoint with the model's own tag forecasts (`self`), with
    no metadata (`unguided`) and with the cache's oracle tags: `lime-jax eval --step S`."""
    from lime_jax.evaluation import evaluate
    from lime_jax.inference import model_dir as model_dir_lib

    curve = []
    for step in sorted({*range(every, steps + 1, every), steps}):
        loaded = model_dir_lib.load(model_dir, step=step)
        h = evaluate.evaluate(loaded, ["heldout"], eval_cache_dir=eval_cache)["heldout"]
        curve.append({"step": step, "tokens": step * loaded.run.tokens_per_step, "oracle": h["accuracy"],
                      **{mode: m["accuracy"] for mode, m in h["modes"].items()}})
    with open(os.path.join(model_dir, SELF_CURVE), "w", encoding="utf-8") as f:
        json.dump(curve, f, indent=1)


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
    p.add_argument("--tagger-docs", dest="tagger_docs", type=int, default=8000,
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
    honest = honest_figures(args.out, args.seeds)
    best = max((a for a in honest["arms"] if a != "baseline"), key=lambda a: honest["arms"][a]["mean"])
    print(f"lime_tokens_to_baseline_acc={fmt(oracle.get('tokens_to_baseline_acc'))} seeds={args.seeds} "
          f"baseline_final_acc={fmt(arms['baseline']['final_accuracy'])} "
          f"lime_final_acc={fmt(oracle['final_accuracy'])} "
          f"control_final_acc={fmt(arms['prev-piece (oracle)']['final_accuracy'])} "
          f"lime_prefix_acc={fmt(prefix['final_accuracy'])} lime_tagger_acc={fmt(tagger['final_accuracy'])} "
          f"gain_share_prefix={fmt(prefix.get('gain_share'))} gain_share_tagger={fmt(tagger.get('gain_share'))} "
          f"aux_acc={fmt(honest['arms']['aux']['mean'])} "
          f"plus1_self_acc={fmt(honest['arms']['lime+1+heads (self)']['mean'])} "
          f"best_honest_arm={_slug(best)} "
          f"best_honest_tokens_to_baseline_acc={fmt(honest['arms'][best]['tokens_to_baseline_acc'])}")
    return 0


def _slug(label: str) -> str:
    """`lime (oracle, eval prefix)` -> `lime_oracle_eval_prefix`: one token for the last line."""
    return "_".join(label.replace("(", " ").replace(")", " ").replace(",", " ").split())


# run dir prefix -> (arm, results file (its eval tags), honest): the figures of the honest
# comparison, all by `lime-jax eval` on the held-out text (every piece, one window at a time).
EVAL_ARMS = {
    "baseline": ("baseline", "eval_results.json", True),
    "lime (oracle)": ("lime", "eval_results.json", False),
    "lime (oracle, eval prefix)": ("lime", "eval_results_prefix.json", True),
    "lime (oracle, eval tagger)": ("lime", "eval_results_tagger.json", True),
    "lime (tagger)": ("lime_tagger", "eval_results_tagger.json", True),
    "aux": ("aux", "eval_results.json", True),
    "lime+1+heads (self)": ("lime_plus1_self", "self", True),
}


def honest_figures(out: str, seeds: int) -> dict:
    """Per-seed final held-out accuracy of every arm by `lime-jax eval`, tokens to the baseline's
    final accuracy for the self arm (its self curve) and the others (their training curves, as the
    report computes them), and gain shares; prints the per-seed table. Written to OUT/honest.json."""
    from lime_jax.evaluation import report

    table = {}
    for label, (prefix, results, honest) in EVAL_ARMS.items():
        accs = []
        for seed in range(seeds):
            run = os.path.join(out, f"{prefix}_seed{seed}")
            if results == "self":
                with open(os.path.join(run, SELF_CURVE), encoding="utf-8") as f:
                    accs.append(json.load(f)[-1]["self"])
            else:
                with open(os.path.join(run, results), encoding="utf-8") as f:
                    accs.append(json.load(f)["heldout"]["accuracy"])
        table[label] = {"per_seed": accs, "mean": sum(accs) / len(accs), "honest": honest}
    base, oracle = table["baseline"]["mean"], table["lime (oracle)"]["mean"]
    for label, entry in table.items():
        if label != "baseline":
            entry["gain_share"] = (entry["mean"] - base) / (oracle - base) if oracle != base else None
    # Tokens to the baseline's final accuracy: the self arm from its self curve against the
    # baseline's final accuracy by the same protocol; the trained-tag arms from the report.
    fractions = []
    for seed in range(seeds):
        with open(os.path.join(out, f"lime_plus1_self_seed{seed}", SELF_CURVE), encoding="utf-8") as f:
            curve = json.load(f)
        tokens, exact = report.tokens_to_reach([c["tokens"] for c in curve], [c["self"] for c in curve],
                                               table["baseline"]["per_seed"][seed])
        # Not exact: reached at the first checkpoint already, so the fraction is an upper bound.
        fractions.append(None if tokens is None else tokens / curve[-1]["tokens"] * (1 if exact else -1))
    reached = [abs(f) for f in fractions if f is not None]
    table["lime+1+heads (self)"]["tokens_to_baseline_acc"] = sum(reached) / len(reached) if reached else None
    table["lime+1+heads (self)"]["tokens_to_baseline_acc_per_seed"] = fractions  # negative: an upper bound
    summary = report.summarize([r for seed in range(seeds) for prefix in ("baseline", "lime", "lime_tagger", "aux")
                                for r in report.load_runs(os.path.join(out, f"{prefix}_seed{seed}"))])
    for label, entry in table.items():
        if "tokens_to_baseline_acc" not in entry:
            entry["tokens_to_baseline_acc"] = summary["arms"].get(label, {}).get("tokens_to_baseline_acc")
    print("per-seed final held-out accuracy (lime-jax eval; honest = tags never saw the text after the piece):")
    print(f"  {'arm':<28} {'tags':<7} " + " ".join(f"seed{s:<4}" for s in range(seeds))
          + "   mean    gain_share  tokens_to_baseline_acc")
    for label, e in table.items():
        gs, tt = e.get("gain_share"), e.get("tokens_to_baseline_acc")
        print(f"  {label:<28} {'honest' if e['honest'] else 'oracle':<7} "
              + " ".join(f"{a:.4f}" for a in e["per_seed"]) + f"   {e['mean']:.4f}  "
              + ("-" if gs is None else f"{gs:+.3f}").ljust(11) + " " + ("-" if tt is None else f"{tt:.3f}"))
    with open(os.path.join(out, "honest.json"), "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1)
    return {"arms": {k: v for k, v in table.items() if v["honest"]}}


if __name__ == "__main__":
    sys.exit(main())
