"""`lime-jax generate`: text generation from a trained run, with metadata guidance for LIME+1.

    lime-jax generate --model_dir runs/quickstart/lime --prompt "The President said"
    lime-jax generate --model_dir DIR --prompt $'Q: What is 12 + 30?\\nA:' --guide "CD CD"
    lime-jax generate --model_dir DIR --prompt $'Q: What is 12 + 30?\\nA:' --guide-from " 42"
    lime-jax generate --model_dir DIR --prompt "The President said" --tags self   # a run with tag heads

lime_jax.inference.generate describes where the tags of generated tokens come from.
"""
from __future__ import annotations

import argparse
import json
import sys

from lime_jax.inference import generate


def main(argv: list[str] | None = None) -> int:
    doc = generate.__doc__
    p = argparse.ArgumentParser(prog="lime-jax generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc[doc.index("Where the tags"):])
    p.add_argument("--model_dir", required=True)
    p.add_argument("--prompt", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--guide", help="LIME+1: tags of the tokens to come, e.g. 'CD CD .' or JSON")
    g.add_argument("--guide-from", dest="guide_from", metavar="TEXT",
                   help="LIME+1: oracle guidance from annotating prompt + TEXT")
    p.add_argument("--max-new", dest="max_new", type=int, default=None,
                   help="tokens to generate (default 32; guided: guide length + 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", dest="top_k", type=int, default=0)
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--cache_dir", default=None, help="cache holding spm.model and the tag vocabularies "
                   "(default: the run's training cache)")
    p.add_argument("--tags", default=None,
                   help="where tags come from: LIME and previous-piece runs: prefix (default; spaCy re-annotates the "
                        "decoded text after every step), tagger:DIR (the causal tagger) or self (the run's tag heads "
                        "forecast them; no spaCy); LIME+1: self (no guide needed), oracle (with --guide-from); "
                        "without --tags a LIME+1 run forecasts the steps a guide leaves open when it has tag heads")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    from lime_jax.annotation import tag_sources
    from lime_jax.cli.eval import load_tagger
    from lime_jax.inference import model_dir

    try:
        tags = None if args.tags is None else tag_sources.parse_tag_source(args.tags, allow_self=True)
    except ValueError as e:
        p.error(str(e))

    try:
        loaded = model_dir.load(args.model_dir, step=args.step, cache_dir=args.cache_dir)
        tagger = load_tagger(tags, loaded) if tags is not None and tags.kind == "tagger" else None
        res = generate.generate(loaded, args.prompt, max_new=args.max_new, guide=args.guide,
                                guide_from=args.guide_from, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, tags=tags, tagger=tagger)
    except (model_dir.ModelDirError, generate.GuideError, ValueError) as e:
        print(f"lime-jax generate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1) if args.json else generate.format_result(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
