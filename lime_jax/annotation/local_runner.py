"""`lime-jax annotate`: a corpus -> the ArrayRecord cache of aligned features.

The corpus is cut into shards of a fixed number of input documents. Each finished shard is
written atomically and recorded in `progress.json`, so an interrupted run resumes at the first
missing shard without duplicating or losing documents; re-running a finished cache with the
same inputs and settings is a no-op. Annotation runs in `--workers` processes forked from a
parent that loaded spaCy and SentencePiece once.
"""
from __future__ import annotations

import os

# One BLAS thread per process (set before numpy loads): annotation scales over processes.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402

from lime_jax import corpus  # noqa: E402
from lime_jax.data import cache as cache_lib  # noqa: E402
from lime_jax.annotation import annotator as annotate_lib  # noqa: E402
from lime_jax.annotation import inputs as inputs_lib  # noqa: E402
from lime_jax.annotation.pipeline import FEATURES, DocumentProcessor, Stats  # noqa: E402

PROGRESS_NAME = "progress.json"
SPM_NAME = "spm.model"
# Documents per worker task: big enough to amortise inter-process traffic, small enough to
# keep both workers busy until the end of a shard.
TASK_DOCS = 32


def _sha256(path: str) -> str:
    return cache_lib.sha256_file(path)


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


# --- worker side -----------------------------------------------------------------------------

_PROCESSOR: DocumentProcessor | None = None


def _init_worker(spacy_model: str, ner_scheme: str, use_blis: bool, spm_model: str, tokenization: str):
    global _PROCESSOR
    annotator = annotate_lib.SpacyAnnotator(spacy_model, ner_scheme=ner_scheme, use_blis=use_blis)
    _PROCESSOR = DocumentProcessor(annotator, spm_model, tokenization)


