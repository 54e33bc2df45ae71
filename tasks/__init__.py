"""SeqIO task and mixture registrations; importing this package registers them.

Imports seqio/TensorFlow: training from a cache (the Grain loader) never imports it; a run that
names a task or mixture (`lime_jax.data.seqio_source`) needs it or the user's own registrations.

Default registrations need a corpus cache: the directory named by `$LIME_JAX_CACHE_DIR`
(default `data/cache` under the working directory) holding `sotu_train/` (and optionally
`sotu_heldout/`, the "validation" split), each written by `lime-jax annotate`. Without it
nothing is registered by default; call `register_corpus_tasks(cache_dir, name_prefix)` /
`register_synthetic_tasks(cache_dir)` / `register_mixtures()` yourself. A cache that is present
but unusable is skipped with a warning; importing never fails because of one.

Registered by default: `sotu_lime`, `sotu_lime_plus1`, `addition`, `addition_lime_plus1`,
`reasoning`, `reasoning_lime_plus1`, `sotu_and_addition_lime`, `sotu_and_addition_lime_plus1`.
Build batches with `feature_converter(name)`, which applies the task's LIME shift.
"""
from __future__ import annotations

import logging
import os

from tasks.corpus import (TASK_SHIFTS, feature_converter, output_features, read_cache_dataset,
                          register_corpus_tasks, vocabulary_mismatch)
from tasks.synthetic import register_mixtures, register_synthetic_tasks
from tasks.vocabularies import TagVocabulary

log = logging.getLogger("tasks")

DEFAULT_CACHE_ROOT = os.environ.get("LIME_JAX_CACHE_DIR", os.path.join("data", "cache"))
DEFAULT_SPLITS = {"train": "sotu_train", "validation": "sotu_heldout"}


def register_defaults(cache_root: str = DEFAULT_CACHE_ROOT) -> list[str]:
    """Registers the default tasks over the caches under `cache_root`; returns their names.

    Runs at import: a cache that is absent registers nothing, silently; one that is unusable
    (broken manifest, missing vocabulary, a held-out cache whose vocabularies differ in content
    from the training cache's) is skipped with a warning saying why, and the rest is registered.
    """
    features = {}
    for split, sub in DEFAULT_SPLITS.items():
        d = os.path.join(cache_root, sub)
        if not os.path.exists(d):
            continue
        try:
            features[split] = output_features(d)
        # Importing `tasks` must not fail over a cache on disk, whatever its damage.
        except Exception as e:  # noqa: BLE001
            log.warning("tasks: not registering split %r from %s: %s: %s", split, d,
                        type(e).__name__, e)
    if "train" not in features:
        if features:
            log.warning("tasks: %s holds no usable %s/; the default tasks are not registered",
                        cache_root, DEFAULT_SPLITS["train"])
        return []
    if "validation" in features:
        problem = vocabulary_mismatch(features["train"], features["validation"])
        if problem:
            log.warning("tasks: not registering split 'validation' from %s: it does not match "
                        "%s: %s", os.path.join(cache_root, DEFAULT_SPLITS["validation"]),
                        os.path.join(cache_root, DEFAULT_SPLITS["train"]), problem)
            del features["validation"]
    dirs = {split: os.path.join(cache_root, DEFAULT_SPLITS[split]) for split in features}
    names = register_corpus_tasks(dirs, name_prefix="sotu")
    names += register_synthetic_tasks(dirs["train"])
    names += register_mixtures("sotu")
    return names


DEFAULT_TASKS = register_defaults()

__all__ = ["DEFAULT_TASKS", "TASK_SHIFTS", "TagVocabulary", "feature_converter",
           "output_features", "read_cache_dataset", "register_corpus_tasks",
           "register_defaults", "register_mixtures", "register_synthetic_tasks",
           "vocabulary_mismatch"]
