"""Text generation from a trained run, with metadata guidance for LIME+1 (`lime-jax generate`).

Where the tags of the generated tokens come from depends on the run's metadata shift
(docs/architecture.md, "Batches"); the output names the source:
- LIME+1 (shift +1): position i sees the tags of the token it is about to predict, so the caller
  supplies them ("metadata guidance"):
    `--guide` lists the tags of the tokens to come, one entry per token: `CD CD .`, entries
      `POS` or `POS/NER` (`NNP/B-PERSON`); NER defaults to `O`; `NONE` is the tag of a piece
      without a word (whitespace only); `EOS` (or `<eos>`) is the tag of the EOS that ends the
      text: "stop here"; `-` leaves a step to the model: its own forecast when the run has tag
      heads (gin/runs/lime_plus1_self.gin), else PAD (unguided).
      Or JSON: `[{"pos": "CD", "ner": "B-CARDINAL"}, ...]` or `{"pos": [...], "ner": [...]}`.
      Entries are per SentencePiece token: a piece of whitespace only (a lone "▁", e.g. before
      digits, " 42" -> "▁" "4" "2") is a step of its own with tag NONE (`NONE CD CD`).
    `--guide-from TEXT` annotates prompt + TEXT with the training pipeline and uses the tags of
      TEXT's tokens, then EOS, the tag of the EOS that ends TEXT (oracle guidance, as in the
      paper). TEXT is appended to the prompt as given (start it with a space where one belongs).
  `--tags self`: no guide, every tag (the prompt's too) is the model's forecast (no spaCy).
  Length: without `--max-new`, a guided run generates len(guide) + 1 tokens (room for EOS; with
  `--guide-from`, len(TEXT's tokens) + 1, the oracle's end-of-text step). A guide shorter than
  `--max-new` guides the first steps and then continues as `-` steps. An unguided step gets tag
  id 0 (PAD), which adds nothing to the embedding: the model predicts from the tokens alone
  (not NONE, the tag of a whitespace-only piece, nor EOS, which tells it the text ends). A
  guide longer than `--max-new` is an error. Without a guide every step is a `-` step.
- LIME (shift 0) and the previous-piece arm (shift -1): `--tags prefix` (default) tags the
  prompt by spaCy over each of its prefixes and every generated token by re-annotating the
  decoded text after each step; `--tags tagger:DIR` uses the causal tagger for both (no spaCy);
  `--tags self` takes both from the run's tag heads (lime_jax.inference.self_tags; no spaCy).
  The KV cache keeps what each position was fed; for shift -1 the tag fed for piece i-1 comes
  from the re-annotation that includes piece i (text before the piece being predicted).
  Guides are rejected.
- Baseline: no metadata.
LIME+1 prompt tags come from annotating the prompt (with `--guide-from`, prompt + TEXT).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

import numpy as np

from lime_jax.annotation.vocab import TagVocab, UnknownTagError
from lime_jax.ids import EOS_ID, EOS_TAG_ID, NONE_ID, PAD_ID

# A guide entry left to the model: its forecast (`self_tags`), or PAD (no metadata) when the
# model has no tag head for it. Never fed to the model as an id.
FORECAST_ID = -1
# Guide entries that stand for a whole step (every tag type), not a tag name.
STEP_TAGS = {"NONE": NONE_ID, "<none>": NONE_ID, "EOS": EOS_TAG_ID, "<eos>": EOS_TAG_ID, "-": FORECAST_ID}


class GuideError(ValueError):
    """A guide that does not fit the model or the requested length."""


# ----------------------------------------------------------------------------- guides


def parse_guide(text: str, vocabs: dict[str, TagVocab], names: Sequence[str]) -> np.ndarray:
    """A guide string -> int32 [K, G] tag ids (rows in the order of `names`)."""
    text = text.strip()
    if not text:
        raise GuideError("--guide is empty")
    steps: list[dict[str, str]]
    if text[0] in "[{":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise GuideError(f"--guide: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if isinstance(obj, dict):
            lengths = {k: len(v) for k, v in obj.items() if isinstance(v, list)}
            if len(lengths) != len(obj) or len(set(lengths.values())) != 1:
                raise GuideError(f"--guide: a JSON object needs lists of equal length per tag type, got {lengths}")
            n = next(iter(lengths.values()))
            steps = [{k: v[i] for k, v in obj.items()} for i in range(n)]
        elif isinstance(obj, list) and all(isinstance(s, dict) for s in obj):
            steps = obj
        else:
            raise GuideError('--guide: JSON must be [{"pos": ..., "ner": ...}, ...] or {"pos": [...], "ner": [...]}')
    else:
        steps = []
        for entry in text.split():
            pos, _, ner = entry.partition("/")
            steps.append({"pos": pos, "ner": pos} if pos in STEP_TAGS else {"pos": pos, "ner": ner or "O"})
    out = np.full((len(names), len(steps)), NONE_ID, np.int32)
    for j, step in enumerate(steps):
        unknown = [k for k in step if k not in names]
        if unknown:
            raise GuideError(f"--guide step {j + 1}: tag type(s) {unknown} not among the model's tables {list(names)}")
        for k, name in enumerate(names):
            tag = step.get(name, "O" if name == "ner" else None)
            if tag is None:
                raise GuideError(f"--guide step {j + 1}: no {name} tag")
            if isinstance(tag, str) and tag in STEP_TAGS:  # JSON may hold unhashable junk
                out[k, j] = STEP_TAGS[tag]
                continue
            try:
                out[k, j] = vocabs[name].id(str(tag))
            except UnknownTagError as e:
                raise GuideError(f"--guide step {j + 1}: {e}") from None
    return out


def oracle_guide(continuation_KxG: np.ndarray) -> np.ndarray:
    """The oracle guide of a reference continuation: its tokens' tags, then EOS, the tag of the
    EOS that ends it (a guided model learns to stop there, as on every training document)."""
    end_Kx1 = np.full((continuation_KxG.shape[0], 1), EOS_TAG_ID, np.int32)
    return np.concatenate([continuation_KxG, end_Kx1], axis=1)


# ----------------------------------------------------------------------------- decoding loop


class ShardedDecoder:
    """`IncrementalDecoder`'s interface (`init_cache`, `extend`, `sample`) with explicit placement.

    `placement_for(B)` (`model_dir.LoadedModel.placement`) says where a batch of B rows runs:
    its decoder (over parameters that stay on the devices, jitted once per shape; its KV cache
    sharded on the same mesh, `IncrementalDecoder(model, mesh)`), the mesh every call runs under, and where batch
    inputs (batch dim first) go. Host arrays reach the devices by `jax.device_put` only,
    sampling keys replicated, so after set-up a decoding step moves its inputs in and its
    results out, nothing else. `as_sharded` wraps a bare decoder.
    """

    def __init__(self, cfg, placement_for: Callable[[int], object]):
        self.cfg, self.placement_for = cfg, placement_for

    @staticmethod
    def _on_mesh(placement):
        import contextlib

        import jax

        return contextlib.nullcontext() if placement.mesh is None else jax.set_mesh(placement.mesh)

    def put(self, tree, batch: int):
        """Host arrays (or trees of them) whose leading dim is `batch` rows -> the devices."""
        import jax

        return jax.device_put(tree, self.placement_for(batch).batch_sharding)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        return self.placement_for(batch_size).decoder.init_cache(batch_size, max_len)

    def extend(self, cache, tokens_BxT, metadata=None, valid_BxT=None, heads: bool = False):
        batch = tokens_BxT.shape[0]
        placement = self.placement_for(batch)
        tokens_BxT, metadata, valid_BxT = self.put((tokens_BxT, dict(metadata or {}), valid_BxT), batch)
        with self._on_mesh(placement):
            return placement.decoder.extend(cache, tokens_BxT, metadata, valid_BxT, heads=heads)

    def sample(self, logits_BxV, key, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        placement = self.placement_for(logits_BxV.shape[0])
        key = jax.device_put(key, None if placement.mesh is None else NamedSharding(placement.mesh, PartitionSpec()))
        with self._on_mesh(placement):
            return placement.decoder.sample(logits_BxV, key, temperature, top_k, top_p)


def as_sharded(inc) -> ShardedDecoder:
    """`inc` itself, or a bare IncrementalDecoder wrapped (no mesh: the default device)."""
    from lime_jax.inference.model_dir import Placement

    if isinstance(inc, ShardedDecoder):
        return inc
    placement = Placement(model=None, decoder=inc)
    return ShardedDecoder(inc.cfg, lambda batch: placement)


@dataclasses.dataclass
class Decoded:
    ids: list[int]  # generated ids, EOS excluded
    tags: np.ndarray  # int32 [K, len(ids)]: the tags of each generated token (see decode_batch)
    stopped_at_eos: bool


def decode_batch(
    inc,
    shift: int,
    prompts: Sequence[np.ndarray],
    prompt_tags: Sequence[np.ndarray | None],
    max_new: int,
    *,
    guides: Sequence[np.ndarray | None] | None = None,
    retag: Callable[[list[list[int]]], list[np.ndarray]] | None = None,
    forecast_heads: Sequence[str | None] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[Decoded]:
    """Generates up to `max_new` tokens after each prompt (one batch, left-padded).

    `prompts[b]`: piece ids t_1..t_n (no BOS, no EOS); `prompt_tags[b]`: int32 [K, n] for the
    model's K tables (K = 0 for the baseline), or None to take the prompt's tags from the model's
    forecast too. Position i of a row sees the tags of token t_{i + shift} (t_0 = BOS: NONE).
    Tags of tokens past the prompt come from `guides[b]` ([K, G]; FORECAST entries and the steps
    after the guide: the forecast, or PAD = no metadata without `forecast_heads`) for shift +1;
    for shift <= 0 from the forecast when `forecast_heads` is given (`self_tags.forecast_heads`),
    else from `retag(sequences)` (tags of every token of each sequence). `Decoded.tags` holds,
    per generated token, the tags that stand for it: the ones the model was fed for it.
    `inc`: a ShardedDecoder (`LoadedModel.decoder`) or an IncrementalDecoder; each step moves
    its new tokens and tags to the devices and the sampled ids (and forecasts) back, explicitly.
    """
    import jax

    from lime_jax.inference import self_tags

    inc = as_sharded(inc)
    cfg = inc.cfg
    names = cfg.metadata_names
    K, B = len(names), len(prompts)
    forecasting = bool(K and forecast_heads is not None and any(forecast_heads))
    if not K:
        source = "none"
    elif shift >= 1:
        source = "guide"
    elif forecasting:
        source = "self"
    else:
        source = "retag"
        if retag is None:
            raise ValueError(f"a model with metadata shift {shift} needs `retag` (or `forecast_heads`) for generated tokens")
    self_prompt = [t is None for t in prompt_tags]
    if any(self_prompt) and not forecasting:
        raise ValueError("prompt tags left to the model's forecast need `forecast_heads`")
    lengths = [len(p) for p in prompts]
    P = max(lengths) + 1  # + BOS
    tags: list[list[np.ndarray]] = [[] if prompt_tags[b] is None else [prompt_tags[b][:, i] for i in range(lengths[b])]
                                    for b in range(B)]
    none = np.full((K,), NONE_ID, np.int32)
    unguided = np.full((K,), PAD_ID, np.int32)
    forecasts: list[dict[int, np.ndarray]] = [{} for _ in range(B)]  # token index -> forecast tags

    def forecast_of(b: int, k: int) -> np.ndarray:
        return forecasts[b].get(k, unguided)

    def tags_of(b: int, k: int) -> np.ndarray:
        """Tags of token t_k of row b (t_0 = BOS)."""
        if k <= 0:
            return none
        if k <= lengths[b] and self_prompt[b]:
            return forecast_of(b, k)
        if k <= len(tags[b]):
            return tags[b][k - 1]
        if source == "self":
            return forecast_of(b, k)
        if source == "guide":
            g = k - lengths[b] - 1
            if guides is not None and guides[b] is not None and g < guides[b].shape[1]:
                entry = guides[b][:, g]
                return np.where(entry == FORECAST_ID, forecast_of(b, k), entry).astype(np.int32)
            return forecast_of(b, k)
        return unguided

    def remember(head_logits, fed_index_BxT: Sequence[Sequence[int | None]]) -> None:
        """Stores the forecast made at every position fed: tags of t_{fed + 1 + shift}."""
        if not forecasting:
            return
        fc_KxBxT = self_tags.forecast_all(head_logits, forecast_heads, B)
        for c in range(len(fed_index_BxT[0])):
            for b in range(B):
                k = fed_index_BxT[b][c]
                if k is not None and k + 1 + shift > 0:
                    forecasts[b][k + 1 + shift] = fc_KxBxT[:, b, c]

    def run(cache, tokens_BxT, meta_KxBxT, valid_BxT=None):
        out = inc.extend(cache, tokens_BxT, {name: meta_KxBxT[k] for k, name in enumerate(names)}, valid_BxT,
                         heads=forecasting)
        return out if forecasting else (out[0], {}, out[1])

    cache = inc.init_cache(B, P + max_new)
    tokens = np.zeros((B, P), np.int32)
    valid = np.zeros((B, P), bool)
    for b, n in enumerate(lengths):
        tokens[b, P - n:] = prompts[b]
        valid[b, P - n - 1:] = True
    # A forecast prompt is fed one position at a time (each position's tags are the forecast of
    # the one before); given prompt tags go in one prefill.
    chunks = [(c, c + 1) for c in range(P)] if any(self_prompt) else [(0, P)]
    for lo, hi in chunks:
        meta = np.zeros((K, B, hi - lo), np.int32)
        for b, n in enumerate(lengths):
            for c in range(max(lo, P - n - 1), hi):
                meta[:, b, c - lo] = tags_of(b, c - (P - n - 1) + shift)
        logits, head_logits, cache = run(cache, tokens[:, lo:hi], meta, valid[:, lo:hi])
        remember(head_logits, [[c - (P - n - 1) if valid[b, c] else None for c in range(lo, hi)]
                               for b, n in enumerate(lengths)])
    key = jax.random.key(seed)
    generated: list[list[int]] = [[] for _ in range(B)]
    gen_tags: list[list[np.ndarray]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    for step in range(max_new):
        key, sub = jax.random.split(key)
        last_BxV = jax.lax.index_in_dim(logits, -1, axis=1, keepdims=False)
        next_ids = jax.device_get(inc.sample(last_BxV, sub, temperature, top_k, top_p))
        for b in range(B):
            if done[b]:
                continue
            if next_ids[b] == EOS_ID:
                done[b] = True
            else:
                generated[b].append(int(next_ids[b]))
        active = [b for b in range(B) if not done[b]]
        if source == "retag" and active:
            fresh = retag([list(map(int, prompts[b])) + generated[b] for b in active])
            for b, t in zip(active, fresh):
                tags[b] = [t[:, i] for i in range(t.shape[1])]
                tags[b][:lengths[b]] = [prompt_tags[b][:, i] for i in range(lengths[b])]
                gen_tags[b].append(t[:, -1])
        if done.all() or step == max_new - 1:
            break
        step_meta = np.zeros((K, B, 1), np.int32)
        fed = []
        for b in range(B):
            k = lengths[b] + len(generated[b])  # index of the token fed now
            step_meta[:, b, 0] = tags_of(b, k + shift)
            fed.append(None if done[b] else k)
        feed = np.where(done, 0, next_ids).astype(np.int32)[:, None]
        logits, head_logits, cache = run(cache, feed, step_meta)
        remember(head_logits, [[k] for k in fed])
    if source in ("guide", "self"):
        # What the model was fed for each generated token (for shift < 0 only after it was fed;
        # the last one's then were never fed: PAD).
        gen_tags = [[tags_of(b, lengths[b] + g) for g in range(1, len(generated[b]) + 1)] for b in range(B)]
    return [Decoded(ids=generated[b],
                    tags=np.stack(gen_tags[b], axis=1) if gen_tags[b] else np.zeros((K, 0), np.int32),
                    stopped_at_eos=bool(done[b])) for b in range(B)]


# ----------------------------------------------------------------------------- text level


def tag_rows(loaded) -> list[int]:
    """Feature rows of the cache format that hold the model's tables, in table order."""
    from lime_jax.annotation.pipeline import FEATURES

    rows = []
    for name in loaded.cfg.metadata_names:
        if f"targets_{name}" not in FEATURES:
            raise ValueError(f"model table {name!r} has no feature targets_{name} in the annotation pipeline")
        rows.append(FEATURES.index(f"targets_{name}"))
    return rows