def _process_task(task: tuple[int, list[str], list[str], str]):
    shard_index, ids, texts, on_error = task
    try:
        features, stats = _PROCESSOR.process(texts)
        return shard_index, features, stats, []
    except Exception:  # find the document(s) at fault: process the batch one by one
        pass
    features, stats, skipped = [], Stats(), []
    for doc_id, text in zip(ids, texts):
        try:
            one, one_stats = _PROCESSOR.process([text])
        except Exception as e:
            if on_error == "fail":
                raise RuntimeError(f"document {doc_id} cannot be processed: {type(e).__name__}: {e} "
                                   "(pass --on-error skip to skip such documents; they are counted "
                                   "and listed in the manifest)") from e
            features.append(None)
            stats.documents += 1
            stats.skipped_documents += 1
            skipped.append({"id": doc_id, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        features += one
        stats.add(one_stats)
    return shard_index, features, stats, skipped


# --- driver ----------------------------------------------------------------------------------

class Progress:
    """A tqdm bar on an interactive terminal, a log line every few seconds otherwise."""

    def __init__(self, total_docs: int | None, desc: str):
        self.start = time.time()
        self.last_log = self.start
        self.docs = 0
        self.words = 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_docs, desc=desc, unit="doc", dynamic_ncols=True)

    def update(self, docs: int, words: int) -> None:
        self.docs += docs
        self.words += words
        wps = self.words / max(time.time() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix(words_per_s=f"{wps:,.0f}")
        elif time.time() - self.last_log > 10:
            self.last_log = time.time()
            print(f"annotate: {self.docs} documents, {self.words} words, {wps:,.0f} words/s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _chunks(docs: Iterator[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    chunk = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _settings(args, paths: Sequence[str]) -> dict:
    return {
        "inputs": [{"name": os.path.basename(p), "bytes": os.path.getsize(p), "sha256": _sha256(p)} for p in paths],
        "spm_sha256": _sha256(args.spm),
        "tokenization": args.tokenization,
        "ner_scheme": args.ner_scheme,
        "spacy_model": args.spacy_model,
        "docs_per_shard": args.docs_per_shard,
        "max_docs": args.max_docs,
        "utf8_errors": args.utf8_errors,
    }


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
        if os.path.exists(shard_path) and _sha256(shard_path) == entry["shard"]["sha256"]:
            done[int(key)] = entry
    return done


def finished_cache(out: str, settings: dict, overwrite: bool) -> dict | None:
    """The manifest of a verified cache in `out` built with `settings` (a re-run is a no-op);
    None if there is none. A cache built with other settings is an error unless `overwrite`."""
    if not os.path.exists(os.path.join(out, cache_lib.MANIFEST_NAME)):
        return None
    manifest = cache_lib.load_manifest(out)
    if manifest.get("settings") == settings:
        cache_lib.verify_cache(out)
        print(f"{out} is up to date ({manifest['counts']['documents']} documents); nothing to do")
        return manifest
    if not overwrite:
        raise ValueError(f"{out} holds a cache built from other inputs or settings; "
                         "choose another --out or pass --overwrite")
    return None


def annotate_corpus(args) -> dict:
    paths = inputs_lib.resolve_inputs(args.input)
    settings = _settings(args, paths)
    out = args.out
    finished = finished_cache(out, settings, args.overwrite)
    if finished is not None:
        return finished
    if args.overwrite and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    done = _load_progress(out, settings, args.overwrite)
    if done:
        print(f"resuming: {len(done)} shards already written", file=sys.stderr)

    worker_args = (args.spacy_model, args.ner_scheme, args.use_blis, args.spm, args.tokenization)
    docs = inputs_lib.iter_input_documents(args.input, errors=args.utf8_errors)
    if args.max_docs is not None:
        docs = (d for i, d in zip(range(args.max_docs), docs))

    pending: dict[int, dict] = {}  # shard index -> {"features", "stats", "skipped", "left"}
    progress_entries = dict(done)
    progress = Progress(args.max_docs, "annotate")

    def tasks() -> Iterator[tuple[int, list[str], list[str]]]:
        for shard_index, chunk in enumerate(_chunks(docs, args.docs_per_shard)):
            if shard_index in done:
                continue
            batches = list(_chunks(iter(chunk), TASK_DOCS))
            pending[shard_index] = {"features": [], "stats": Stats(), "skipped": [], "left": len(batches)}
            for batch in batches:
                yield shard_index, [d[0] for d in batch], [d[1] for d in batch], args.on_error

    def finish(shard_index: int, features, stats: Stats, skipped: list[dict]) -> None:
        entry = pending[shard_index]
        entry["features"].extend(f for f in features if f is not None)
        entry["stats"].add(stats)
        entry["skipped"] += skipped
        for s in skipped:
            print(f"annotate: skipped document {s['id']}: {s['error']}", file=sys.stderr, flush=True)
        entry["left"] -= 1
        progress.update(stats.documents, stats.words)
        if entry["left"] == 0:
            shard = cache_lib.write_shard(out, shard_index, entry["features"])
            progress_entries[shard_index] = {"shard": shard, "stats": vars(entry["stats"]),
                                             "skipped": entry["skipped"]}
            _write_json(os.path.join(out, PROGRESS_NAME),
                        {"settings": settings, "shards": {str(k): v for k, v in progress_entries.items()}})
            del pending[shard_index]

    # The parent loads spaCy and SentencePiece once; forked workers share them copy-on-write.
    _init_worker(*worker_args)
    t0 = time.time()
    if args.workers <= 1:
        for task in tasks():
            finish(*_process_task(task))
    else:
        if "fork" in multiprocessing.get_all_start_methods():
            pool = multiprocessing.get_context("fork").Pool(args.workers)
        else:  # no fork (Windows): each worker loads its own copy
            pool = multiprocessing.get_context("spawn").Pool(args.workers, _init_worker, worker_args)
        with pool:
            for result in pool.imap(_process_task, tasks(), chunksize=1):
                finish(*result)
    progress.close()
    seconds = time.time() - t0
    if not progress_entries:
        raise empty_input_error(paths)

    annotator = _PROCESSOR.annotator
    processor_vocabs = _PROCESSOR.vocabularies
    for name, vocab in processor_vocabs.items():
        vocab.save(os.path.join(out, f"vocab_{name.removeprefix('targets_')}.json"))
    shutil.copyfile(args.spm, os.path.join(out, SPM_NAME))
    totals = Stats()
    for entry in progress_entries.values():
        totals.add(Stats(**entry["stats"]))
    manifest = {
        "format": cache_lib.FORMAT,
        "features": list(FEATURES),
        "shards": [progress_entries[k]["shard"] for k in sorted(progress_entries)],
        "vocab_sizes": _PROCESSOR.vocab_sizes,
        "vocab_files": {k: f"vocab_{k.removeprefix('targets_')}.json" for k in processor_vocabs},
        "spm_model": SPM_NAME,
        "spm_sha256": settings["spm_sha256"],
        "tokenization": args.tokenization,
        "spacy": {"model": args.spacy_model, "version": annotator.version, "ner_scheme": args.ner_scheme},
        "counts": {"documents": totals.documents, "empty_documents": totals.empty_documents,
                   "skipped_documents": totals.skipped_documents,
                   "records": sum(e["shard"]["num_records"] for e in progress_entries.values()),
                   "words": totals.words, "pieces": totals.pieces},
        "throughput": {"seconds": round(seconds, 3), "workers": args.workers,
                       "words_per_second": round(progress.words / max(seconds, 1e-9), 1)},
        "settings": settings,
        # Documents that could not be processed (only with --on-error skip), by input position.
        "skipped_documents": [s for k in sorted(progress_entries) for s in progress_entries[k].get("skipped", [])],
    }
    cache_lib.write_manifest(out, manifest)
    os.remove(os.path.join(out, PROGRESS_NAME))
    return manifest


def empty_input_error(paths: Sequence[str]) -> ValueError:
    """Inputs without a single document: no cache is written (local and Beam runs alike)."""
    return ValueError(f"no documents in {', '.join(paths)}: the input is empty")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lime-jax annotate", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="files or globs (.txt: a document per line; .jsonl: a 'text' field; "
                        "optionally .gz/.xz), or bundled:train / bundled:heldout")
    p.add_argument("--spm", required=True, help="SentencePiece model (lime-jax spm-train)")
    p.add_argument("--out", required=True, help="cache directory to write")
    p.add_argument("--workers", type=int, default=1, help="annotation processes")
    p.add_argument("--tokenization", choices=["lime", "plain"], default="lime")
    p.add_argument("--ner-scheme", choices=["bio", "types"], default="bio")
    p.add_argument("--spacy-model", default=annotate_lib.DEFAULT_SPACY_MODEL)
    p.add_argument("--use-blis", action="store_true",
                   help="use thinc's blis kernels (default: numpy's BLAS, faster on CPUs where blis "
                        "falls back to generic kernels; tags are identical)")
    p.add_argument("--docs-per-shard", type=int, default=2000)
    p.add_argument("--max-docs", type=int, default=None, help="annotate the first N documents only")
    p.add_argument("--utf8-errors", choices=["strict", "replace"], default="strict",
                   help="invalid UTF-8 in an input: fail naming file, line and byte (strict), "
                        "or substitute U+FFFD (replace)")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="a document that cannot be processed (e.g. a lone surrogate escape in JSONL): "
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
    args = build_parser().parse_args(argv)
    if args.workers < 1 or args.docs_per_shard < 1:
        print("lime-jax annotate: --workers and --docs-per-shard must be >= 1", file=sys.stderr)
        return 2
    try:
        if args.runner == "beam":
            from lime_jax.annotation import beam_runner as beam_annotate  # needs the optional apache-beam install

            manifest = beam_annotate.annotate_corpus(args)
        else:
            manifest = annotate_corpus(args)
    except (ValueError, OSError, RuntimeError) as e:
        hint = " (pass --utf8-errors replace to substitute U+FFFD)" if isinstance(e, corpus.Utf8Error) else ""
        print(f"lime-jax annotate: {e}{hint}", file=sys.stderr)
        return 1
    counts, tp = manifest["counts"], manifest["throughput"]
    print(json.dumps({"out": args.out, **counts, "words_per_second": tp["words_per_second"]}))
    return 0
