"""Words/s of `lime-jax annotate`'s code path against bare spaCy `nlp.pipe`, in one run.

Both tag the same ~100k words of the bundled corpus with the same pipeline, components and
thinc ops; the passes (bare spaCy, annotate with 1 worker, with 2 workers) alternate over
rounds so that load from other processes hits all alike. The
annotate path includes alignment to SentencePiece pieces and writing the ArrayRecord cache.
Last line: annotate_ratio=<lime/spacy> lime_wps=<n> spacy_wps=<n> workers2_speedup=<n>
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time

from lime_jax.annotation import local_runner  # isort: skip  (first: one BLAS thread per process)
from lime_jax import corpus
from lime_jax.annotation import spm
from lime_jax.annotation.annotator import SpacyAnnotator
from lime_jax.annotation.worker import ProcessorSpec


def annotate_wps(path: str, spm_model: str, out: str, workers: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)  # a finished cache would make the run a no-op
    manifest = local_runner.annotate_corpus([path], out, ProcessorSpec(spm_model), workers=workers)
    return manifest["throughput"]["words_per_second"], manifest["counts"]["words"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--words", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_annotate_")
    texts, words = [], 0
    for _, text in corpus.iter_documents(corpus.BUNDLED["train"]):
        texts.append(text)
        words += len(text.split())
        if words >= args.words:
            break
    path = os.path.join(tmp, "slice.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    spm_model = spm.train_spm(itertools.islice(texts, 3000), os.path.join(tmp, "spm"), 2048)

    nlp = SpacyAnnotator().nlp  # the same pipeline, components and ops as annotate's
    list(nlp.pipe(texts[:50]))  # warm-up
    lime, lime2, spacy_s, n_words = [], [], [], 0
    for r in range(args.rounds):
        t = time.perf_counter()
        for _ in nlp.pipe(texts, batch_size=64):
            pass
        spacy_s.append(time.perf_counter() - t)
        wps, n_words = annotate_wps(path, spm_model, os.path.join(tmp, "cache1"), 1)
        lime.append(wps)
        lime2.append(annotate_wps(path, spm_model, os.path.join(tmp, "cache2"), 2)[0])
        print(f"round {r}: spacy {n_words / spacy_s[-1]:,.0f} words/s, annotate {wps:,.0f} words/s, "
              f"annotate --workers 2 {lime2[-1]:,.0f} words/s", file=sys.stderr)
    lime_wps = sum(lime) / len(lime)
    spacy_wps = n_words * len(spacy_s) / sum(spacy_s)
    w2 = sum(lime2) / len(lime2)
    print(f"annotate_ratio={lime_wps / spacy_wps:.3f} lime_wps={lime_wps:.0f} spacy_wps={spacy_wps:.0f} "
          f"workers2_speedup={w2 / lime_wps:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