def annotate_texts(loaded, texts: Sequence[str]) -> list[np.ndarray]:
    """[4, L] pipeline features of each text, EOS dropped (empty text: [4, 0])."""
    from lime_jax.annotation.pipeline import FEATURES

    feats, _ = loaded.processor.process(list(texts))
    return [np.zeros((len(FEATURES), 0), np.int32) if f is None else f[:, :-1] for f in feats]


def split_prompt(loaded, prompt: str, continuation: str, prompt_feats: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Features of prompt + continuation, split into the prompt's and the continuation's pieces.

    Raises GuideError when the continuation changes how the prompt is tokenized.
    """
    if prompt_feats is None:
        prompt_feats = annotate_texts(loaded, [prompt])[0]
    full = annotate_texts(loaded, [prompt + continuation])[0]
    n = prompt_feats.shape[1]
    if full.shape[1] < n or not np.array_equal(full[0, :n], prompt_feats[0]):
        raise GuideError(f"the continuation {continuation!r} changes the tokenization of the prompt's end; "
                         "start it with a space (it is appended to the prompt as given)")
    return full[:, :n], full[:, n:]


def make_retagger(loaded, tagger=None) -> Callable[[list[list[int]]], list[np.ndarray]]:
    """`retag(sequences)`: tags of every piece of each id sequence, in the model's table order.

    Without `tagger`, by annotating the decoded text with spaCy: the last column of a generated
    prefix is the `prefix` tag source's tag of its newest piece (lime_jax.annotation.tag_sources,
    shared with evaluation). With a loaded causal tagger (`tagger:DIR`), from the tagger, which
    reads pieces left to right and needs no spaCy.
    """
    from lime_jax.annotation import tag_sources

    tok, annotator = loaded.tokenizer, loaded.processor.annotator
    rows = [tag_sources.TAG_ROWS.index(n) for n in loaded.cfg.metadata_names]
    if tagger is not None:
        return lambda seqs: [t[rows] for t in tagger.tag([np.asarray(s, np.int32) for s in seqs])]
    return lambda seqs: [t[rows] for t in tag_sources.sequence_tags(tok, annotator, seqs)]


def generate(loaded, prompt: str, *, max_new: int | None = None, guide: str | None = None,
             guide_from: str | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, tags=None, tagger=None) -> dict:
    """One prompt -> `{"text", "pieces", "tags", "tags_source", "stopped_at_eos", ...}`.

    `tags` (a tag_sources.TagSource; None = the run's default) says where tags come from:
    - LIME and the previous-piece arm: `prefix` (default: spaCy re-annotates the decoded text,
      the prompt by each of its prefixes), `tagger:DIR` (the loaded causal `tagger`, no spaCy) or
      `self` (the model's tag heads forecast every tag, the prompt's too: no spaCy, no tagger).
    - LIME+1: the tags of the piece each step predicts come from `--guide` / `--guide-from`
      (oracle); steps the guide leaves open (`-`, and every step after it) take the model's
      forecast when it has tag heads, else PAD (unguided). `self`: no guide needed, the prompt's
      tags are forecast too (no spaCy).
    """
    from lime_jax.inference import self_tags

    cfg, shift = loaded.cfg, loaded.shift
    names = cfg.metadata_names
    kind = None if tags is None else tags.kind
    if guide is not None and guide_from is not None:
        raise GuideError("give either --guide or --guide-from, not both")
    guided = guide is not None or guide_from is not None
    if guided and not names:
        raise GuideError(f"{loaded.run.model_dir} is a baseline run (no metadata tables): it takes no guide")
    if guided and shift < 1:
        raise GuideError(f"{loaded.run.model_dir} has metadata shift {shift} ({loaded.run.arm}): its tags come "
                         "from --tags (prefix, tagger:DIR or self), so it takes no guide; guides need a "
                         "LIME+1 run (METADATA_SHIFT = 1)")
    if not prompt:
        raise ValueError("--prompt is empty")
    if kind is not None and not names:
        raise ValueError(f"--tags {tags}: {loaded.run.model_dir} is a baseline run: it reads no tags")
    if kind == "oracle" and shift < 1:
        raise ValueError("--tags oracle: generated text has no whole-document annotation to take tags from; "
                         "use prefix, tagger:DIR or self")
    if kind == "oracle" and guide_from is None:
        raise ValueError("--tags oracle: a LIME+1 run's oracle tags are those of a reference continuation: "
                         "give it with --guide-from TEXT")
    if kind in ("prefix", "tagger") and shift >= 1:
        raise ValueError(f"--tags {tags}: {loaded.run.model_dir} ({loaded.run.arm}) is fed the tags of the piece "
                         "it predicts, which no tagger has seen yet; use --tags self, --guide or --guide-from")
    if kind == "tagger" and tagger is None:
        raise ValueError(f"--tags {tags}: pass the loaded tagger")
    forecast = None
    if kind == "self":
        forecast = self_tags.require_forecast(cfg, shift, loaded.run.model_dir)
    elif names and shift >= 1 and any(self_tags.forecast_heads(cfg, shift)):
        forecast = self_tags.forecast_heads(cfg, shift)  # for the steps a guide leaves open
    rows = tag_rows(loaded)
    guide_ids = parse_guide(guide, loaded.vocabs, names) if guide is not None else None
    if guide_ids is not None and max_new is not None and guide_ids.shape[1] > max_new:
        raise GuideError(f"the guide has {guide_ids.shape[1]} steps but --max-new is {max_new}: a guide may "
                         "not be longer than the generation (give a larger --max-new or a shorter guide)")
    prompt_feats = annotate_texts(loaded, [prompt])[0]
    if names and shift < 1 and kind != "self" and prompt_feats.shape[1]:
        # The prompt is tagged like the text to come: by the causal tagger, or by spaCy over each
        # prefix (tags of a piece never see the prompt text after it).
        from lime_jax.annotation import tag_sources

        tag_fn = tagger.tag if kind == "tagger" else tag_sources.tag_function(
            tag_sources.PREFIX, loaded.tokenizer, loaded.processor.annotator,
            max_pieces=max(tag_sources.DEFAULT_MAX_PIECES, prompt_feats.shape[1]))
        tag_sources.write_tags(tag_fn([prompt_feats[0]]), [prompt_feats])
    open_steps = "the model's forecast" if forecast else "PAD, unguided (the model has no tag heads)"
    if guide_ids is not None:
        source = f"guide (steps it leaves open: {open_steps})"
    elif guide_from is not None:
        prompt_feats, cont = split_prompt(loaded, prompt, guide_from, prompt_feats)
        guide_ids = oracle_guide(cont[rows])
        source = "guide-from (oracle tags of the reference)"
    else:
        source = ("none (baseline)" if not names else
                  "self (the model's forecast, prompt included)" if kind == "self" else
                  ("forecast (the model's own tags: it has tag heads)" if forecast else "unguided (PAD, no metadata)")
                  if shift >= 1 else
                  f"causal tagger {tagger.directory} (tagger)" if kind == "tagger" else
                  "re-annotation of the decoded prefix (prefix)")
    if max_new is None:
        # Room for EOS after a --guide; an oracle guide already ends with the EOS step.
        max_new = 32 if guide_ids is None else guide_ids.shape[1] + (guide_from is None)
    if max_new < 1:
        raise GuideError(f"--max-new must be >= 1, got {max_new}")
    if guide_ids is not None and guide_ids.shape[1] > max_new:
        raise GuideError(f"the guide has {guide_ids.shape[1]} steps but --max-new is {max_new}: a guide may "
                         "not be longer than the generation (give a larger --max-new or a shorter guide)")
    if prompt_feats.shape[1] == 0:
        raise ValueError("the prompt tokenizes to no pieces")
    retag = make_retagger(loaded, tagger if kind == "tagger" else None) if names and shift < 1 and kind != "self" else None
    out = decode_batch(loaded.decoder, shift, [prompt_feats[0]], [None if kind == "self" else prompt_feats[rows]],
                       max_new, guides=[guide_ids], retag=retag, forecast_heads=forecast,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)[0]
    tok = loaded.tokenizer
    tag_names = [{name: loaded.vocabs[name].tag(int(out.tags[k, j])) for k, name in enumerate(names)}
                 for j in range(len(out.ids))]
    prompt_ids = list(prompt_feats[0])
    # Decoding the whole sequence keeps the space between the prompt and the continuation.
    return {"prompt": prompt, "text": tok.decode(prompt_ids + out.ids)[len(tok.decode(prompt_ids)):],
            "pieces": [tok.id_to_piece(i) for i in out.ids], "ids": out.ids, "tags": tag_names,
            "tags_source": source, "stopped_at_eos": out.stopped_at_eos, "arm": loaded.run.arm,
            "step": loaded.step,
            "guide_steps": None if guide_ids is None else int(guide_ids.shape[1])}


def format_result(res: dict) -> str:
    lines = [res["prompt"] + res["text"], "",
             f"run: {res['arm']} (step {res['step']}); tags source: {res['tags_source']}"
             + ("" if res["stopped_at_eos"] else "; stopped at --max-new")]
    if res["tags"] and res["tags"][0]:
        width = max(len(p) for p in res["pieces"]) + 2
        lines.append(f"{'piece':<{width}} " + " ".join(f"{k:<12}" for k in res["tags"][0]))
        for piece, t in zip(res["pieces"], res["tags"]):
            lines.append(f"{piece:<{width}} " + " ".join(f"{v:<12}" for v in t.values()))
    return "\n".join(lines)
