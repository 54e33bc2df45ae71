"""Held-out metrics, token cohesion, cloze, addition and reasoning of a run (`lime-jax eval`).

`evaluate` returns the results that `write_results` stores as `<model_dir>/eval_results.json`.
Tasks:
- `heldout`: perplexity and next-token accuracy on the run's held-out cache (`DataConfig.eval_cache_dir`
  or `--eval_cache_dir`), documents cut into `seq_len` pieces as in training, tags as the model
  was trained to see them. Cohesion: the same accuracy by the target piece's place inside its
  word (`subword_index`), per word length in pieces (1, 2, 3, 4, 5+).
- `lambada`: LAMBADA-style cloze items from the held-out documents: a noun that ends a sentence,
  after at least `--cloze-context` pieces of its document. A hit means greedy decoding gives every
  piece of the word (teacher forcing, all argmax-correct).
- `addition`: `Q: What is A + B?\\nA:` problems (lime_jax.data.synthetic, the tasks' test seed),
  exact match of greedy decoding, per digit count.
- `reasoning`: templated stories; accuracy of choosing the answer by summed log-likelihood.
Modes, by run: the baseline has one (`none`); LIME and the leakage control `reannotated`
(generated or scored text is re-annotated, as `lime-jax generate` does) and `unguided` (PAD,
tag id 0, which adds no metadata, everywhere); LIME+1 `unguided` (PAD where the model would see
the tags of answer tokens) and `guided` (oracle tags from annotating prompt + gold answer, as in
the paper). A run with tag heads that forecast its input tags (model/heads.py) adds `self`:
every tag, the prompt's too, is the model's own forecast (lime_jax.inference.self_tags), honest
for any shift. For held-out text and cloze items, tags come from annotating the whole document,
as in training (cloze: LIME+1's `guided` uses the word's own tags, `unguided` PAD on the
positions that predict it); held-out text also reports `modes` (`unguided`, `self`) and each tag head's
accuracy against the cache's tags (`heads`).

Tag source (`--tags`, lime_jax.annotation.tag_sources), for LIME and the previous-piece arm:
`oracle` (the default: the cache's tags, spaCy over whole documents, which see the text after
each piece), `prefix` (spaCy over the text up to and including each piece: what re-annotation
gives at generation time) or `tagger:DIR` (the causal tagger). With an honest source, held-out
tags are recomputed per `seq_len` window (the text the model sees; a cloze row spanning two
windows takes each piece's tags from its own window, still from text before it), reasoning tags
over prompt + answer, and addition tags over the prompt and every generated prefix. Without
`--tags`, held-out text and cloze use the eval cache's tags as they are (oracle, or the source a
re-tagged cache names). Each task names its source (`tag_source`, `tags_honest`); results with
honest tags go to `eval_results_<kind>.json`. A LIME+1 run sees the tags of the piece it
predicts, so no source is honest for it: its modes (`guided`, `unguided`) say where tags come from.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence

import numpy as np
from etils import epath

from lime_jax.annotation import tag_sources
from lime_jax.annotation.retag import retag_documents
from lime_jax.data import cache as cache_lib
from lime_jax.data import packing
from lime_jax.features import head_id
from lime_jax.ids import PAD_ID

TASKS = ("heldout", "lambada", "addition", "reasoning")
RESULTS_NAME = "eval_results.json"
LENGTH_BUCKETS = ("1", "2", "3", "4", "5+")
NOUN_TAGS = ("NN", "NNS", "NNP", "NNPS")
TEST_SEED = 2  # tasks/synthetic.py SPLITS["test"]


# ----------------------------------------------------------------------------- pure metrics


def word_places(subword_index_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per piece: its 1-based place in its word and the word's length in pieces (0, 0: no word).

    `subword_index` is 1 for pieces without a word, else 1 + place (docs/architecture.md).
    """
    si = np.asarray(subword_index_N, np.int64)
    place = np.where(si >= 2, si - 1, 0)
    n = len(place)
    # A word's run ends where the next piece does not continue it (place + 1).
    nxt = np.append(place[1:], 0)
    ends = (place > 0) & (nxt != place + 1)
    end_idx = np.where(ends, np.arange(n), n)
    run_end = np.minimum.accumulate(end_idx[::-1])[::-1] if n else end_idx
    length = np.where(place > 0, place[np.minimum(run_end, n - 1)] if n else place, 0)
    return place, length


