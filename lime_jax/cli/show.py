"""`lime-jax show`: the pieces of a text with the POS and NER tags a model would see, for people
or programs.

    lime-jax show --spm spm.model "The President said"
    lime-jax show --spm spm.model --tags prefix --json "I saw the man"
    lime-jax show --spm spm.model --tags tagger:runs/tagger "I saw the man"

Tag sources (lime_jax.annotation.tag_sources): `oracle` (default) spaCy over the whole text,
`prefix` spaCy over the text up to and including each piece, `tagger:DIR` a causal tagger.
"""
from __future__ import annotations

import argparse
import json
import sys

from lime_jax.annotation import align, show, tag_sources
from lime_jax.annotation.annotator import DEFAULT_SPACY_MODEL, SpacyAnnotator
from lime_jax.annotation.pipeline import DocumentProcessor


def load_tagger(source: tag_sources.TagSource, processor: DocumentProcessor):
    """The causal tagger of a `tagger:DIR` source, checked against the SentencePiece model and
    the annotator's tag vocabularies (whose labels the table prints)."""
    from lime_jax.tagger.infer import load_checked  # JAX start-up only when a tagger is asked for

    return load_checked(source.path, processor.tokenizer.path,
                        {"pos": processor.pos_vocab, "ner": processor.ner_vocab})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lime-jax show", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Tag sources"):])
    p.add_argument("--spm", required=True, help="SentencePiece model")
    p.add_argument("--tags", default="oracle", metavar="SOURCE",
                   help="tag source: oracle (default), prefix or tagger:DIR")
    p.add_argument("--tagger", metavar="DIR", help="same as --tags tagger:DIR")
    p.add_argument("--tokenization", choices=align.TOKENIZATIONS, default="lime")
    p.add_argument("--plus-one", action="store_true", help="LIME+1: each piece shows the next piece's tags")
    p.add_argument("--ner-scheme", choices=["bio", "types"], default="bio")
    p.add_argument("--spacy-model", default=DEFAULT_SPACY_MODEL)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("text", nargs="+", help="the text (several arguments are joined by spaces)")
    args = p.parse_args(argv)
    try:
        source = tag_sources.source_from_flags(args.tags, args.tagger)
        annotator = SpacyAnnotator(args.spacy_model, ner_scheme=args.ner_scheme)
        processor = DocumentProcessor(annotator, args.spm, args.tokenization)
        tagger = load_tagger(source, processor) if source.kind == "tagger" else None
        rows = show.show(" ".join(args.text), processor, args.plus_one, source, tagger)
    except ValueError as e:
        print(f"lime-jax show: {e}", file=sys.stderr)
        return 1
    print(json.dumps(rows, ensure_ascii=False) if args.json else show.format_table(rows, source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
