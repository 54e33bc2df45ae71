"""`lime-jax quickstart`: the whole method on the bundled corpus, in minutes on a laptop CPU.

lime_jax.quickstart describes the stages; `--check-readme README.md` makes the run fail when
its table strays from the README's, `--update-readme README.md` writes it there.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from lime_jax import quickstart as qs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lime-jax quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/quickstart", help="where everything is written")
    p.add_argument("--train-docs", type=int, default=3000, help="bundled training documents to annotate")
    p.add_argument("--heldout-docs", type=int, default=200, help="held-out documents to annotate")
    p.add_argument("--spm-docs", type=int, default=6000, help="documents to train SentencePiece on")
    p.add_argument("--workers", type=int, default=2, help="annotation processes")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the gin config's)")
    p.add_argument("--arms", nargs="+", choices=sorted(qs.ARMS), default=list(qs.ARMS))
    readme = p.add_mutually_exclusive_group()
    readme.add_argument("--check-readme", metavar="README", default=None,
                        help="exit 1 if the table differs from this README's (CI: .ci/run)")
    readme.add_argument("--update-readme", metavar="README", default=None,
                        help="write the table into this README")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        results = qs.quickstart(args.out, train_docs=args.train_docs, heldout_docs=args.heldout_docs,
                                spm_docs=args.spm_docs, workers=args.workers, steps=args.steps, arms=args.arms)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"lime-jax quickstart: {e}", file=sys.stderr)
        return 1
    print(f"[4/4] held-out evaluation ({args.heldout_docs} documents of the 2000s speeches)\n")
    print(qs.format_table(results, speed=True))
    print(f"\nDone in {time.time() - t0:.0f} s. Outputs in {os.path.abspath(args.out)}:")
    print("  spm.model, cache/ (ArrayRecord caches), <run>/ (checkpoints, TensorBoard events, "
          f"metrics.jsonl, config.gin), summary.json, {qs.TABLE_NAME}")
    print(f"  TensorBoard: tensorboard --logdir {args.out}")
    table = qs.format_table(results)
    try:
        if args.check_readme:
            with open(args.check_readme, encoding="utf-8") as f:
                expected = qs.readme_table(f.read(), args.check_readme)
            diffs = qs.table_differences(expected, table, args.check_readme, "this run")
            if diffs:
                print(f"lime-jax quickstart: the table in {args.check_readme} is stale "
                      f"(rerun with --update-readme {args.check_readme}):\n  " + "\n  ".join(diffs),
                      file=sys.stderr)
                return 1
            print(f"  the table matches {args.check_readme}")
        if args.update_readme:
            with open(args.update_readme, encoding="utf-8") as f:
                text = f.read()
            with open(args.update_readme, "w", encoding="utf-8") as f:
                f.write(qs.replace_readme_table(text, table, args.update_readme))
            print(f"  wrote the table into {args.update_readme}")
    except (ValueError, OSError) as e:
        print(f"lime-jax quickstart: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
