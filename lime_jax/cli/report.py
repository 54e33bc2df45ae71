"""`lime-jax report RUN_DIR ... --out DIR`: plots and a markdown summary comparing runs.

lime_jax.evaluation.report describes what is read and written.
"""
from __future__ import annotations

import argparse
import os
import sys

from lime_jax.evaluation import report


def main(argv: list[str] | None = None) -> int:
    doc = report.__doc__
    p = argparse.ArgumentParser(prog="lime-jax report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc[doc.index("Reads each"):])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="directory for the plots and report.md")
    args = p.parse_args(argv)
    from lime_jax.inference.model_dir import ModelDirError

    try:
        summary = report.report(args.run_dirs, args.out)
    except (ModelDirError, ValueError, OSError) as e:
        print(f"lime-jax report: {e}", file=sys.stderr)
        return 2
    for line in report.summary_lines(summary):
        print(line)
    print(f"wrote {os.path.join(os.path.abspath(args.out), 'report.md')} and " + ", ".join(summary["images"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