def length_bucket(length: int) -> str:
    return str(length) if length < 5 else "5+"


def place_bucket(place: int) -> str:
    return str(place) if place < 5 else "5+"


class CohesionCounter:
    """Accumulates (word length bucket, place bucket) -> [tokens, correct]."""

    def __init__(self):
        self.counts: dict[tuple[str, str], list[int]] = {}

    def add(self, place_N: np.ndarray, length_N: np.ndarray, correct_N: np.ndarray, weight_N: np.ndarray) -> None:
        keep = (np.asarray(weight_N) > 0) & (np.asarray(place_N) > 0)
        for p, length, c in zip(np.asarray(place_N)[keep], np.asarray(length_N)[keep], np.asarray(correct_N)[keep]):
            entry = self.counts.setdefault((length_bucket(int(length)), place_bucket(int(p))), [0, 0])
            entry[0] += 1
            entry[1] += int(c)

    def result(self) -> dict:
        by_length: dict[str, dict] = {}
        by_place: dict[str, list[int]] = {}
        for (lb, pb), (n, c) in sorted(self.counts.items()):
            by_length.setdefault(lb, {})[pb] = {"n": n, "accuracy": c / n}
            agg = by_place.setdefault(pb, [0, 0])
            agg[0] += n
            agg[1] += c
        return {"by_word_length": by_length,
                "by_place": {pb: {"n": n, "accuracy": c / n} for pb, (n, c) in sorted(by_place.items())}}


def bucket_accuracy(hits: Sequence[bool], buckets: Sequence) -> dict:
    """`{"accuracy", "n", "by_bucket": {bucket: {"accuracy", "n"}}}`."""
    hits = np.asarray(hits, bool)
    out = {"accuracy": float(hits.mean()) if len(hits) else float("nan"), "n": int(len(hits)), "by_bucket": {}}
    for b in sorted(set(buckets), key=str):
        sel = np.asarray([x == b for x in buckets])
        out["by_bucket"][str(b)] = {"accuracy": float(hits[sel].mean()), "n": int(sel.sum())}
    return out


# ----------------------------------------------------------------------------- batches


