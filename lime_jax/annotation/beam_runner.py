"""Annotation as an Apache Beam pipeline (`lime-jax annotate --runner beam`).

    lime-jax annotate --runner beam --input 'corpus/*.jsonl.gz' --spm spm.model --out CACHE \
        --beam_options="--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing"

Stages: input files -> read documents (one task per file, in workers) -> group into shards of
`docs_per_shard` documents of one file -> `AnnotateShardFn` (spaCy + SentencePiece loaded once
per worker in `DoFn.setup`, then the same `lime_jax.annotation.worker` code as the local
runner) writes each shard with `lime_jax.data.cache.write_shard` into a staging directory ->
the driver numbers the shards, moves them into the cache and writes the same manifest, vocab
files and `spm.model` as the local runner (`lime_jax.annotation.manifest`). The cache holds
the same documents as a local run of the same inputs (shards are cut per input file, so their
order and sizes can differ).

Workers write with plain file I/O: `out` must be a directory every worker can see (local disk
for the DirectRunner; an NFS/Filestore or GCS FUSE mount on Dataflow, Flink or Spark workers).
"""
from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from lime_jax.annotation import inputs as inputs_lib
from lime_jax.annotation import manifest as manifest_lib
from lime_jax.annotation import worker
from lime_jax.annotation.pipeline import Stats
from lime_jax.annotation.worker import ProcessorSpec
from lime_jax.data import cache as cache_lib

STAGING_NAME = ".beam-staging"
RUNNER = "beam"


