"""`lime-jax export`: a trained run as a Hugging Face directory (transformers' Gemma; LIME tables
with a small modelling file), loadable with AutoModelForCausalLM and AutoTokenizer.

    lime-jax export --model_dir runs/quickstart/lime --out hf/lime [--step N]

Needs the hf extra (`pip install 'lime_jax[hf]'`). lime_jax.hf.export describes the files.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lime-jax export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True)
    p.add_argument("--out", required=True, help="new directory for the Hugging Face files")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--cache_dir", default=None, help="cache with spm.model + vocabularies (default: the run's)")
    args = p.parse_args(argv)
    from lime_jax.hf import export, gemma
    from lime_jax.inference import model_dir

    try:
        res = export.export_model_dir(args.model_dir, args.out, step=args.step, cache_dir=args.cache_dir)
    except (model_dir.ModelDirError, gemma.HFError) as e:
        print(f"lime-jax export: {e}", file=sys.stderr)
        return 1
    print(f"wrote {res['out']}: {res['model_type']} ({res['arm']}, step {res['step']}, {res['tensors']} tensors; "
          f"RMSNorm gains round-trip within {res['norm_roundtrip_error']:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
