"""Agreement of the causal tagger with the cache's (spaCy, whole-document) oracle tags.

Counted over every piece of every document, EOS excluded (its EOS tag is fixed by the cache
format, not predicted). With a `subword_index` row the pieces are also split by their place in
the word. Before a word's last piece the tagger has not seen the rest of the word ("▁g u est s"
is NNS, which only the final "s" tells), nor the words after it, which spaCy used: that is the
honest ceiling of a causal tagger. `word_last_piece` scores each word once, where the tagger has
read all of it: the agreement of a word-level tagger with left context only.
"""
from __future__ import annotations

import os
import time

import numpy as np

from lime_jax.data import cache as cache_lib
from lime_jax.tagger.model import TAGS
from lime_jax.tagger.train import read_cache

# subword_index (this piece, next piece) -> in the group; 1 = no word, 2 = a word's first piece.
_PLACES = {"no_word": lambda s, n: s == 1, "first_piece": lambda s, n: s == 2,
           "later_piece": lambda s, n: s > 2, "word_last_piece": lambda s, n: (s >= 2) & (n <= 2)}


def load_documents(cache_dir: str, max_docs: int | None = None) -> tuple[dict, dict, list[np.ndarray]]:
    """(manifest, tag vocabularies, documents as int32 [F, L]) of a cache, in shard order."""
    manifest, vocabs = read_cache(cache_dir)  # verified, with the hashes
    docs, _ = cache_lib.read_documents(cache_dir, max_docs, check_hashes=False)
    return manifest, vocabs, docs


def score(features: list[str], docs: list[np.ndarray], tags: list[np.ndarray]) -> dict:
    """Agreement of `tags` ([2, L] each, rows as TAGS) with the documents' tag rows."""
    rows = [features.index(f"targets_{t}") for t in TAGS]
    oracle_2xN = np.concatenate([d[rows, :-1] for d in docs], axis=1)
    pred_2xN = np.concatenate([t[:, :-1] for t in tags], axis=1)
    hit_2xN = oracle_2xN == pred_2xN
    n = hit_2xN.shape[1]
    out = {"pieces": n, **{f"{t}_agreement": float(hit_2xN[i].mean()) if n else 0.0 for i, t in enumerate(TAGS)}}
    if "subword_index" in features:
        row = features.index("subword_index")
        sub_N = np.concatenate([d[row, :-1] for d in docs])
        next_N = np.concatenate([d[row, 1:] for d in docs])  # the last piece's next is EOS (1)
        for place, select in _PLACES.items():
            m = select(sub_N, next_N)
            out[place] = {"pieces": int(m.sum()),
                          **{f"{t}_agreement": float(hit_2xN[i, m].mean()) if m.any() else 0.0
                             for i, t in enumerate(TAGS)}}
    return out


def evaluate(tagger, cache_dir: str, max_docs: int | None = None) -> dict:
    """Tags a cache's documents with `tagger` (a CausalTagger) and scores them against the cache.

    Raises TaggerDirError when the cache's SentencePiece model or vocabularies are not the
    tagger's.
    """
    manifest, vocabs, docs = load_documents(cache_dir, max_docs)
    tagger.check_spm(os.path.join(cache_dir, manifest["spm_model"]))
    tagger.check_vocabs(vocabs)
    t0 = time.time()
    tags = tagger.tag([d[0] for d in docs])
    seconds = time.time() - t0
    out = {"documents": len(docs), "tokenization": manifest["tokenization"],
           "tagger_tokenization": tagger.meta["tokenization"], "tag_seconds": round(seconds, 3)}
    return {**out, **score(manifest["features"], docs, tags)}