def _read_file(element: tuple[int, str], errors: str, text_field: str, on_error: str, docs_per_shard: int,
               max_docs: int | None) -> Iterator[tuple[tuple[int, int], tuple[int, str, str]]]:
    """(file index, path) -> ((file index, shard in file), (doc index, doc id, text)) per document."""
    file_index, path = element
    docs = inputs_lib.iter_input_documents([path], errors=errors, text_field=text_field, on_error=on_error)
    for i, (doc_id, text) in enumerate(docs):
        if max_docs is not None and i >= max_docs:
            return
        yield (file_index, i // docs_per_shard), (i, doc_id, text)


class AnnotateShardFn(beam.DoFn):
    """Annotates, tokenizes and aligns one shard's documents and writes its ArrayRecord file."""

    def __init__(self, spec: ProcessorSpec, staging_dir: str, on_error: str):
        self._spec = spec
        self._on_error = on_error
        self._staging_dir = staging_dir
        self._loads = Metrics.counter("lime_jax", "processor_loads")
        self._shards = Metrics.counter("lime_jax", "shards")

    def setup(self):
        # spaCy and SentencePiece load once per DoFn instance (per worker thread/process),
        # not per element: the same initialiser the local worker pool uses.
        worker.init(self._spec)
        self._fresh = True  # counted on first use: Beam drops metrics reported from setup()

    def process(self, element):
        if self._fresh:
            self._loads.inc()
            self._fresh = False
        (file_index, shard_in_file), docs = element
        features, stats, skipped = [], Stats(), []
        for batch in worker.chunks(sorted(docs), worker.TASK_DOCS):
            out, s, bad = worker.process_batch([d[1] for d in batch], [d[2] for d in batch], self._on_error)
            features.extend(f for f in out if f is not None)
            stats.add(s)
            skipped += bad
        shard_dir = os.path.join(self._staging_dir, f"{file_index:05d}-{shard_in_file:07d}")
        entry = cache_lib.write_shard(shard_dir, 0, features)
        self._shards.inc()
        yield json.dumps({"key": [file_index, shard_in_file], "dir": shard_dir, "shard": entry,
                          "stats": vars(stats), "skipped": skipped})


def build_pipeline(p: beam.Pipeline, paths: list[str], spec: ProcessorSpec, staging_dir: str, *,
                   docs_per_shard: int, max_docs: int | None, utf8_errors: str, text_field: str,
                   on_error: str) -> None:
    (p
     | "Files" >> beam.Create(list(enumerate(paths)))
     # Each file is read where it is processed; a reshuffle spreads its documents' shards.
     | "Read" >> beam.FlatMap(_read_file, utf8_errors, text_field, on_error, docs_per_shard, max_docs)
     | "Shards" >> beam.GroupByKey()
     | "Annotate" >> beam.ParDo(AnnotateShardFn(spec, staging_dir, on_error))
     | "Results" >> beam.io.WriteToText(os.path.join(staging_dir, "results"), file_name_suffix=".jsonl"))


def annotate_corpus(inputs: Sequence[str], out: str, spec: ProcessorSpec, *, beam_options: str = "",
                    docs_per_shard: int = manifest_lib.DOCS_PER_SHARD, max_docs: int | None = None,
                    utf8_errors: str = "strict", text_field: str = "text", on_error: str = "fail",
                    overwrite: bool = False) -> dict:
    """The Beam counterpart of `local_runner.annotate_corpus` (same arguments, same cache);
    `beam_options`: Beam pipeline options as one string (default: the DirectRunner)."""
    paths = inputs_lib.resolve_inputs(inputs, text_field)
    if max_docs is not None and len(paths) > 1:
        raise ValueError("--max-docs with --runner beam needs a single input file (files are read in "
                         "parallel, so 'the first N documents' of several files is not defined)")
    settings = manifest_lib.settings(paths, spec, docs_per_shard=docs_per_shard, max_docs=max_docs,
                                     utf8_errors=utf8_errors, text_field=text_field)
    settings["runner"] = RUNNER
    finished = manifest_lib.finished_cache(out, settings, overwrite)
    if finished is not None:
        return finished
    if os.path.isdir(out) and (overwrite or os.path.isdir(os.path.join(out, STAGING_NAME))):
        shutil.rmtree(out)  # Beam retries failed bundles itself; a new run starts clean
    staging = os.path.join(out, STAGING_NAME)
    os.makedirs(staging)

    options = PipelineOptions(shlex.split(beam_options))
    t0 = time.time()
    p = beam.Pipeline(options=options)
    build_pipeline(p, paths, spec, os.path.abspath(staging), docs_per_shard=docs_per_shard,
                   max_docs=max_docs, utf8_errors=utf8_errors, text_field=text_field, on_error=on_error)
    result = p.run()
    result.wait_until_finish()
    seconds = time.time() - t0
    counters = {c.key.metric.name: c.committed for c in
                result.metrics().query(beam.metrics.MetricsFilter().with_namespace("lime_jax"))["counters"]}

    results = []
    for path in sorted(glob.glob(os.path.join(staging, "results*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            results += [json.loads(line) for line in f if line.strip()]
    results.sort(key=lambda r: r["key"])
    if not results:
        raise manifest_lib.empty_input_error(paths)
    shards, totals = [], Stats()
    for k, r in enumerate(results):
        name = cache_lib.shard_name(k)
        os.replace(os.path.join(r["dir"], r["shard"]["path"]), os.path.join(out, name))
        shards.append(dict(r["shard"], path=name))
        totals.add(Stats(**r["stats"]))

    # The driver loads the processor once too, for the vocabularies it writes beside the cache.
    manifest = manifest_lib.write_cache(
        out, processor=spec.load(), spec=spec, settings=settings, shards=shards, totals=totals,
        throughput={"seconds": round(seconds, 3), "workers": RUNNER,
                    "words_per_second": round(totals.words / max(seconds, 1e-9), 1),
                    # processor_loads: DoFn set-ups, i.e. spaCy loads (one per worker).
                    "beam": {"runner": type(p.runner).__name__, **counters}},
        skipped=[s for r in results for s in r["skipped"]])
    shutil.rmtree(staging)
    print(f"beam: {len(shards)} shards, {totals.documents} documents in {seconds:.1f} s", file=sys.stderr)
    return manifest
