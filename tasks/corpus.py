"""SeqIO tasks over lime_jax caches (ArrayRecord shards written by `lime-jax annotate`).

`register_corpus_tasks(cache_dir, name_prefix)` registers `<prefix>_lime` and
`<prefix>_lime_plus1`. Both yield the same unshifted features as the cache (`targets`,
`targets_pos`, `targets_ner`, EOS last); the LIME / LIME+1 difference is the metadata shift,
applied when batches are built: `feature_converter(task_name)` returns the
`LimeLMFeatureConverter` with the task's shift (`TASK_SHIFTS`).
"""
from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from lime_jax.data import cache
from lime_jax.data.seqio_features import LimeLMFeatureConverter, split_examples
from lime_jax.annotation.pipeline import eos_column
from lime_jax.annotation.vocab import TagVocab
from tasks.vocabularies import TagVocabulary

# Registered task or mixture name -> the LIME shift its batches use (0 LIME, +1 LIME+1).
TASK_SHIFTS: dict[str, int] = {}
SHIFTS = {"lime": 0, "lime_plus1": 1}


# sha256 of a SentencePiece model file -> the vocabulary object every task over it shares.
_SPM_VOCABULARIES: dict[str, seqio.SentencePieceVocabulary] = {}


def sentencepiece_vocabulary(path: str) -> seqio.SentencePieceVocabulary:
    """One vocabulary object per model content. SeqIO compares SentencePiece vocabularies by
    file path, and a mixture needs equal ones: tasks over caches holding copies of one model
    share the first copy's object, so they mix."""
    digest = cache.sha256_file(path)
    vocab = _SPM_VOCABULARIES.get(digest)
    if vocab is None or not os.path.isfile(vocab.sentencepiece_model_file):
        vocab = _SPM_VOCABULARIES[digest] = seqio.SentencePieceVocabulary(path)
    return vocab


def output_features(cache_dir: str) -> dict[str, seqio.Feature]:
    """SentencePiece `targets` plus one TagVocabulary feature per tag, from the cache's files."""
    manifest = cache.load_manifest(cache_dir)
    mpath = os.path.join(cache_dir, cache.MANIFEST_NAME)
    spm_path = os.path.join(cache_dir, manifest.get("spm_model", "spm.model"))
    if not os.path.isfile(spm_path):
        raise cache.CacheError(f"{mpath}: field 'spm_model': {spm_path} does not exist")
    features = {"targets": seqio.Feature(sentencepiece_vocabulary(spm_path), add_eos=True,
                                         dtype=tf.int32)}
    vocab_files = manifest.get("vocab_files", {})
    for name in (f for f in manifest["features"][1:] if f.startswith("targets_")):
        vpath = os.path.join(cache_dir, vocab_files.get(
            name, f"vocab_{name.removeprefix('targets_')}.json"))
        if not os.path.isfile(vpath):
            raise cache.CacheError(f"{mpath}: field 'vocab_files.{name}': {vpath} does not exist")
        features[name] = seqio.Feature(TagVocabulary(TagVocab.load(vpath)), add_eos=True,
                                       dtype=tf.int32)
    sizes = {k: f.vocabulary.vocab_size for k, f in features.items()}
    cache.check_vocab_sizes(cache_dir, manifest, sizes)
    return features


def vocabulary_digests(features: Mapping[str, seqio.Feature]) -> dict[str, str]:
    """`{feature: sha256}` of each vocabulary's content (SentencePiece model bytes, tag list),
    so two copies of one model compare equal wherever they are stored."""
    out = {}
    for name, feature in features.items():
        vocab = feature.vocabulary
        if isinstance(vocab, seqio.SentencePieceVocabulary):
            content = b"spm:%d:" % vocab.extra_ids + vocab.sp_model
        elif isinstance(vocab, TagVocabulary):
            content = ("tags:" + "\n".join(vocab.tag_vocab.tokens)).encode()
        else:
            raise TypeError(f"feature {name!r}: no content digest for {type(vocab).__name__}")
        out[name] = hashlib.sha256(content).hexdigest()
    return out


def vocabulary_mismatch(a: Mapping[str, seqio.Feature], b: Mapping[str, seqio.Feature]
                        ) -> str | None:
    """Why two caches' features cannot serve one task (None when their vocabularies agree)."""
    if set(a) != set(b):
        return f"features {sorted(b)}, not {sorted(a)}"
    da, db = vocabulary_digests(a), vocabulary_digests(b)
    differ = [k for k in a if da[k] != db[k]]
    return f"vocabularies of other content for {differ}" if differ else None


