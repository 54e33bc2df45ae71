"""`lime-jax show`: the pieces of a text with their POS and NER tags, for people or programs."""
from __future__ import annotations

import argparse
import json
import sys

from lime_jax.annotation import align
from lime_jax.annotation.annotator import DEFAULT_SPACY_MODEL, SpacyAnnotator
from lime_jax.annotation.pipeline import DocumentProcessor


def show(text: str, processor: DocumentProcessor, plus_one: bool = False) -> dict:
    """Equal-length lists `pieces`, `ids`, `pos`, `ner` (tag strings), EOS last."""
    features = processor.align(text, processor.annotator.annotate([text])[0])
    ids, pos, ner = features[:3]
    if plus_one:
        pos, ner = align.shift_tags(pos, 1), align.shift_tags(ner, 1)
    return {
        "pieces": [processor.tokenizer.id_to_piece(i) for i in ids.tolist()],
        "ids": ids.tolist(),
        "pos": [processor.pos_vocab.tag(i) for i in pos.tolist()],
        "ner": [processor.ner_vocab.tag(i) for i in ner.tolist()],
    }


def format_table(rows: dict) -> str:
    header = ("piece", "id", "POS", "NER")
    cols = [rows["pieces"], [str(i) for i in rows["ids"]], rows["pos"], rows["ner"]]
    cols = [[repr(p)[1:-1] for p in cols[0]]] + cols[1:]  # show control characters escaped
    widths = [max([len(h)] + [len(c) for c in col]) for h, col in zip(header, cols)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in zip(*cols)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lime-jax show", description=__doc__)
    p.add_argument("--spm", required=True, help="SentencePiece model")
    p.add_argument("--tokenization", choices=align.TOKENIZATIONS, default="lime")
    p.add_argument("--plus-one", action="store_true", help="LIME+1: each piece shows the next piece's tags")
    p.add_argument("--ner-scheme", choices=["bio", "types"], default="bio")
    p.add_argument("--spacy-model", default=DEFAULT_SPACY_MODEL)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("text", nargs="+", help="the text (several arguments are joined by spaces)")
    args = p.parse_args(argv)
    try:
        annotator = SpacyAnnotator(args.spacy_model, ner_scheme=args.ner_scheme)
        processor = DocumentProcessor(annotator, args.spm, args.tokenization)
        rows = show(" ".join(args.text), processor, args.plus_one)
    except ValueError as e:
        print(f"lime-jax show: {e}", file=sys.stderr)
        return 1
    print(json.dumps(rows, ensure_ascii=False) if args.json else format_table(rows))
    return 0
