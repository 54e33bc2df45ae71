"""Re-tagging a cache with an honest tag source: the same pieces in the same order, other tags.

    lime-jax annotate --from-cache work/cache/heldout --tags prefix --out work/cache/heldout_prefix
    lime-jax annotate --from-cache work/cache/train --tags tagger:work/tagger --out work/cache/train_tagger

Every arm of a comparison then reads one token stream (identical batches for a seed), and only
the tag rows differ: `oracle` (the annotation cache: spaCy over the whole document), `prefix`
(spaCy over the text up to and including each piece) or `tagger:DIR` (the causal tagger).
`subword_index` and EOS (tag EOS) are kept. With `window`, documents are tagged in consecutive
windows of that many pieces and tags see only their own window (the prefix source's cost is
quadratic in the window). The manifest names the source (`tag_source`) and the cache it came
from, and a re-run with the same settings is a no-op.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
from collections.abc import Iterator, Sequence

import numpy as np

from lime_jax.annotation import manifest as manifest_lib
from lime_jax.annotation import tag_sources, worker
from lime_jax.annotation.annotator import DEFAULT_SPACY_MODEL
from lime_jax.annotation.tag_sources import TAG_ROWS, TagFn, TagSource
from lime_jax.data import cache as cache_lib
from lime_jax.hashing import sha256_file
from lime_jax.progress import Progress

# Windows per tagging call: prefix tagging sends every prefix of each window through one nlp.pipe.
BATCH_WINDOWS = 16

_TAG_FN: TagFn | None = None


def _init_prefix_worker(spec: worker.ProcessorSpec, max_pieces: int) -> None:
    global _TAG_FN
    processor = spec.load()
    _TAG_FN = tag_sources.tag_function(tag_sources.PREFIX, processor.tokenizer, processor.annotator,
                                       max_pieces=max_pieces)


def _tag_in_worker(windows: list[np.ndarray]) -> list[np.ndarray]:
    return _TAG_FN(windows)


def _windows(doc_FxL: np.ndarray, window: int | None) -> list[tuple[int, int]]:
    n = doc_FxL.shape[1] - 1  # EOS keeps its EOS tags
    size = window or max(n, 1)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _batches(docs: Sequence[np.ndarray], window: int | None) -> Iterator[list[tuple[int, int, int]]]:
    batch = []
    for d, doc in enumerate(docs):
        for start, end in _windows(doc, window):
            batch.append((d, start, end))
            if len(batch) == BATCH_WINDOWS:
                yield batch
                batch = []
    if batch:
        yield batch


def _settings(src_manifest: dict, source: TagSource, window: int | None, max_docs: int | None,
              tagger_sha: str | None) -> dict:
    return {"retag": {"from_manifest_shards": [s["sha256"] for s in src_manifest["shards"]],
                      "tag_source": str(source) if source.kind != "tagger" else "tagger",
                      "tagger_json_sha256": tagger_sha, "window": window, "max_docs": max_docs}}


def retag_documents(docs: Sequence[np.ndarray], manifest: dict, tag_fn: TagFn, window: int | None,
                    source: TagSource, pool_map=map) -> list[np.ndarray]:
    """Copies of cache documents ([F, L], EOS last) with their tag rows from `tag_fn`, applied to
    consecutive windows of `window` pieces (None: whole documents). `pool_map` (e.g. a process
    pool's imap) maps `tag_fn` over batches of windows."""
    features = manifest["features"]
    rows = [features.index(f"targets_{t}") for t in TAG_ROWS]
    sizes = [manifest["vocab_sizes"][features[r]] for r in rows]
    out_docs = [doc.copy() for doc in docs]
    bar = Progress(len(docs), "doc", desc=f"tags ({source})", every_s=10.0)
    try:
        batches = list(_batches(docs, window))
        windows = [[docs[d][0, s:e] for d, s, e in b] for b in batches]
        done = 0
        for batch, tags in zip(batches, pool_map(tag_fn, windows)):
            for (d, start, end), tags_2xW in zip(batch, tags):
                for r, size, row in zip(rows, sizes, tags_2xW):
                    if row.min() < 1 or row.max() >= size:
                        raise ValueError(f"tag source {source} gave tag ids outside [1, {size}) for "
                                         f"{features[r]}: its vocabularies are not the cache's")
                    out_docs[d][r, start:end] = row
                done += end == docs[d].shape[1] - 1
            bar.update(done, {})
    finally:
        bar.close()
    return out_docs


def retag_cache(src: str, out: str, source: TagSource, *, tagger=None, window: int | None = None,
                max_docs: int | None = None, workers: int = 1,
                max_pieces: int = tag_sources.DEFAULT_MAX_PIECES, overwrite: bool = False) -> dict:
    """Writes to `out` the first `max_docs` documents of cache `src` with tags from `source`.

    `tagger`: the loaded causal tagger for a `tagger:DIR` source (annotation does not import
    jax); the caller checks its SentencePiece model and vocabularies against the cache's.
    `workers` processes run the spaCy of a `prefix` source. Returns the new manifest.
    """
    if source.kind == "oracle":
        raise ValueError(f"{src} already holds oracle tags (spaCy over whole documents); "
                         "re-tag with --tags prefix or --tags tagger:DIR")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 pieces, got {window}")
    docs, manifest = cache_lib.read_documents(src, max_docs)
    features = manifest["features"]
    missing = [t for t in TAG_ROWS if f"targets_{t}" not in features]
    if missing:
        raise ValueError(f"{src}: no tag feature(s) {['targets_' + t for t in missing]} to re-tag (features "
                         f"{features})")
    # A tagger is identified by its tagger.json (written last; names its config, step and spm).
    tagger_sha = sha256_file(os.path.join(tagger.directory, "tagger.json")) if tagger is not None else None
    settings = _settings(manifest, source, window, max_docs, tagger_sha)
    finished = manifest_lib.finished_cache(out, settings, overwrite)
    if finished is not None:
        return finished
    if source.kind == "tagger" and tagger is None:
        raise ValueError(f"tag source {source}: pass the loaded tagger")
    if source.kind == "prefix":
        longest = max((end - start for doc in docs for start, end in _windows(doc, window)), default=0)
        tag_sources.check_budget([range(longest)], max_pieces)  # before any work; says how to cut
        spacy = manifest.get("spacy", {})
        spec = worker.ProcessorSpec(os.path.join(src, manifest.get("spm_model", "spm.model")),
                                    manifest.get("tokenization", "lime"), spacy.get("ner_scheme", "bio"),
                                    spacy.get("model", DEFAULT_SPACY_MODEL))
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_prefix_worker, (spec, max_pieces))
            try:
                out_docs = retag_documents(docs, manifest, _tag_in_worker, window, source, pool_map=pool.imap)
            finally:
                pool.close()
                pool.join()
        else:
            _init_prefix_worker(spec, max_pieces)
            out_docs = retag_documents(docs, manifest, _TAG_FN, window, source)
    else:
        out_docs = retag_documents(docs, manifest, tagger.tag, window, source)

    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # a half-written or overwritten earlier run
        if name.startswith("shard-") or name == cache_lib.MANIFEST_NAME:
            os.remove(os.path.join(out, name))
    shards, start = [], 0
    for k, entry in enumerate(manifest["shards"]):
        part = out_docs[start:start + entry["num_records"]]
        if not part:
            break
        shards.append(cache_lib.write_shard(out, k, part))
        start += len(part)
    for name in [manifest.get("spm_model", "spm.model"), *manifest.get("vocab_files", {}).values()]:
        shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    new = {**manifest, "shards": shards, "settings": settings,
           "tag_source": str(source), "tag_source_honest": source.honest,
           "tag_window": window,
           "retagged_from": {"path": os.path.abspath(src),
                             "manifest_sha256": sha256_file(os.path.join(src, cache_lib.MANIFEST_NAME))},
           "counts": {"documents": len(out_docs), "records": len(out_docs),
                      "pieces": sum(d.shape[1] - 1 for d in out_docs)}}
    cache_lib.write_manifest(out, new)
    return new
