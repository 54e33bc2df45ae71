"""The annotation worker, shared by the local and the Beam runner.

A process loads spaCy and SentencePiece once (`init`), then annotates, tokenizes and aligns
batches of documents (`process_batch`). The processor is a process global because both
runners call into it from places that only take picklable arguments: a multiprocessing pool
task, a Beam `DoFn`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from lime_jax import corpus
from lime_jax.annotation import annotator as annotator_lib
from lime_jax.annotation.pipeline import DocumentProcessor, Stats

# Documents per call of `process_batch`: big enough to amortise inter-process traffic, small
# enough to keep every worker busy until the end of a shard.
TASK_DOCS = 32

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ProcessorSpec:
    """What a worker loads: picklable, so it travels to spawned processes and Beam workers."""

    spm: str  # SentencePiece model path
    tokenization: str = "lime"
    ner_scheme: str = "bio"
    spacy_model: str = annotator_lib.DEFAULT_SPACY_MODEL
    use_blis: bool = False

    def load(self) -> DocumentProcessor:
        annotator = annotator_lib.SpacyAnnotator(self.spacy_model, ner_scheme=self.ner_scheme,
                                                 use_blis=self.use_blis)
        return DocumentProcessor(annotator, self.spm, self.tokenization)


_PROCESSOR: DocumentProcessor | None = None


def init(spec: ProcessorSpec) -> DocumentProcessor:
    """Loads this process's processor (the pool initialiser, `DoFn.setup`); returns it."""
    global _PROCESSOR
    _PROCESSOR = spec.load()
    return _PROCESSOR


def process_batch(ids: Sequence[str], texts: Sequence[str | corpus.RecordError],
                  on_error: str) -> tuple[list, Stats, list[dict]]:
    """(features per document, None where empty or skipped; stats; skipped documents).

    A batch that fails, or holds a record the reader could not read (a corpus.RecordError in
    place of its text), is run one document at a time to find the document(s) at fault:
    `on_error="fail"` raises naming it, `"skip"` lists it (id and error) and counts it.
    """
    if _PROCESSOR is None:
        raise RuntimeError("annotation worker used before worker.init(spec)")
    if not any(isinstance(t, corpus.RecordError) for t in texts):
        try:
            features, stats = _PROCESSOR.process(texts)
            return features, stats, []
        except Exception:  # find the document(s) at fault below
            pass
    features, stats, skipped = [], Stats(), []
    for doc_id, text in zip(ids, texts):
        try:
            if isinstance(text, corpus.RecordError):
                raise text
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
    return features, stats, skipped


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last one shorter)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
