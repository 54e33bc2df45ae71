"""`lime-jax eval`: held-out metrics, token cohesion, cloze, addition and reasoning of a run.

    lime-jax eval --model_dir runs/quickstart/lime [--task heldout lambada addition reasoning]

Writes `<model_dir>/eval_results.json` (oracle tags) or `eval_results_<prefix|tagger>.json` (honest
tags: `--tags`, or a re-tagged eval cache); lime_jax.evaluation.evaluate describes the tasks.
"""
from __future__ import annotations

import argparse
import sys

from lime_jax.evaluation import evaluate


def load_tagger(tags, loaded):
    """The causal tagger of a `tagger:DIR` source, checked against the run's SentencePiece model
    and tag vocabularies (None for other sources)."""
    if tags.kind != "tagger":
        return None
    from lime_jax.tagger.infer import load_checked

    return load_checked(tags.path, loaded.spm_path, loaded.vocabs)


def main(argv: list[str] | None = None) -> int:
    doc = evaluate.__doc__
    p = argparse.ArgumentParser(prog="lime-jax eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc[doc.index("Tasks:"):])
    p.add_argument("--model_dir", required=True)
    p.add_argument("--task", nargs="+", choices=evaluate.TASKS, default=list(evaluate.TASKS), help="default: all")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--cache_dir", default=None, help="cache with spm.model + vocabularies (default: the run's)")
    p.add_argument("--eval_cache_dir", default=None, help="held-out cache (default: the run's DataConfig.eval_cache_dir)")
    p.add_argument("--max-docs", dest="max_docs", type=int, default=None, help="held-out documents to use")
    p.add_argument("--addition-n", dest="addition_n", type=int, default=150)
    p.add_argument("--addition-digits", dest="addition_digits", type=int, default=3)
    p.add_argument("--reasoning-n", dest="reasoning_n", type=int, default=100)
    p.add_argument("--cloze-context", dest="cloze_context", type=int, default=32,
                   help="minimum pieces of context before a cloze word")
    p.add_argument("--cloze-items", dest="cloze_items", type=int, default=300)
    p.add_argument("--batch-rows", dest="batch_rows", type=int, default=16)
    p.add_argument("--tags", default="oracle",
                   help="where a LIME run's tags come from: oracle (the cache's: spaCy over whole documents), "
                        "prefix (spaCy over the text up to each piece) or tagger:DIR (the causal tagger)")
    args = p.parse_args(argv)
    from lime_jax.annotation import tag_sources

    try:
        tags = tag_sources.parse_tag_source(args.tags)
    except ValueError as e:
        p.error(str(e))
    from lime_jax.data import cache as cache_lib
    from lime_jax.inference import model_dir

    try:
        loaded = model_dir.load(args.model_dir, step=args.step, cache_dir=args.cache_dir)
        tagger = load_tagger(tags, loaded)
        res = evaluate.evaluate(loaded, args.task, eval_cache_dir=args.eval_cache_dir, max_docs=args.max_docs,
                                addition_n=args.addition_n, addition_digits=args.addition_digits,
                                reasoning_n=args.reasoning_n, cloze_context=args.cloze_context,
                                cloze_items_max=args.cloze_items, batch_rows=args.batch_rows, tags=tags,
                                tagger=tagger)
    except (model_dir.ModelDirError, cache_lib.CacheError, ValueError) as e:
        print(f"lime-jax eval: {e}", file=sys.stderr)
        return 2
    path = evaluate.write_results(args.model_dir, res)
    print("\n".join(evaluate.summary_lines(res)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
