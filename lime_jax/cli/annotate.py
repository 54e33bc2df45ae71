"""`lime-jax annotate`: a corpus -> the ArrayRecord cache of aligned features.

    lime-jax annotate --input bundled:train --spm spm.model --out CACHE --workers 4

`--runner local` (lime_jax.annotation.local_runner) resumes an interrupted run shard by shard;
`--runner beam` (lime_jax.annotation.beam_runner) runs the same worker code as a Beam pipeline.
Its tags are `oracle` (spaCy over whole documents). An annotated cache is re-tagged with an
honest source, keeping its pieces (lime_jax.annotation.retag):

    lime-jax annotate --from-cache CACHE --tags prefix --out CACHE_PREFIX --workers 2
    lime-jax annotate --from-cache CACHE --tagger TAGGER_DIR --out CACHE_TAGGER
"""
from __future__ import annotations

# First: it sets one BLAS thread per process before anything loads numpy.
from lime_jax.annotation import local_runner  # isort: skip

import argparse
import json
import os
import sys

from lime_jax import corpus
from lime_jax.annotation import annotator, inputs, manifest, retag, tag_sources
from lime_jax.annotation.worker import ProcessorSpec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lime-jax annotate", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help=inputs.INPUT_HELP)
    source.add_argument("--from-cache", dest="from_cache", metavar="CACHE",
                        help="re-tag this annotated cache with --tags (same pieces, same order)")
    p.add_argument("--spm", help="SentencePiece model (lime-jax spm-train); with --input")
    p.add_argument("--tags", default="oracle",
                   help="tag source: oracle (spaCy over whole documents; with --input), or, with "
                        "--from-cache, prefix (spaCy over the text up to each piece) or tagger:DIR "
                        "(the causal tagger of `lime-jax tagger train`)")
    p.add_argument("--tagger", metavar="DIR", help="same as --tags tagger:DIR")
    p.add_argument("--window", type=int, default=None,
                   help="with --from-cache: tag documents in windows of N pieces (tags see only their "
                        "window; bounds the prefix source's O(n^2) cost)")
    p.add_argument("--out", required=True, help="cache directory to write")
    p.add_argument("--workers", type=int, default=1, help="annotation processes")
    p.add_argument("--tokenization", choices=["lime", "plain"], default="lime")
    p.add_argument("--ner-scheme", choices=["bio", "types"], default="bio")
    p.add_argument("--spacy-model", default=annotator.DEFAULT_SPACY_MODEL)
    p.add_argument("--use-blis", action="store_true",
                   help="use thinc's blis kernels (default: numpy's BLAS, faster on CPUs where blis "
                        "falls back to generic kernels; tags are identical)")
    p.add_argument("--docs-per-shard", type=int, default=manifest.DOCS_PER_SHARD)
    p.add_argument("--max-docs", type=int, default=None, help="annotate the first N documents only")
    p.add_argument("--utf8-errors", choices=["strict", "replace"], default="strict",
                   help="invalid UTF-8 in an input: fail naming file, line and byte (strict), "
                        "or substitute U+FFFD (replace)")
    p.add_argument("--text-field", default="text", help=inputs.TEXT_FIELD_HELP)
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="a document that cannot be read (no string text field: missing, null, not a "
                        "string; malformed JSON) or processed (e.g. a lone surrogate escape in JSONL): "
                        "stop naming its position (fail), or skip it, listing it and its error in the "
                        "manifest's 'skipped_documents' and counting it (skip)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache built with other settings")
    p.add_argument("--runner", choices=["local", "beam"], default="local",
                   help="local: --workers processes on this machine; beam: an Apache Beam pipeline "
                        "(pip install 'lime_jax[beam]'; see docs/scaling.md)")
    p.add_argument("--beam_options", default="",
                   help="Beam pipeline options as one string (write it as --beam_options=\"...\"), e.g. "
                        "--beam_options=\"--runner=DataflowRunner --project=P --region=R "
                        "--temp_location=gs://B/tmp\" (default: DirectRunner)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1 or args.docs_per_shard < 1:
        print("lime-jax annotate: --workers and --docs-per-shard must be >= 1", file=sys.stderr)
        return 2
    try:
        source = tag_sources.source_from_flags(args.tags, args.tagger)
    except ValueError as e:
        parser.error(str(e))
    if args.from_cache:
        return _retag(args, source)
    if source.kind != "oracle":
        parser.error(f"--tags {source} re-tags an annotated cache: annotate with --input first (oracle "
                     "tags), then pass that cache as --from-cache")
    if not args.spm:
        parser.error("--spm is required with --input")
    spec = ProcessorSpec(args.spm, tokenization=args.tokenization, ner_scheme=args.ner_scheme,
                         spacy_model=args.spacy_model, use_blis=args.use_blis)
    common = dict(docs_per_shard=args.docs_per_shard, max_docs=args.max_docs, utf8_errors=args.utf8_errors,
                  text_field=args.text_field, on_error=args.on_error, overwrite=args.overwrite)
    try:
        if args.runner == "beam":
            from lime_jax.annotation import beam_runner  # needs the optional apache-beam install

            result = beam_runner.annotate_corpus(args.input, args.out, spec, beam_options=args.beam_options,
                                                 **common)
        else:
            result = local_runner.annotate_corpus(args.input, args.out, spec, workers=args.workers, **common)
    except (ValueError, OSError, RuntimeError) as e:
        hint = " (pass --utf8-errors replace to substitute U+FFFD)" if isinstance(e, corpus.Utf8Error) else ""
        print(f"lime-jax annotate: {e}{hint}", file=sys.stderr)
        return 1
    counts, tp = result["counts"], result["throughput"]
    print(json.dumps({"out": args.out, **counts, "words_per_second": tp["words_per_second"]}))
    return 0


def _retag(args, source: tag_sources.TagSource) -> int:
    try:
        tagger = None
        if source.kind == "tagger":
            from lime_jax.tagger.infer import load_checked
            from lime_jax.tagger.train import read_cache

            src_manifest, vocabs = read_cache(args.from_cache)  # the cache's manifest and tag vocabularies
            tagger = load_checked(source.path, os.path.join(args.from_cache, src_manifest["spm_model"]), vocabs)
        result = retag.retag_cache(args.from_cache, args.out, source, tagger=tagger, window=args.window,
                                   max_docs=args.max_docs, workers=args.workers, overwrite=args.overwrite)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"lime-jax annotate: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": args.out, "tag_source": result["tag_source"], **result["counts"]}))
    return 0
