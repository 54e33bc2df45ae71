"""`lime-jax spm-train`: a SentencePiece model with lime_jax's id convention, on text files.

    lime-jax spm-train --input bundled:train --vocab-size 4096 --out runs/spm
"""
from __future__ import annotations

import argparse
import sys

from lime_jax.annotation import inputs, spm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lime-jax spm-train", description=spm.train_spm.__doc__)
    parser.add_argument("--input", nargs="+", required=True, help=inputs.INPUT_HELP)
    parser.add_argument("--text-field", default="text", help=inputs.TEXT_FIELD_HELP)
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "char", "word"])
    parser.add_argument("--max-docs", type=int, default=None, help="train on the first N documents only")
    args = parser.parse_args(argv)
    try:
        texts = spm.training_texts(args.input, args.max_docs, args.text_field)
        path = spm.train_spm(texts, args.out, args.vocab_size, model_type=args.model_type)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"lime-jax spm-train: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({spm.Tokenizer(path).vocab_size} pieces)")
    return 0
