"""SeqIO task and mixture registrations; importing this package registers them.

Imports seqio/TensorFlow: never import it on the training path (training reads the cache through
the Grain loader). Default registrations need a corpus cache: the directory named by
`$LIME_JAX_CACHE_DIR` (default `data/cache` under the working directory) holding
`sotu_train/` (and optionally `sotu_heldout/`, the "validation" split), each written by
`lime-jax annotate`. Without it nothing is registered by default; call
`register_corpus_tasks(cache_dir, name_prefix)` / `register_synthetic_tasks(cache_dir)` /
`register_mixtures()` yourself.

Registered by default: `sotu_lime`, `sotu_lime_plus1`, `addition`, `addition_lime_plus1`,
`reasoning`, `reasoning_lime_plus1`, `sotu_and_addition_lime`, `sotu_and_addition_lime_plus1`.
Build batches with `feature_converter(name)`, which applies the task's LIME shift.
"""
from __future__ import annotations

import os

from tasks.corpus import (TASK_SHIFTS, feature_converter, read_cache_dataset,
                          register_corpus_tasks)
from tasks.synthetic import register_mixtures, register_synthetic_tasks
from tasks.vocabularies import TagVocabulary

DEFAULT_CACHE_ROOT = os.environ.get("LIME_JAX_CACHE_DIR", os.path.join("data", "cache"))


def register_defaults(cache_root: str = DEFAULT_CACHE_ROOT) -> list[str]:
    """Registers the default tasks if `cache_root/sotu_train` holds a cache; returns names."""
    train = os.path.join(cache_root, "sotu_train")
    if not os.path.isfile(os.path.join(train, "manifest.json")):
        return []
    dirs = {"train": train}
    heldout = os.path.join(cache_root, "sotu_heldout")
    if os.path.isfile(os.path.join(heldout, "manifest.json")):
        dirs["validation"] = heldout
    names = register_corpus_tasks(dirs, name_prefix="sotu")
    names += register_synthetic_tasks(train)
    names += register_mixtures("sotu")
    return names


DEFAULT_TASKS = register_defaults()

__all__ = ["DEFAULT_TASKS", "TASK_SHIFTS", "TagVocabulary", "feature_converter",
           "read_cache_dataset", "register_corpus_tasks", "register_defaults",
           "register_mixtures", "register_synthetic_tasks"]