def strip_eos(doc_FxL: np.ndarray, features: Sequence[str], where: str) -> np.ndarray:
    """The cache stores EOS last (`pipeline.eos_column` of its `features`); SeqIO's `append_eos`
    puts it back."""
    want = eos_column(features)
    if doc_FxL.shape[1] < 1 or (doc_FxL[:, -1] != want).any():
        raise cache.CacheError(f"{where}: last position is not EOS ({dict(zip(features, want.tolist()))}): "
                               f"{doc_FxL[:, -1].tolist()}")
    return doc_FxL[:, :-1]


def read_cache_dataset(cache_dir: str, shuffle_files: bool = False, seed: int | None = None,
                       check_hashes: bool = False) -> tf.data.Dataset:
    """The cache's documents as a tf.data.Dataset of {feature: int32 [L]} (EOS stripped).

    Checks the manifest and each shard's size and record count; `check_hashes` also hashes every
    shard (`lime-jax verify-cache` does, once, rather than every process at every start)."""
    manifest = cache.verify_cache(cache_dir, check_hashes=check_hashes)
    all_names = manifest["features"]
    # Tag features only: bookkeeping features such as `subword_index` are for evaluation.
    rows = [i for i, f in enumerate(all_names) if i == 0 or f.startswith("targets_")]
    names = [all_names[i] for i in rows]
    paths = cache.shard_paths(cache_dir, manifest)
    if shuffle_files:
        random.Random(seed).shuffle(paths)

    def generate():
        for path in paths:
            reader = cache.open_reader(path, "")
            try:
                records = reader.read_all()
            finally:
                reader.close()
            for j, rec in enumerate(records):
                doc = strip_eos(cache.read_document(rec, len(all_names), f"{path}: record {j}")[rows],
                                names, f"{path}: record {j}")
                yield dict(zip(names, doc))

    return tf.data.Dataset.from_generator(
        generate, output_signature={k: tf.TensorSpec([None], tf.int32) for k in names})


def split_to_sequence_length(dataset: tf.data.Dataset, sequence_length, output_features):
    """Splits documents longer than the targets length into pieces (all features in lockstep),
    so SeqIO's trimming keeps every token, as the Grain loader does."""
    if not sequence_length or sequence_length.get("targets") is None:
        return dataset
    return split_examples(dataset, sequence_length["targets"], list(output_features))


def _dirs(cache_dir: str | Mapping[str, str]) -> dict[str, str]:
    return {"train": cache_dir} if isinstance(cache_dir, str) else dict(cache_dir)


def register_corpus_tasks(cache_dir: str | Mapping[str, str], name_prefix: str = "sotu",
                          overwrite: bool = True) -> list[str]:
    """Registers `<prefix>_lime` and `<prefix>_lime_plus1` over cache directories.

    `cache_dir`: one directory (split "train") or `{split: directory}`. All splits must share
    vocabularies. Returns the registered names.
    """
    dirs = _dirs(cache_dir)
    features = None
    num_examples = {}
    for split, d in dirs.items():
        f = output_features(d)
        problem = None if features is None else vocabulary_mismatch(features, f)
        if problem:
            raise cache.CacheError(f"{d}: split {split!r} cannot share a task with "
                                   f"{next(iter(dirs.values()))}: {problem}")
        features = features or f
        num_examples[split] = sum(s["num_records"] for s in cache.load_manifest(d)["shards"])

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        if split not in dirs:
            raise ValueError(f"split {split!r} not among {sorted(dirs)}")
        return read_cache_dataset(dirs[split], shuffle_files, seed)

    names = []
    for suffix, shift in SHIFTS.items():
        name = f"{name_prefix}_{suffix}"
        if overwrite:
            seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(dataset_fn, splits=list(dirs),
                                            num_input_examples=num_examples),
            preprocessors=[seqio.preprocessors.append_eos, split_to_sequence_length],
            output_features=features,
        )
        TASK_SHIFTS[name] = shift
        names.append(name)
    return names


def feature_converter(task_name: str, pack: bool = True, tags=None) -> LimeLMFeatureConverter:
    """The feature converter with the shift registered for `task_name` (task or mixture)."""
    if task_name not in TASK_SHIFTS:
        raise KeyError(f"{task_name!r} has no registered LIME shift; known: {sorted(TASK_SHIFTS)}")
    provider = seqio.get_mixture_or_task(task_name)
    if tags is None:
        tags = [k.removeprefix("targets_") for k in provider.output_features if k != "targets"]
    return LimeLMFeatureConverter(tags=tags, shift=TASK_SHIFTS[task_name], pack=pack)