class Scorer:
    """Jitted teacher-forced forward: per-position negative log-likelihood and argmax hits.

    The model is split once; its parameters stay where `model_dir.load` put them (sharded on the
    run's mesh). Each batch of `batch_rows` rows goes to the devices explicitly, where
    `LoadedModel.placement` says (split over the rules' batch axes where they divide it), runs
    under that mesh, and only the per-position results come back.
    """

    def __init__(self, loaded, batch_rows: int = 16):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        self.loaded, self.rows = loaded, batch_rows
        self.names = loaded.cfg.metadata_names
        self._placement = loaded.placement(batch_rows)
        graphdef, self._state = nnx.split(self._placement.model)

        def fwd(state, batch):
            model = nnx.merge(graphdef, state)
            logits_BxLxV, heads = model.forward(batch["tokens"], {n: batch[n] for n in self.names},
                                                segment_ids=batch["segments"], positions=batch["positions"])
            logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
            tgt_BxL = jnp.take_along_axis(logits_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
            return (logz_BxL - tgt_BxL, jnp.argmax(logits_BxLxV, axis=-1) == batch["targets"],
                    {h: jnp.argmax(v[..., 1:], axis=-1) + 1 for h, v in heads.items()})  # PAD: no tag

        self._fwd = jax.jit(fwd, out_shardings=self._placement.batch_sharding)

    def score(self, rows: Sequence[dict], length: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Rows (dicts of 1-D arrays `tokens`, `targets`, `segments`, `positions` and one per
        table, all of one length <= `length`, padded here) -> per row (nll [n], hits [n])."""
        for nll, hits, _ in self.score_with_heads(rows, length):
            yield nll, hits

    def score_with_heads(self, rows: Sequence[dict], length: int):
        """`score` plus, per row, {head id: hits [m]} of each tag head against the row's
        `head:<id>` targets (PAD targets excluded)."""
        import jax

        from lime_jax.inference.self_tags import head_hits

        keys = ("tokens", "targets", "segments", "positions", *self.names)
        for start in range(0, len(rows), self.rows):
            chunk = rows[start:start + self.rows]
            batch = {k: np.zeros((self.rows, length), np.int32) for k in keys}
            for r, row in enumerate(chunk):
                for k in keys:
                    batch[k][r, :len(row[k])] = row[k]
            with jax.set_mesh(self._placement.mesh):
                out = self._fwd(self._state, jax.device_put(batch, self._placement.batch_sharding))
            nll, hits, heads = jax.device_get(out)
            for r, row in enumerate(chunk):
                n = len(row["targets"])
                yield nll[r, :n], hits[r, :n], head_hits({h: v[r, :n] for h, v in heads.items()}, row)


def segment_row(piece_FxN: np.ndarray, tag_rows: Sequence[int], names: Sequence[str], shift: int) -> dict:
    """One document piece as a row in the batch contract (one segment, BOS input first)."""
    cols = packing.piece_columns(piece_FxN, list(tag_rows), shift)
    n = piece_FxN.shape[1]
    row = {"targets": cols[:, 0], "tokens": cols[:, 1], "segments": np.ones(n, np.int32),
           "positions": np.arange(n, dtype=np.int32)}
    for k, name in enumerate(names):
        row[name] = cols[:, 2 + k]
    return row


def _head_rows(loaded, manifest: dict) -> list[tuple[str, int, int]]:
    """(head id, feature row, ahead) of each tag head whose tags the eval cache holds."""
    features = manifest["features"]
    return [(head_id(n, a), features.index(f"targets_{n}"), a) for n, _, a, _ in loaded.cfg.tag_heads
            if f"targets_{n}" in features]


def _head_accuracy(hits: dict[str, list[np.ndarray]]) -> dict:
    out = {}
    for h, parts in sorted(hits.items()):
        allh = np.concatenate(parts) if parts else np.zeros(0, bool)
        out[h] = {"accuracy": float(allh.mean()) if len(allh) else float("nan"), "n": int(len(allh))}
    return out


def _rows_of(manifest: dict, names: Sequence[str]) -> tuple[list[int], int]:
    features = manifest["features"]
    missing = [n for n in names if f"targets_{n}" not in features]
    if missing:
        raise ValueError(f"the eval cache has no tag feature(s) {missing} (it has {features})")
    if "subword_index" not in features:
        raise ValueError(f"the eval cache has no subword_index feature (it has {features})")
    return [features.index(f"targets_{n}") for n in names], features.index("subword_index")


# ----------------------------------------------------------------------------- tasks


def eval_heldout(loaded, scorer: Scorer, docs: Sequence[np.ndarray], manifest: dict, inc=None,
                 target_docs: Sequence[np.ndarray] | None = None) -> dict:
    """Held-out loss, accuracy and cohesion with the tags of `docs`; each tag head's accuracy
    against the tags of `target_docs` (default `docs`; the cache's own, spaCy's); and, for a run with
    metadata, `modes`: `unguided` (PAD, no metadata anywhere) and, with tag heads that forecast its
    input tags, `self` (the model's own forecasts, `self_tags.score_self`, through `inc`)."""
    from lime_jax.inference import self_tags

    names, shift, seq_len = loaded.cfg.metadata_names, loaded.shift, loaded.run.seq_len
    tag_rows, si_row = _rows_of(manifest, names)
    head_rows = _head_rows(loaded, manifest)
    rows, places, lengths = [], [], []
    for doc, gold in zip(docs, target_docs or docs):
        place, length = word_places(doc[si_row])
        for start in range(0, doc.shape[1], seq_len):
            row = segment_row(doc[:, start:start + seq_len], tag_rows, names, shift)
            row.update({f"head:{hid}": packing.head_targets(gold[r, start:start + seq_len], a)
                        for hid, r, a in head_rows})
            rows.append(row)
            places.append(place[start:start + seq_len])
            lengths.append(length[start:start + seq_len])

    def summary(scored) -> dict:
        nll_sum, correct, total = 0.0, 0, 0
        cohesion, head_hits = CohesionCounter(), {}
        for (nll, hits, hh), place, length in zip(scored, places, lengths):
            nll_sum += float(nll.sum())
            correct += int(hits.sum())
            total += len(hits)
            cohesion.add(place, length, hits, np.ones(len(hits)))
            for h, v in hh.items():
                head_hits.setdefault(h, []).append(v)
        loss = nll_sum / max(total, 1)
        out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / max(total, 1),
               "cohesion": cohesion.result()}
        if head_hits:
            out["heads"] = _head_accuracy(head_hits)
        return out

    res = {"tokens": sum(len(r["targets"]) for r in rows), "documents": len(docs),
           **summary(scorer.score_with_heads(rows, seq_len))}
    if names:
        pad_rows = [{**r, **{n: np.full_like(r[n], PAD_ID) for n in names}} for r in rows]
        res["modes"] = {"unguided": summary(scorer.score_with_heads(pad_rows, seq_len))}
        if inc is not None and any(self_tags.forecast_heads(loaded.cfg, shift)):
            scored = self_tags.score_self(inc, shift, rows, seq_len, batch_rows=64)
            res["modes"]["self"] = summary((nll, hits, hh) for nll, hits, _, hh in scored)
    return res


def cloze_items(docs: Sequence[np.ndarray], manifest: dict, pos_vocab, seq_len: int, min_context: int,
                per_doc: int = 3, max_items: int = 300) -> list[tuple[int, int, int, int]]:
    """(doc, window start, word start, word length) of cloze items: a noun ending a sentence.

    The window [start, word end) holds at most `seq_len` pieces; items are taken from the end of
    each document backwards, at least `seq_len` pieces apart.
    """
    features = manifest["features"]
    pos_row, si_row = features.index("targets_pos"), features.index("subword_index")
    nouns = {pos_vocab.id(t) for t in NOUN_TAGS if t in pos_vocab.labels}
    period = pos_vocab.id(".")
    items = []
    for d, doc in enumerate(docs):
        place, length = word_places(doc[si_row])
        taken, last = 0, doc.shape[1] + seq_len
        for ws in np.nonzero(place == 1)[0][::-1]:
            wl = int(length[ws])
            we = ws + wl
            if (we >= doc.shape[1] or doc[pos_row, ws] not in nouns or doc[pos_row, we] != period
                    or ws < min_context or we > last - seq_len or wl >= seq_len):
                continue
            items.append((d, max(0, we - seq_len), int(ws), wl))
            last, taken = we, taken + 1
            if taken >= per_doc:
                break
    return items[:max_items]


def eval_lambada(loaded, scorer: Scorer, docs: Sequence[np.ndarray], manifest: dict, min_context: int,
                 max_items: int, input_docs: Sequence[np.ndarray] | None = None) -> dict:
    """Cloze items are picked by the cache's (oracle) POS tags; the model's tags come from
    `input_docs` (the same documents re-tagged by the run's tag source), default `docs`."""
    names, shift, seq_len = loaded.cfg.metadata_names, loaded.shift, loaded.run.seq_len
    tag_rows, _ = _rows_of(manifest, names)
    if "pos" not in loaded.vocabs:
        raise ValueError("cloze items need the POS vocabulary (vocab_pos.json beside the cache)")
    items = cloze_items(docs, manifest, loaded.vocabs["pos"], seq_len, min_context, max_items=max_items)
    modes = [m for m in _modes(loaded) if m != "self"]  # cloze is scored with the given tags only
    out = {"items": len(items), "modes": {}}
    if not items:
        return out
    for mode in modes:
        rows = []
        for d, start, ws, wl in items:
            row = segment_row((input_docs or docs)[d][:, start:ws + wl], tag_rows, names, shift)
            if mode == "unguided":  # positions ws-start .. : predict the word's pieces
                for name in names:
                    row[name] = row[name].copy()
                    row[name][ws - start:] = PAD_ID
            rows.append(row)
        hits = [bool(h[ws - start:].all()) for (d, start, ws, wl), (_, h) in zip(items, scorer.score(rows, seq_len))]
        out["modes"][mode] = bucket_accuracy(hits, [str(wl) if wl < 3 else "3+" for *_, wl in items])
    return out


def _modes(loaded) -> list[str]:
    """Where the tags of generated or scored text come from, per task (module docstring)."""
    from lime_jax.inference import self_tags

    if not loaded.cfg.metadata:
        return ["none"]
    modes = ["unguided", "guided"] if loaded.shift >= 1 else ["reannotated", "unguided"]
    return modes + (["self"] if any(self_tags.forecast_heads(loaded.cfg, loaded.shift)) else [])


def _prompt_and_answers(loaded, examples: Sequence[dict], answers_key: str) -> tuple[list, list]:
    """Prompt-only features, and per example the split (prompt, answer) features of each answer."""
    from lime_jax.inference.generate import annotate_texts, split_prompt

    prompt_feats = annotate_texts(loaded, [e["prompt"] for e in examples])
    split = []
    for e, pf in zip(examples, prompt_feats):
        answers = e[answers_key] if isinstance(e[answers_key], list) else [e[answers_key]]
        split.append([split_prompt(loaded, e["prompt"], a, pf) for a in answers])
    return prompt_feats, split


def eval_addition(loaded, n: int, max_digits: int, batch_rows: int = 32, tag_fn=None, tagger=None,
                  inc=None) -> dict:
    """`tag_fn` (an honest source) re-tags the prompts; generated pieces are re-tagged by spaCy on
    the decoded prefix (the `prefix` source) or by `tagger` (mode `reannotated`). `unguided`: PAD
    wherever the model would be fed the tags of generated pieces (LIME: everywhere); `self`: every
    tag is the model's forecast, the prompt's too."""
    from lime_jax.data import synthetic
    from lime_jax.inference import self_tags
    from lime_jax.inference.generate import decode_batch, make_retagger, oracle_guide, tag_rows

    examples = synthetic.addition_examples(n, seed=TEST_SEED, max_digits=max_digits)
    rows = tag_rows(loaded)
    prompt_feats, split = _prompt_and_answers(loaded, examples, "answer")
    if tag_fn is not None:
        tag_sources.write_tags(tag_fn([f[0] for f in prompt_feats]), prompt_feats)
    inc = inc or loaded.decoder
    tok = loaded.tokenizer
    lime = loaded.cfg.metadata and loaded.shift < 1
    out = {"n": len(examples), "max_digits": max_digits, "modes": {}}
    for mode in _modes(loaded):
        hits, samples = [], []
        forecast = self_tags.forecast_heads(loaded.cfg, loaded.shift) if mode == "self" else None
        retag = (make_retagger(loaded, tagger) if mode == "reannotated" else
                 _pad_tags(len(rows)) if mode == "unguided" and lime else None)
        for start in range(0, len(examples), batch_rows):
            idx = range(start, min(start + batch_rows, len(examples)))
            if mode == "guided":
                prompts = [split[i][0][0] for i in idx]
                guides = [oracle_guide(split[i][0][1][rows]) for i in idx]
            else:
                prompts = [prompt_feats[i] for i in idx]
                guides = None
            prompt_tags = ([None] * len(prompts) if mode == "self" else
                           [np.zeros_like(p[rows]) for p in prompts] if mode == "unguided" and lime else
                           [p[rows] for p in prompts])
            max_new = max(split[i][0][1].shape[1] for i in idx) + 1
            decoded = decode_batch(inc, loaded.shift, [p[0] for p in prompts], prompt_tags,
                                   max_new, guides=guides, retag=retag, forecast_heads=forecast)
            for i, dec in zip(idx, decoded):
                text = tok.decode(dec.ids)
                hits.append(text.strip() == examples[i]["answer"].strip())
                if len(samples) < 5:
                    samples.append({"prompt": examples[i]["prompt"], "answer": examples[i]["answer"],
                                    "generated": text})
        res = bucket_accuracy(hits, [e["digits"] for e in examples])
        res["samples"] = samples
        out["modes"][mode] = res
    return out


def _pad_tags(num_tables: int):
    """A retagger that gives every piece PAD (no metadata): LIME's unguided mode."""
    return lambda seqs: [np.zeros((num_tables, len(s)), np.int32) for s in seqs]


def eval_reasoning(loaded, scorer: Scorer, n: int, tag_fn=None, inc=None) -> dict:
    """Answer choice by summed log-likelihood; LIME+1's `guided`/`unguided` set the answer's tags
    (`_lime_plus1_answer_tags`), LIME's `unguided` feeds PAD everywhere, `self` the model's forecast."""
    from lime_jax.data import synthetic
    from lime_jax.inference import self_tags
    from lime_jax.inference.generate import tag_rows

    examples = synthetic.reasoning_examples(n, seed=TEST_SEED)
    rows = tag_rows(loaded)
    names, shift, seq_len = loaded.cfg.metadata_names, loaded.shift, loaded.run.seq_len
    _, split = _prompt_and_answers(loaded, examples, "choices")
    if tag_fn is not None:  # an honest source tags prompt + answer as one text
        fulls = [np.concatenate(pair, axis=1) for parts in split for pair in parts]
        tag_sources.write_tags(tag_fn([f[0] for f in fulls]), fulls)
        it = iter(fulls)
        split = [[(f[:, :pf.shape[1]], f[:, pf.shape[1]:]) for (pf, _), f in zip(parts, it)] for parts in split]
    out = {"n": len(examples), "modes": {}}
    for mode in _modes(loaded):
        score_rows, owners = [], []
        for i, (e, parts) in enumerate(zip(examples, split)):
            gold = e["choices"].index(e["answer"])
            gold_tags = parts[gold][1][rows]
            for prompt_f, choice_f in parts:
                full = np.concatenate([prompt_f, choice_f], axis=1)[:, -seq_len:]
                row = segment_row(full, rows, names, shift)
                n_choice = choice_f.shape[1]
                if mode in ("guided", "unguided") and shift >= 1:
                    _lime_plus1_answer_tags(row, names, full[rows], n_choice, mode, gold_tags)
                elif mode == "unguided":
                    row.update({name: np.full_like(row[name], PAD_ID) for name in names})
                score_rows.append(row)
                owners.append((i, n_choice))
        scored = ((nll, hits) for nll, hits, *_ in self_tags.score_self(inc, shift, score_rows, seq_len, 64)) \
            if mode == "self" else scorer.score(score_rows, seq_len)
        scores: dict[int, list[float]] = {}
        for (i, n_choice), (nll, _) in zip(owners, scored):
            scores.setdefault(i, []).append(-float(nll[-n_choice:].sum()))
        hits = [int(np.argmax(scores[i])) == e["choices"].index(e["answer"]) for i, e in enumerate(examples)]
        out["modes"][mode] = bucket_accuracy(hits, [e["template"] for e in examples])
    return out


def _lime_plus1_answer_tags(row: dict, names, tags_KxN: np.ndarray, n_answer: int, mode: str,
                            gold_tags: np.ndarray) -> None:
    """LIME+1 metadata of a scored prompt + answer row: the answer's pieces carry the gold
    answer's oracle guide (guided: its tags, then EOS, then PAD, as in generation) or PAD, no
    metadata (unguided)."""
    from lime_jax.inference.generate import oracle_guide

    tags_KxN = tags_KxN.copy()
    fill = np.full((len(names), n_answer), PAD_ID, np.int32)
    if mode == "guided":
        guide = oracle_guide(gold_tags)[:, :n_answer]
        fill[:, :guide.shape[1]] = guide
    tags_KxN[:, tags_KxN.shape[1] - n_answer:] = fill
    shifted = packing.input_tags(tags_KxN, 1)
    for k, name in enumerate(names):
        row[name] = shifted[k]


# ----------------------------------------------------------------------------- driver


def evaluate(loaded, tasks: Sequence[str] = TASKS, *, eval_cache_dir: str | None = None,
             max_docs: int | None = None, addition_n: int = 150, addition_digits: int = 3,
             reasoning_n: int = 100, cloze_context: int = 32, cloze_items_max: int = 300,
             batch_rows: int = 16, tags: tag_sources.TagSource = tag_sources.ORACLE, tagger=None) -> dict:
    """Runs the tasks; returns the results dict (what `write_results` stores).

    `tags`: where a LIME run's tags come from (module docstring); `tagger` is the loaded
    causal tagger of a `tagger:DIR` source, checked against the run's SentencePiece model.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {TASKS}")
    tag_fn = None
    if tags.honest and loaded.cfg.metadata:
        if not tag_sources.is_honest(str(tags), loaded.shift):
            raise ValueError(f"--tags {tags}: a LIME+1 run sees the tags of the piece it predicts, so no tag "
                             "source is honest for it; its modes guided/unguided say where tags come from")
        if tags.kind == "tagger" and tagger is None:
            raise ValueError(f"tag source {tags}: pass the loaded tagger")
        tag_fn = tag_sources.tag_function(tags, loaded.tokenizer, loaded.processor.annotator, tagger=tagger,
                                          max_pieces=max(tag_sources.DEFAULT_MAX_PIECES, loaded.run.seq_len))
    scorer, inc = Scorer(loaded, batch_rows), loaded.decoder
    res = {"model_dir": loaded.run.model_dir, "step": loaded.step, "arm": loaded.run.arm,
           "shift": loaded.shift, "tokens_per_step": loaded.run.tokens_per_step,
           "tokens_seen": loaded.step * loaded.run.tokens_per_step, "modes": _modes(loaded),
           "tag_source": str(tags), "tags_honest": tag_sources.is_honest(str(tags), loaded.shift)}
    docs = manifest = None
    if {"heldout", "lambada"} & set(tasks):
        cache_dir = eval_cache_dir or loaded.run.eval_cache_dir
        if not cache_dir:
            raise ValueError(f"{loaded.run.model_dir}/config.gin names no DataConfig.eval_cache_dir; pass --eval_cache_dir")
        docs, manifest = cache_lib.read_documents(cache_dir, max_docs)
        res["eval_cache_dir"] = os.path.abspath(cache_dir)
        if tag_fn is None:  # the held-out cache's own tags: oracle, or those of `annotate --from-cache`
            res["tag_source"] = manifest.get("tag_source", "oracle")
            res["tags_honest"] = tag_sources.is_honest(res["tag_source"], loaded.shift)
        input_docs = docs if tag_fn is None else retag_documents(docs, manifest, tag_fn, loaded.run.seq_len, tags)
    for task in tasks:
        t0 = time.perf_counter()
        if task == "heldout":
            res[task] = eval_heldout(loaded, scorer, input_docs, manifest, inc, target_docs=docs)
        elif task == "lambada":
            res[task] = eval_lambada(loaded, scorer, docs, manifest, cloze_context, cloze_items_max, input_docs)
        elif task == "addition":
            res[task] = eval_addition(loaded, addition_n, addition_digits, tag_fn=tag_fn, tagger=tagger, inc=inc)
        elif task == "reasoning":
            res[task] = eval_reasoning(loaded, scorer, reasoning_n, tag_fn, inc)
        res[task]["seconds"] = round(time.perf_counter() - t0, 2)
        # Held-out text and cloze read the cache's tags (or --tags); addition and reasoning tag the
        # text they make with --tags: each task names its own source.
        source = res["tag_source"] if task in ("heldout", "lambada") else str(tags)
        res[task]["tag_source"] = source
        res[task]["tags_honest"] = tag_sources.is_honest(source, loaded.shift)
    return res


def results_path(model_dir: str, tag_source: str = "oracle") -> str:
    """`eval_results.json` for oracle tags, `eval_results_<source kind>.json` for an honest source,
    so evaluations with different tags sit side by side (the report reads them all)."""
    kind = tag_source.split(":", 1)[0]
    return str(epath.Path(model_dir) / (RESULTS_NAME if kind == "oracle" else f"eval_results_{kind}.json"))


def write_results(model_dir: str, res: dict) -> str:
    """Writes `res` beside the run through a temporary file renamed into place (local or gs://)."""
    path = epath.Path(results_path(model_dir, res.get("tag_source", "oracle")))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1), encoding="utf-8")
    tmp.replace(path)
    return str(path)


def summary_lines(res: dict) -> list[str]:
    honesty = "honest" if res.get("tags_honest") else "oracle"
    lines = [f"{res['model_dir']} ({res['arm']}, step {res['step']}, tags {res.get('tag_source', 'oracle')}: {honesty})"]
    if "heldout" in res:
        h = res["heldout"]
        lines.append(f"  heldout: loss={h['loss']:.4f} ppl={h['perplexity']:.2f} accuracy={h['accuracy']:.4f} "
                     f"({h['tokens']} tokens)")
        places = h["cohesion"]["by_place"]
        lines.append("  cohesion (accuracy by place in word): " +
                     " ".join(f"{p}:{v['accuracy']:.3f}" for p, v in places.items()))
        for mode, m in h.get("modes", {}).items():
            lines.append(f"  heldout {mode}: loss={m['loss']:.4f} accuracy={m['accuracy']:.4f}")
        for mode, m in [("main", h), *h.get("modes", {}).items()]:
            if m.get("heads"):
                lines.append(f"  tag heads ({mode} tags): " +
                             " ".join(f"{k}={v['accuracy']:.3f}" for k, v in m["heads"].items()))
    for task in ("lambada", "addition", "reasoning"):
        if task in res:
            modes = res[task]["modes"]
            lines.append(f"  {task}: " + " ".join(f"{m}={v['accuracy']:.3f}" for m, v in modes.items())
                         + (f" (n={next(iter(modes.values()))['n']})" if modes else " (no items)"))
    return lines
