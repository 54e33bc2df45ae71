"""`lime-jax tagger`: train the causal POS/NER tagger on an annotated cache, or score one.

    lime-jax tagger train --cache runs/cache --out runs/tagger [--steps N --batch-size B ...]
    lime-jax tagger eval --tagger runs/tagger --cache runs/cache_heldout

`eval` prints the agreement of the tagger's tags with the cache's (spaCy, oracle) tags as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _train(args) -> int:
    from lime_jax.tagger.train import TaggerTrainConfig, train_tagger

    tc = TaggerTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TaggerTrainConfig)})
    meta = train_tagger(args.cache, args.out, tc, overwrite=args.overwrite)
    print(f"wrote {args.out} (step {meta['step']}, {meta['train']['seconds']} s)")
    return 0


def _eval(args) -> int:
    from lime_jax.tagger import agreement
    from lime_jax.tagger.infer import CausalTagger

    res = agreement.evaluate(CausalTagger.load(args.tagger), args.cache, args.max_docs)
    print(json.dumps(res, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lime_jax.tagger.train import TaggerTrainConfig

    p = argparse.ArgumentParser(prog="lime-jax tagger", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a tagger on an annotated cache")
    t.add_argument("--cache", required=True, help="cache written by `lime-jax annotate`")
    t.add_argument("--out", required=True, help="tagger dir to write")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    for f in dataclasses.fields(TaggerTrainConfig):
        t.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=f.default,
                       help=f"default {f.default}")
    e = sub.add_parser("eval", help="agreement with a cache's (oracle) tags")
    e.add_argument("--tagger", required=True, help="tagger dir (lime-jax tagger train)")
    e.add_argument("--cache", required=True, help="annotated cache with the same spm.model and vocabularies")
    e.add_argument("--max-docs", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lime_jax.data.cache import CacheError
    from lime_jax.tagger.infer import TaggerDirError

    try:
        return _train(args) if args.command == "train" else _eval(args)
    except (CacheError, TaggerDirError, FileExistsError, ValueError) as e:
        print(f"lime-jax tagger {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
