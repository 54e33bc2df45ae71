"""Annotation on this machine: a corpus -> the ArrayRecord cache of aligned features.

The corpus is cut into shards of a fixed number of input documents. Each finished shard is
written atomically and recorded in `progress.json`, so an interrupted run resumes at the first
missing shard without duplicating or losing documents; re-running a finished cache with the
same inputs and settings is a no-op. Annotation runs in `workers` processes forked from a
parent that loaded spaCy and SentencePiece once.
"""
from __future__ import annotations

import os

# One BLAS thread per process (set before numpy loads): annotation scales over processes.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import json  # noqa: E402
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402

from lime_jax.annotation import inputs as inputs_lib  # noqa: E402
from lime_jax.annotation import manifest as manifest_lib  # noqa: E402
from lime_jax.annotation import worker  # noqa: E402
from lime_jax.annotation.pipeline import Stats  # noqa: E402
from lime_jax.annotation.worker import ProcessorSpec  # noqa: E402
from lime_jax.data import cache as cache_lib  # noqa: E402
from lime_jax.hashing import sha256_file  # noqa: E402
from lime_jax.progress import Progress  # noqa: E402

PROGRESS_NAME = "progress.json"


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _load_progress(out: str, settings: dict, overwrite: bool) -> dict[int, dict]:
    """Finished shards from an earlier run with the same settings, checked against their files."""
    path = os.path.join(out, PROGRESS_NAME)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        progress = json.load(f)
    if progress.get("settings") != settings:
        if not overwrite:
            raise ValueError(f"{out} holds a partial cache built from other inputs or settings; "
                             "choose another --out or pass --overwrite")
        return {}
    done = {}
    for key, entry in progress.get("shards", {}).items():
        shard_path = os.path.join(out, entry["shard"]["path"])
        if os.path.exists(shard_path) and sha256_file(shard_path) == entry["shard"]["sha256"]:
            done[int(key)] = entry
    return done


def _run_task(task: tuple[int, list[str], list[str], str]) -> tuple[int, list, Stats, list[dict]]:
    """A pool task: (shard index, ids, texts, on_error) -> (shard index, *process_batch)."""
    shard_index, ids, texts, on_error = task
    return (shard_index, *worker.process_batch(ids, texts, on_error))


def annotate_corpus(inputs: Sequence[str], out: str, spec: ProcessorSpec, *, workers: int = 1,
                    docs_per_shard: int = manifest_lib.DOCS_PER_SHARD, max_docs: int | None = None,
                    utf8_errors: str = "strict", text_field: str = "text", on_error: str = "fail",
                    overwrite: bool = False) -> dict:
    """Annotates the documents of `inputs` (files, globs, bundled:<split>) into the cache `out`;
    returns its manifest. `text_field`: the JSONL field or Parquet/Arrow column of the text.
    `on_error`: "fail" on a document that cannot be read or processed, or "skip" it (listed in
    the manifest); `overwrite` replaces a cache built with other settings."""
    paths = inputs_lib.resolve_inputs(inputs, text_field)
    settings = manifest_lib.settings(paths, spec, docs_per_shard=docs_per_shard, max_docs=max_docs,
                                     utf8_errors=utf8_errors, text_field=text_field)
    finished = manifest_lib.finished_cache(out, settings, overwrite)
    if finished is not None:
        return finished
    if overwrite and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    done = _load_progress(out, settings, overwrite)
    if done:
        print(f"resuming: {len(done)} shards already written", file=sys.stderr)

    docs = inputs_lib.iter_input_documents(inputs, errors=utf8_errors, text_field=text_field,
                                           on_error=on_error)
    if max_docs is not None:
        docs = (d for i, d in zip(range(max_docs), docs))

    pending: dict[int, dict] = {}  # shard index -> {"features", "stats", "skipped", "left"}
    progress_entries = dict(done)
    run = Stats()  # documents and words of this run (not of resumed shards): the throughput
    progress = Progress(max_docs, "doc", desc="annotate", every_s=10)

    def tasks() -> Iterator[tuple[int, list[str], list[str], str]]:
        for shard_index, chunk in enumerate(worker.chunks(docs, docs_per_shard)):
            if shard_index in done:
                continue
            batches = list(worker.chunks(chunk, worker.TASK_DOCS))
            pending[shard_index] = {"features": [], "stats": Stats(), "skipped": [], "left": len(batches)}
            for batch in batches:
                yield shard_index, [d[0] for d in batch], [d[1] for d in batch], on_error

    def finish(shard_index: int, features, stats: Stats, skipped: list[dict]) -> None:
        entry = pending[shard_index]
        entry["features"].extend(f for f in features if f is not None)
        entry["stats"].add(stats)
        entry["skipped"] += skipped
        for s in skipped:
            print(f"annotate: skipped document {s['id']}: {s['error']}", file=sys.stderr, flush=True)
        entry["left"] -= 1
        run.add(stats)
        wps = run.words / max(time.time() - t0, 1e-9)
        progress.update(run.documents, {"words": str(run.words), "words_per_s": f"{wps:,.0f}"})
        if entry["left"] == 0:
            shard = cache_lib.write_shard(out, shard_index, entry["features"])
            progress_entries[shard_index] = {"shard": shard, "stats": vars(entry["stats"]),
                                             "skipped": entry["skipped"]}
            _write_json(os.path.join(out, PROGRESS_NAME),
                        {"settings": settings, "shards": {str(k): v for k, v in progress_entries.items()}})
            del pending[shard_index]

    # The parent loads spaCy and SentencePiece once; forked workers share them copy-on-write.
    processor = worker.init(spec)
    t0 = time.time()
    if workers <= 1:
        for task in tasks():
            finish(*_run_task(task))
    else:
        if "fork" in multiprocessing.get_all_start_methods():
            pool = multiprocessing.get_context("fork").Pool(workers)
        else:  # no fork (Windows): each worker loads its own copy
            pool = multiprocessing.get_context("spawn").Pool(workers, worker.init, (spec,))
        with pool:
            for result in pool.imap(_run_task, tasks(), chunksize=1):
                finish(*result)
    progress.close()
    seconds = time.time() - t0
    if not progress_entries:
        raise manifest_lib.empty_input_error(paths)

    totals = Stats()
    for entry in progress_entries.values():
        totals.add(Stats(**entry["stats"]))
    order = sorted(progress_entries)
    manifest = manifest_lib.write_cache(
        out, processor=processor, spec=spec, settings=settings,
        shards=[progress_entries[k]["shard"] for k in order], totals=totals,
        throughput={"seconds": round(seconds, 3), "workers": workers,
                    "words_per_second": round(run.words / max(seconds, 1e-9), 1)},
        skipped=[s for k in order for s in progress_entries[k].get("skipped", [])])
    os.remove(os.path.join(out, PROGRESS_NAME))
    return manifest
