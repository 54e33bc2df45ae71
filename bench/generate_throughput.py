"""Generation throughput of a LIME model by where the tags of generated pieces come from.

    .venv/bin/python bench/generate_throughput.py [--steps N] [--prompts N] [--max-new N]

One LIME model with tag heads (as gin/runs/lime_self.gin: LIME plus heads that forecast the next
token's POS and NER, at the quickstart size) is trained briefly on the caches of bench/efficiency.py (built or reused);
the causal tagger is the one that bench distils (trained here if missing). The same prompts (the
first pieces of held-out documents) are then decoded greedily, as one batch, three ways:
- `self`: the model's own forecast (lime_jax.inference.self_tags), prompt included: no spaCy;
- `tagger`: the causal tagger tags the prompt and re-tags each sequence after every step;
- `spacy`: spaCy re-annotates each sequence's decoded text after every step (`--tags prefix`,
  what `lime-jax generate` does by default).
Each source is run once to compile, then timed over `--repeats` runs; a rate is generated pieces
(EOS excluded) per second of wall time, all three in one process, so the ratios compare like
with like on a shared machine. The model's quality does not matter here, only the cost of the tags.

Last line: self_over_spacy_speedup=<n> tagger_over_spacy_speedup=<n> (target: self >= 5)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("One LIME"):])
    p.add_argument("--out", default=os.path.join(REPO, "runs", "bench_generate_throughput"))
    p.add_argument("--cache-root", dest="cache_root", default=os.path.join(REPO, "runs", "bench_efficiency"),
                   help="where bench/efficiency.py keeps (or will keep) SentencePiece, caches and the tagger")
    p.add_argument("--steps", type=int, default=200, help="training steps of the LIME model with heads")
    p.add_argument("--prompts", type=int, default=16, help="prompts decoded as one batch")
    p.add_argument("--prompt-pieces", dest="prompt_pieces", type=int, default=24)
    p.add_argument("--max-new", dest="max_new", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    sys.path.insert(0, REPO)
    import logging

    logging.getLogger("lime_jax").setLevel(logging.WARNING)
    import efficiency

    from lime_jax.data import cache as cache_lib
    from lime_jax.inference import generate, self_tags
    from lime_jax.inference import model_dir as model_dir_lib
    from lime_jax.tagger.infer import load_checked
    from lime_jax.tagger.train import train_tagger
    from lime_jax.trainer import train

    caches = efficiency.build_caches(args.cache_root, None, 4000, 200, 6000, 8000, args.workers)
    tagger_dir = os.path.join(args.cache_root, "tagger")
    if not os.path.exists(os.path.join(tagger_dir, "tagger.json")):
        train_tagger(os.path.abspath(caches["tagger_train"]), tagger_dir, overwrite=True)
    run_dir = os.path.join(args.out, f"lime_self_steps{args.steps}")
    if not os.path.exists(os.path.join(run_dir, "config.gin")):
        train.train(["runs/quickstart.gin"], [
            f"MODEL_DIR = '{run_dir}'", f"CACHE_DIR = '{caches['train']}'", f"EVAL_CACHE_DIR = '{caches['heldout']}'",
            f"TRAIN_STEPS = {args.steps}", f"CHECKPOINT_EVERY = {args.steps}", f"EVAL_EVERY = {args.steps}",
            "EvalConfig.batches = 4", "TrainConfig.progress = False",
            efficiency.heads_binding("{heads:1}", caches["train"])])
    loaded = model_dir_lib.load(run_dir)
    tagger = load_checked(tagger_dir, loaded.spm_path, loaded.vocabs)
    docs, _ = cache_lib.read_documents(caches["heldout"], args.prompts)
    prompts = [d[0, :min(args.prompt_pieces, d.shape[1] - 1)] for d in docs]  # never the EOS
    spacy_retag = generate.make_retagger(loaded)
    tagger_retag = generate.make_retagger(loaded, tagger)
    inc = loaded.decoder  # the model's own mesh and placement, as `lime-jax generate` decodes
    heads = self_tags.require_forecast(loaded.cfg, loaded.shift, run_dir)
    sources = {
        "self": lambda: generate.decode_batch(inc, 0, prompts, [None] * len(prompts), args.max_new,
                                              forecast_heads=heads),
        "tagger": lambda: generate.decode_batch(inc, 0, prompts, _tags(tagger_retag, prompts),
                                                args.max_new, retag=tagger_retag),
        "spacy": lambda: generate.decode_batch(inc, 0, prompts, _prefix_tags(loaded, prompts),
                                               args.max_new, retag=spacy_retag),
    }
    rates = {}
    for name, run in sources.items():
        run()  # compile
        t0, pieces = time.perf_counter(), 0
        for _ in range(args.repeats):
            pieces += sum(len(d.ids) for d in run())
        rates[name] = pieces / (time.perf_counter() - t0)
        print(f"{name:>6}: {rates[name]:9.1f} generated pieces/s ({pieces} pieces, {args.prompts} prompts x "
              f"up to {args.max_new}, {args.repeats} runs)", flush=True)
    print(f"self_over_spacy_speedup={rates['self'] / rates['spacy']:.2f} "
          f"tagger_over_spacy_speedup={rates['tagger'] / rates['spacy']:.2f}")
    return 0


def _tags(retag, prompts):
    """Per prompt, the tags of its pieces ([K, n] in table order) from a retagger."""
    return retag([list(map(int, p)) for p in prompts])


def _prefix_tags(loaded, prompts):
    """Prompt tags as `lime-jax generate --tags prefix` makes them: spaCy over each prefix."""
    from lime_jax.annotation import tag_sources

    fn = tag_sources.tag_function(tag_sources.PREFIX, loaded.tokenizer, loaded.processor.annotator)
    return [t[[tag_sources.TAG_ROWS.index(n) for n in loaded.cfg.metadata_names]] for t in fn(prompts)]


if __name__ == "__main__":
    sys.exit(main())
