"""What both annotation runners write and check beside the shards: settings, manifest, files.

`settings` fingerprints a run (inputs by content, the SentencePiece model, every option that
changes the records); a cache whose manifest holds the same settings is finished, and a re-run
is a no-op. The manifest format is `lime_jax.data.cache`'s (docs/architecture.md).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence

from lime_jax.annotation.pipeline import FEATURES, DocumentProcessor, Stats
from lime_jax.annotation.worker import ProcessorSpec
from lime_jax.data import cache as cache_lib
from lime_jax.hashing import sha256_file

SPM_NAME = "spm.model"
# Input documents per shard (fewer in the last one of a run; of each file under Beam).
DOCS_PER_SHARD = 2000


def settings(paths: Sequence[str], spec: ProcessorSpec, *, docs_per_shard: int, max_docs: int | None,
             utf8_errors: str, text_field: str) -> dict:
    """The settings of a run over the resolved input `paths`."""
    return {
        "inputs": [{"name": os.path.basename(p), "bytes": os.path.getsize(p), "sha256": sha256_file(p)}
                   for p in paths],
        "spm_sha256": sha256_file(spec.spm),
        "tokenization": spec.tokenization,
        "ner_scheme": spec.ner_scheme,
        "spacy_model": spec.spacy_model,
        "docs_per_shard": docs_per_shard,
        "max_docs": max_docs,
        "utf8_errors": utf8_errors,
        # Only when not the default: caches built before --text-field existed stay up to date.
        **({"text_field": text_field} if text_field != "text" else {}),
    }


def finished_cache(out: str, settings: dict, overwrite: bool) -> dict | None:
    """The manifest of a verified cache in `out` built with `settings` (a re-run is a no-op);
    None if there is none. A cache built with other settings or in an older format is an error
    unless `overwrite`."""
    if not os.path.exists(os.path.join(out, cache_lib.MANIFEST_NAME)):
        return None
    try:
        manifest = cache_lib.load_manifest(out)
    except cache_lib.CacheFormatError:
        if overwrite:  # an old-format cache is replaced like one built with other settings
            return None
        raise
    if manifest.get("settings") == settings:
        cache_lib.verify_cache(out)
        print(f"{out} is up to date ({manifest['counts']['documents']} documents); nothing to do")
        return manifest
    if not overwrite:
        raise ValueError(f"{out} holds a cache built from other inputs or settings; "
                         "choose another --out or pass --overwrite")
    return None


def empty_input_error(paths: Sequence[str]) -> ValueError:
    """Inputs without a single document: no cache is written (local and Beam runs alike)."""
    return ValueError(f"no documents in {', '.join(paths)}: the input is empty")


def _vocab_file(feature: str) -> str:
    return f"vocab_{feature.removeprefix('targets_')}.json"


def write_cache(out: str, *, processor: DocumentProcessor, spec: ProcessorSpec, settings: dict,
                shards: list[dict], totals: Stats, throughput: Mapping,
                skipped: list[dict]) -> dict:
    """Writes the tag vocabularies, a copy of the SentencePiece model and, last (it marks the
    cache finished), the manifest over the `shards` already in `out`; returns the manifest.

    `skipped`: the documents that could not be processed (only with --on-error skip).
    """
    for name, vocab in processor.vocabularies.items():
        vocab.save(os.path.join(out, _vocab_file(name)))
    shutil.copyfile(spec.spm, os.path.join(out, SPM_NAME))
    manifest = {
        "format": cache_lib.FORMAT,
        "features": list(FEATURES),
        "shards": shards,
        "vocab_sizes": processor.vocab_sizes,
        "vocab_files": {k: _vocab_file(k) for k in processor.vocabularies},
        "spm_model": SPM_NAME,
        "spm_sha256": settings["spm_sha256"],
        "tokenization": spec.tokenization,
        # spaCy over whole documents: tags that see the text after each piece (annotation/tag_sources.py)
        "tag_source": "oracle",
        "spacy": {"model": spec.spacy_model, "version": processor.annotator.version,
                  "ner_scheme": spec.ner_scheme},
        "counts": {"documents": totals.documents, "empty_documents": totals.empty_documents,
                   "skipped_documents": totals.skipped_documents,
                   "records": sum(s["num_records"] for s in shards),
                   "words": totals.words, "pieces": totals.pieces},
        "throughput": dict(throughput),
        "settings": settings,
        "skipped_documents": skipped,
    }
    cache_lib.write_manifest(out, manifest)
    return manifest
