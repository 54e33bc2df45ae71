"""Loading a tagger dir and tagging piece sequences, causally, batched and jitted.

    tagger = CausalTagger.load("runs/tagger")
    tagger.check_spm("cache/spm.model")        # the pieces must come from the same model
    tags = tagger.tag([ids_L, ...])            # -> [2, L] int32 each: rows pos, ner

Sequences are split into chunks of the training `seq_len` (as the loader splits documents),
padded to a power-of-two length bucket and a power-of-two row count, so a handful of programs
serve any input. Rows are sharded over all of JAX's devices; parameters are replicated.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lime_jax.annotation.vocab import TagVocab
from lime_jax.hashing import sha256_file
from lime_jax.ids import PAD_ID
from lime_jax.model.config import ModelConfig
from lime_jax.tagger.model import TAGS, TaggerModel
from lime_jax.tagger.train import CHECKPOINT_SUBDIR, FORMAT, META_NAME, SPM_NAME, vocab_name

MIN_BUCKET = 32
MAX_ROWS = 64  # rows per call: enough to fill a CPU's cores, small enough for short inputs


class TaggerDirError(ValueError):
    """A tagger dir is missing, half-written or does not match the pieces/vocabularies given."""


def _bucket(n: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, 1 << max(n - 1, 0).bit_length()))


class CausalTagger:
    """A trained tagger; see the module docstring. Build with `CausalTagger.load(dir)`."""

    def __init__(self, directory: str, meta: dict, model: TaggerModel, vocabs: dict[str, TagVocab]):
        self.directory, self.meta, self.vocabs = directory, meta, vocabs
        self.seq_len = int(meta["seq_len"])
        self.model_cfg = model.cfg
        self.vocab_size = model.cfg.vocab_size
        devices = jax.devices()
        self._mesh = Mesh(np.array(devices), ("data",))
        self._rows = NamedSharding(self._mesh, PartitionSpec("data"))
        self._row_multiple = len(devices)
        graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, NamedSharding(self._mesh, PartitionSpec()))

        @jax.jit
        def predict(state, pieces_BxL, segment_ids_BxL):
            positions_BxL = jnp.broadcast_to(jnp.arange(pieces_BxL.shape[1], dtype=jnp.int32), pieces_BxL.shape)
            logits = nnx.merge(graphdef, state)(pieces_BxL, segment_ids_BxL, positions_BxL)
            # PAD is never a target; keep it out of the answers even where its logit is highest.
            return jnp.stack([logits_BxLxT.at[..., PAD_ID].set(-jnp.inf).argmax(-1).astype(jnp.int32)
                              for logits_BxLxT in logits])

        self._predict = predict

    @classmethod
    def load(cls, directory: str, expected_vocabs: Mapping[str, TagVocab] | None = None) -> "CausalTagger":
        """Restores a tagger dir written by `lime-jax tagger train`.

        Raises TaggerDirError naming the file for a missing or half-written dir, a copied
        SentencePiece model or vocabulary that does not match `tagger.json`, or vocabularies
        other than `expected_vocabs` (`{"pos": TagVocab, "ner": TagVocab}`).
        """
        if not os.path.isdir(directory):
            raise TaggerDirError(f"{directory}: tagger directory does not exist")
        meta_path = os.path.join(directory, META_NAME)
        if not os.path.isfile(meta_path):
            raise TaggerDirError(f"{meta_path}: missing: not a tagger dir, or training did not finish "
                                 "(tagger.json is written last)")
        with open(meta_path, encoding="utf-8") as f:
            try:
                meta = json.load(f)
            except json.JSONDecodeError as e:
                raise TaggerDirError(f"{meta_path}: not valid JSON (line {e.lineno}): {e.msg}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise TaggerDirError(f"{meta_path}: field 'format': expected {FORMAT!r}, got "
                                 f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
        for field in ("model", "tag_sizes", "seq_len", "step", "spm_sha256", "tokenization"):
            if field not in meta:
                raise TaggerDirError(f"{meta_path}: field {field!r} missing")

        spm_path = os.path.join(directory, SPM_NAME)
        if not os.path.isfile(spm_path):
            raise TaggerDirError(f"{spm_path}: missing (the tagger's SentencePiece model)")
        if sha256_file(spm_path) != meta["spm_sha256"]:
            raise TaggerDirError(f"{spm_path}: sha256 does not match {meta_path} field 'spm_sha256'")
        vocabs = {}
        for tag in TAGS:
            path = os.path.join(directory, vocab_name(tag))
            if not os.path.isfile(path):
                raise TaggerDirError(f"{path}: missing (the tagger's {tag} vocabulary)")
            vocabs[tag] = TagVocab.load(path)
            if vocabs[tag].size != meta["tag_sizes"].get(tag):
                raise TaggerDirError(f"{path}: holds {vocabs[tag].size} tags, {meta_path} field "
                                     f"'tag_sizes.{tag}' says {meta['tag_sizes'].get(tag)}")

        try:
            cfg = ModelConfig(**meta["model"])
        except (TypeError, ValueError) as e:
            raise TaggerDirError(f"{meta_path}: field 'model' is not a ModelConfig ({e})") from None
        model = nnx.eval_shape(lambda: TaggerModel(cfg, meta["tag_sizes"], rngs=nnx.Rngs(0)))
        step_dir = os.path.join(os.path.abspath(directory), CHECKPOINT_SUBDIR, str(meta["step"]))
        if not os.path.isdir(step_dir):
            raise TaggerDirError(f"{step_dir}: checkpoint missing (field 'step' of {meta_path} is "
                                 f"{meta['step']})")
        abstract = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        try:
            with ocp.CheckpointManager(os.path.dirname(step_dir)) as mgr:
                restored = mgr.restore(meta["step"], args=ocp.args.StandardRestore(abstract))
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise TaggerDirError(f"{step_dir}: cannot restore the tagger's parameters ({e})") from None
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, restored)
        nnx.update(model, state)
        tagger = cls(directory, meta, model, vocabs)
        if expected_vocabs is not None:
            tagger.check_vocabs(expected_vocabs)
        return tagger

    def check_spm(self, spm_path: str) -> None:
        """Raises TaggerDirError unless `spm_path` is the SentencePiece model the tagger reads."""
        digest = sha256_file(spm_path)
        if digest != self.meta["spm_sha256"]:
            raise TaggerDirError(
                f"{spm_path}: sha256 {digest[:12]}... differs from the tagger's SentencePiece model "
                f"{self.meta['spm_sha256'][:12]}... ({os.path.join(self.directory, META_NAME)} field "
                "'spm_sha256'): its piece ids mean other pieces")

    def check_vocabs(self, vocabs: Mapping[str, TagVocab]) -> None:
        """Raises TaggerDirError unless `vocabs` (by tag name) equal the tagger's."""
        for tag, vocab in vocabs.items():
            mine = self.vocabs.get(tag)
            if mine != vocab:
                where = os.path.join(self.directory, vocab_name(tag))
                detail = ("unknown tag name" if mine is None else
                          f"{mine.size} tags vs {vocab.size}" if mine.size != vocab.size else
                          "same size, other labels or order")
                raise TaggerDirError(f"{where}: the tagger's {tag!r} vocabulary differs from the one "
                                     f"expected ({detail}); its ids would mean other tags")

    def tag(self, seqs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Tags of each piece sequence: int32 [2, L] (rows pos, ner; ids of `self.vocabs`)."""
        chunks = []  # (seq index, start, piece ids)
        for k, seq in enumerate(seqs):
            arr = np.asarray(seq)
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(f"seqs[{k}]: expected a 1-D integer array of piece ids, got "
                                 f"shape {arr.shape} dtype {arr.dtype}")
            if arr.size and (arr.min() <= PAD_ID or arr.max() >= self.vocab_size):
                raise ValueError(f"seqs[{k}]: piece ids must be in [1, {self.vocab_size}) (0 is PAD), "
                                 f"got min {arr.min()}, max {arr.max()}")
            chunks += [(k, s, arr[s:s + self.seq_len]) for s in range(0, arr.size, self.seq_len)]
        out = [np.empty((len(TAGS), len(s)), np.int32) for s in seqs]
        by_bucket: dict[int, list] = {}
        for c in chunks:
            by_bucket.setdefault(_bucket(len(c[2]), MIN_BUCKET, self.seq_len), []).append(c)
        for length, group in sorted(by_bucket.items()):
            for start in range(0, len(group), MAX_ROWS):
                part = group[start:start + MAX_ROWS]
                rows = _bucket(len(part), 1, MAX_ROWS)
                rows += -rows % self._row_multiple
                pieces = np.zeros((rows, length), np.int32)
                for r, (_, _, ids) in enumerate(part):
                    pieces[r, :len(ids)] = ids
                segments = (pieces > 0).astype(np.int32)
                tags_2xBxL = np.asarray(self._predict(
                    self._state, jax.device_put(pieces, self._rows), jax.device_put(segments, self._rows)))
                for r, (k, s, ids) in enumerate(part):
                    out[k][:, s:s + len(ids)] = tags_2xBxL[:, r, :len(ids)]
        return out


def load_checked(directory: str, spm_path: str, vocabs: Mapping[str, TagVocab]) -> CausalTagger:
    """The tagger in `directory`, refused (TaggerDirError naming the file) unless it reads the
    SentencePiece model `spm_path` and writes ids of `vocabs` (`{"pos": ..., "ner": ...}`, the
    vocabularies of the cache or model its tags are for)."""
    tagger = CausalTagger.load(directory, expected_vocabs=vocabs)
    tagger.check_spm(spm_path)
    return tagger
