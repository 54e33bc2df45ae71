"""The causal tagger against spaCy's oracle tags: agreement and speed on held-out text, one run.

Builds (or reuses, under --work) a SentencePiece model on --spm-docs and an annotated cache of
--train-docs documents of bundled:train, both sampled evenly over the split (it is sorted by year:
its first documents are all 1790-1830 prose, while held-out is 2000-2009), and a cache of the
first --heldout-docs of bundled:heldout, through the `lime-jax` commands; trains the tagger on
the training cache, then on the held-out text measures:
- agreement of the tagger's tags with the cache's spaCy tags over all pieces (EOS excluded),
  POS and NER separately, also split by the piece's place in its word;
- pieces/s of spaCy annotation (the annotate command's DocumentProcessor: spaCy, SentencePiece,
  alignment; one process) against the tagger's `tag()` over the same pieces (after one warm-up
  call; JAX uses every core). Each side runs --rounds times, alternating; the best counts;
- the honest reference: agreement of the `prefix` tag source (spaCy over the text up to and
  including each piece: what re-annotation at generation time gives) on the first
  --prefix-docs held-out documents (20: 3221 pieces; spaCy runs once per piece, O(n^2)), cached
  with `annotate --from-cache --tags prefix`, next to the tagger's on the same pieces. Before a
  word's last piece neither has seen the whole word, nor either the words after it.
Nothing is tuned on the held-out text.
Last line: tagger_pos_agreement=<n> tagger_ner_agreement=<n> tagger_speedup=<n>
           prefix_pos_agreement=<n> prefix_ner_agreement=<n>
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax

from lime_jax import corpus
from lime_jax.annotation.annotator import SpacyAnnotator
from lime_jax.annotation.pipeline import DocumentProcessor
from lime_jax.data import cache as cache_lib
from lime_jax.tagger import agreement
from lime_jax.tagger.infer import CausalTagger
from lime_jax.tagger.model import TAGS
from lime_jax.tagger.train import TaggerTrainConfig, train_tagger


def lime_jax(*argv: str) -> None:
    """Runs a `lime-jax` command in a fresh process (annotation forks workers: keep JAX out)."""
    print("$ lime-jax " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "lime_jax", *argv], check=True)


def spread_sample(out_path: str, n: int) -> str:
    """Writes n bundled:train documents evenly spaced over the whole split (documents k * total // n)
    as JSONL. (Every (total // n)-th, cut at n, left the split's last years out.)"""
    docs = list(corpus.iter_documents(corpus.BUNDLED["train"]))
    n = min(n, len(docs))
    with open(out_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": i, "text": t}) + "\n" for i, t in (docs[k * len(docs) // n] for k in range(n)))
    return out_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench_tagger")
    parser.add_argument("--train-docs", type=int, default=8000)
    parser.add_argument("--heldout-docs", type=int, default=100)
    parser.add_argument("--prefix-docs", type=int, default=20,
                        help="first held-out documents tagged by the prefix source (the honest reference)")
    parser.add_argument("--spm-docs", type=int, default=6000)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=TaggerTrainConfig.steps)
    parser.add_argument("--workers", type=int, default=2, help="annotation processes for the caches")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    t_start = time.time()
    w = args.work
    os.makedirs(w, exist_ok=True)
    spm_model = os.path.join(w, "spm.model")
    if not os.path.exists(spm_model):
        sample = spread_sample(os.path.join(w, f"spm_sample_{args.spm_docs}.jsonl"), args.spm_docs)
        lime_jax("spm-train", "--input", sample, "--vocab-size", str(args.vocab_size),
                 "--out", spm_model[:-len(".model")])
    caches = {"train": os.path.join(w, f"cache_train_{args.train_docs}"),
              "heldout": os.path.join(w, f"cache_heldout_{args.heldout_docs}")}
    # A finished cache with the same inputs and settings makes these no-ops.
    lime_jax("annotate", "--input", spread_sample(os.path.join(w, f"train_sample_{args.train_docs}.jsonl"),
                                                  args.train_docs),
             "--spm", spm_model, "--out", caches["train"], "--workers", str(args.workers))
    lime_jax("annotate", "--input", "bundled:heldout", "--spm", spm_model, "--out", caches["heldout"],
             "--workers", str(args.workers), "--max-docs", str(args.heldout_docs))
    prefix_cache = f"{caches['heldout']}_prefix_{args.prefix_docs}"
    lime_jax("annotate", "--from-cache", caches["heldout"], "--tags", "prefix", "--out", prefix_cache,
             "--max-docs", str(args.prefix_docs), "--workers", str(args.workers))

    tc = TaggerTrainConfig(steps=args.steps)
    meta = train_tagger(caches["train"], os.path.join(w, "tagger"), tc, overwrite=True)
    print(f"trained {tc} in {meta['train']['seconds']} s", flush=True)
    tagger = CausalTagger.load(os.path.join(w, "tagger"))

    manifest, vocabs, docs = agreement.load_documents(caches["heldout"])
    tagger.check_spm(os.path.join(caches["heldout"], manifest["spm_model"]))
    tagger.check_vocabs(vocabs)
    texts = [text for _, (_, text) in zip(range(args.heldout_docs), corpus.iter_documents(corpus.BUNDLED["heldout"]))]
    processor = DocumentProcessor(SpacyAnnotator(), spm_model, manifest["tokenization"])
    seqs = [d[0] for d in docs]
    pieces = sum(len(s) for s in seqs)
    processor.process(texts[:4])
    tagger.tag(seqs)  # warm-up: compiles every length bucket the held-out text needs
    spacy_s, tagger_s = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        features, _ = processor.process(texts)
        spacy_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tags = tagger.tag(seqs)
        tagger_s.append(time.perf_counter() - t0)
    spacy_pieces = sum(f.shape[1] for f in features if f is not None)
    if spacy_pieces != pieces:
        raise RuntimeError(f"spaCy made {spacy_pieces} pieces of the held-out text, the cache holds "
                           f"{pieces}: not the same pipeline or text")
    res = agreement.score(manifest["features"], docs, tags)
    n_ref = args.prefix_docs
    rows = [manifest["features"].index(f"targets_{t}") for t in TAGS]
    prefix_docs, _ = cache_lib.read_documents(prefix_cache)
    ref = {"prefix": agreement.score(manifest["features"], docs[:n_ref], [d[rows] for d in prefix_docs]),
           "tagger": agreement.score(manifest["features"], docs[:n_ref], tags[:n_ref])}
    print(f"agreement (pos/ner) by the piece's place in its word: tagger on all {len(docs)} held-out documents;"
          f" tagger and prefix spaCy on the first {n_ref}")
    for place in ("all", "first_piece", "later_piece", "word_last_piece"):
        cols = [r if place == "all" else r[place] for r in (res, ref["tagger"], ref["prefix"])]
        print(f"  {place:16s}" + "".join(f" {c['pieces']:6d} pieces {c['pos_agreement']:.4f}/{c['ner_agreement']:.4f}"
                                         for c in cols))
    spacy_pps, tagger_pps = pieces / min(spacy_s), pieces / min(tagger_s)
    print(json.dumps({"heldout": res, f"first_{n_ref}_heldout": ref, "documents": len(docs), "pieces_incl_eos": pieces,
                      "spacy_seconds": spacy_s, "tagger_seconds": tagger_s,
                      "spacy_pieces_per_s": round(spacy_pps), "tagger_pieces_per_s": round(tagger_pps),
                      "train": meta["train"], "model": meta["model"], "devices": [str(d) for d in jax.devices()],
                      "bench_seconds": round(time.time() - t_start, 1)}, indent=1, default=str))
    print(f"tagger_pos_agreement={res['pos_agreement']:.4f} tagger_ner_agreement={res['ner_agreement']:.4f} "
          f"tagger_speedup={tagger_pps / spacy_pps:.2f} prefix_pos_agreement={ref['prefix']['pos_agreement']:.4f} "
          f"prefix_ner_agreement={ref['prefix']['ner_agreement']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
