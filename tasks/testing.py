"""Tiny caches and SeqIO registrations for tests (cf. seqio's test_utils); no spaCy needed.

    made = make_tiny_tasks(str(tmp_path), spm_model)  # spm_model: a SentencePiece .model file
    made.mixtures[0]  # "tiny_mix_lime": registered, usable as MIXTURE_OR_TASK_NAME
    it = seqio_source.seqio_batches(made.mixtures[0], split="train", ...)

Documents are random ids (EOS last, tags EOS there) over the real file layout of a cache
written by `lime-jax annotate`: shards, manifest, a copy of the SentencePiece model, tag
vocabulary files.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping

import numpy as np
import seqio

from lime_jax.annotation import vocab as vocab_lib
from lime_jax.annotation.vocab import TagVocab
from lime_jax.data import cache
from lime_jax.ids import EOS_ID, EOS_TAG_ID, NONE_ID
from tasks.corpus import SHIFTS, TASK_SHIFTS, register_corpus_tasks

POS = vocab_lib.pos_vocab([f"P{i}" for i in range(50)])
NER = vocab_lib.ner_vocab()
FIRST_TOKEN_ID = 3  # after PAD, EOS and UNK


def _no_eos(tags: np.ndarray) -> np.ndarray:
    """Ids drawn from [NONE, size - 1) -> NONE or a label: the EOS tag only ends a document."""
    return tags + (tags >= EOS_TAG_ID)


def random_documents(num_docs: int, vocab_size: int, seed: int, max_len: int = 45,
                     pos: TagVocab = POS, ner: TagVocab = NER) -> list[np.ndarray]:
    """`num_docs` int32 [3, L] documents (targets, pos, ner), 2 <= L < max_len, EOS last."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(2, max_len))
        doc = np.stack([rng.integers(FIRST_TOKEN_ID, vocab_size, n),
                        _no_eos(rng.integers(NONE_ID, pos.size - 1, n)),
                        _no_eos(rng.integers(NONE_ID, ner.size - 1, n))])
        doc[0, -1], doc[1:, -1] = EOS_ID, EOS_TAG_ID
        docs.append(doc.astype(np.int32))
    return docs


def write_cache_dir(cache_dir: str, docs: list[np.ndarray], spm_model: str,
                    pos: TagVocab = POS, ner: TagVocab = NER, extra: Mapping | None = None,
                    docs_per_shard: int = 7) -> dict:
    """Writes `docs` as a cache whose manifest names its own copy of `spm_model` and its tag
    vocabulary files; returns the manifest."""
    os.makedirs(cache_dir, exist_ok=True)
    shutil.copyfile(spm_model, os.path.join(cache_dir, "spm.model"))
    pos.save(os.path.join(cache_dir, "vocab_pos.json"))
    ner.save(os.path.join(cache_dir, "vocab_ner.json"))
    sizes = {"targets": seqio.SentencePieceVocabulary(spm_model).vocab_size,
             "targets_pos": pos.size, "targets_ner": ner.size}
    return cache.write_cache(cache_dir, docs, sizes, docs_per_shard=docs_per_shard, extra={
        "spm_model": "spm.model", "tokenization": "lime", **(extra or {}),
        "vocab_files": {"targets_pos": "vocab_pos.json", "targets_ner": "vocab_ner.json"}})


@dataclasses.dataclass(frozen=True)
class TinyTasks:
    cache_dirs: dict[str, str]  # part ("a", "b") -> cache directory
    docs: dict[str, list[np.ndarray]]  # part -> its documents, in cache order
    tasks: list[str]  # `<name>_<part>_lime`, `<name>_<part>_lime_plus1`
    mixtures: list[str]  # `<name>_mix_lime`, `<name>_mix_lime_plus1`: both parts, rates 2:1


def make_tiny_tasks(root: str, spm_model: str, name: str = "tiny", num_docs: int = 30,
                    seed: int = 0) -> TinyTasks:
    """Two tiny caches under `root`, a corpus task pair over each and a mixture of both per
    shift, all registered (TASK_SHIFTS included); re-registering a name replaces it."""
    vocab_size = seqio.SentencePieceVocabulary(spm_model).vocab_size
    dirs, docs, names = {}, {}, []
    for k, part in enumerate(("a", "b")):
        dirs[part] = os.path.join(root, f"{name}_{part}")
        docs[part] = random_documents(num_docs, vocab_size, seed=seed + k)
        write_cache_dir(dirs[part], docs[part], spm_model)
        names += register_corpus_tasks(dirs[part], name_prefix=f"{name}_{part}")
    mixtures = []
    for suffix, shift in SHIFTS.items():
        mixture = f"{name}_mix_{suffix}"
        seqio.MixtureRegistry.remove(mixture)
        seqio.MixtureRegistry.add(mixture, [(f"{name}_a_{suffix}", 2.0),
                                            (f"{name}_b_{suffix}", 1.0)])
        TASK_SHIFTS[mixture] = shift
        mixtures.append(mixture)
    return TinyTasks(dirs, docs, names, mixtures)
