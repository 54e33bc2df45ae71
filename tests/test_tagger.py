"""The causal tagger: training on a real annotated cache, causality, packing, load errors, CLI."""
import itertools
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from lime_jax import cli, corpus
from lime_jax.data import cache as cache_lib
from lime_jax.tagger import agreement
from lime_jax.tagger.infer import CausalTagger, TaggerDirError
from lime_jax.tagger.model import TaggerModel
from lime_jax.tagger.train import TaggerTrainConfig, train_tagger

N_DOCS = 40
TINY = TaggerTrainConfig(steps=60, batch_size=8, seq_len=64, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                         learning_rate=1e-2, warmup_steps=5, log_every=30)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, spm_model, annotator):
    """A cache of the first bundled documents, written by the real spaCy + SentencePiece pipeline."""
    from lime_jax.annotation.pipeline import FEATURES, DocumentProcessor

    d = str(tmp_path_factory.mktemp("tagger_cache"))
    proc = DocumentProcessor(annotator, spm_model)
    texts = [t for _, t in itertools.islice(corpus.iter_documents(corpus.BUNDLED["train"]), N_DOCS)]
    docs, _ = proc.process(texts)
    shutil.copy(spm_model, os.path.join(d, "spm.model"))
    proc.pos_vocab.save(os.path.join(d, "vocab_pos.json"))
    proc.ner_vocab.save(os.path.join(d, "vocab_ner.json"))
    cache_lib.write_cache(d, [x for x in docs if x is not None], proc.vocab_sizes, features=FEATURES,
                          docs_per_shard=16,
                          extra={"spm_model": "spm.model", "spm_sha256": cache_lib.sha256_file(spm_model),
                                 "tokenization": "lime",
                                 "vocab_files": {"targets_pos": "vocab_pos.json", "targets_ner": "vocab_ner.json"}})
    return d


@pytest.fixture(scope="module")
def tagger_dir(cache_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tagger") / "t")
    train_tagger(cache_dir, out, TINY)
    return out


@pytest.fixture(scope="module")
def tagger(tagger_dir):
    return CausalTagger.load(tagger_dir)


def test_training_learns_the_oracle_tags(tagger, cache_dir):
    res = agreement.evaluate(tagger, cache_dir)
    _, _, docs = agreement.load_documents(cache_dir)
    pos_N = np.concatenate([d[1, :-1] for d in docs])
    majority = np.bincount(pos_N).max() / pos_N.size  # always answering the commonest POS tag
    assert res["documents"] == len(docs) and res["pieces"] == pos_N.size
    assert res["pos_agreement"] > majority + 0.1, (res, majority)
    assert res["ner_agreement"] > 0.8
    assert {"first_piece", "later_piece", "no_word", "word_last_piece"} <= set(res)
    words = sum(int(((d[3, :-1] >= 2) & (d[3, 1:] <= 2)).sum()) for d in docs)
    assert res["word_last_piece"]["pieces"] == words == sum(int((d[3] == 2).sum()) for d in docs)


def test_tags_are_valid_ids(tagger, cache_dir):
    _, vocabs, docs = agreement.load_documents(cache_dir, max_docs=5)
    tags = tagger.tag([d[0] for d in docs] + [np.zeros(0, np.int32)])
    assert tags[-1].shape == (2, 0)
    for d, t in zip(docs, tags):
        assert t.shape == (2, d.shape[1]) and t.dtype == np.int32
        assert t.min() >= 1 and (t[0] < vocabs["pos"].size).all() and (t[1] < vocabs["ner"].size).all()


def test_tags_at_i_do_not_depend_on_later_pieces(tagger):
    rng = np.random.default_rng(0)
    L = 150  # > seq_len 64: covers the split into chunks too
    seq = rng.integers(2, tagger.vocab_size, L).astype(np.int32)
    base = tagger.tag([seq])[0]
    for j in (0, 10, 63, 64, 100, L - 2):
        other = seq.copy()
        other[j + 1:] = rng.integers(2, tagger.vocab_size, L - j - 1)
        # The perturbed sequence rides in the same batch as the original and alone.
        together = tagger.tag([seq, other])
        alone = tagger.tag([other])[0]
        np.testing.assert_array_equal(together[0], base)
        np.testing.assert_array_equal(together[1][:, :j + 1], base[:, :j + 1])
        np.testing.assert_array_equal(alone[:, :j + 1], base[:, :j + 1])
    # A prefix is tagged as the start of the whole sequence, whatever its length bucket.
    for n in (1, 33, 64, 65):
        np.testing.assert_array_equal(tagger.tag([seq[:n]])[0], base[:, :n])


def test_packed_segments_equal_separate_rows(tagger):
    """Segment ids keep packed documents apart: each equals its own unpacked row."""
    model = TaggerModel(tagger.model_cfg, tagger.meta["tag_sizes"], rngs=nnx.Rngs(1))
    forward = nnx.jit(lambda m, *args: m(*args))
    rng = np.random.default_rng(1)
    a, b = rng.integers(2, 500, (1, 7)), rng.integers(2, 500, (1, 9))
    packed = np.concatenate([a, b, np.zeros((1, 4), int)], axis=1).astype(np.int32)
    seg = np.array([[1] * 7 + [2] * 9 + [0] * 4], np.int32)
    pos = np.array([list(range(7)) + list(range(9)) + [0] * 4], np.int32)
    pos_p, ner_p = forward(model, packed, seg, pos)
    for x, sl in ((a, slice(0, 7)), (b, slice(7, 16))):
        pos_x, ner_x = forward(model, x.astype(np.int32))
        np.testing.assert_allclose(pos_p[:, sl], pos_x, atol=1e-5)
        np.testing.assert_allclose(ner_p[:, sl], ner_x, atol=1e-5)


def test_tag_rejects_bad_pieces(tagger):
    with pytest.raises(ValueError, match=r"seqs\[1\]: piece ids must be in \[1, "):
        tagger.tag([np.array([5, 6]), np.array([5, 0, 6])])
    with pytest.raises(ValueError, match=r"seqs\[0\]: expected a 1-D integer array"):
        tagger.tag([np.ones((2, 3), np.int32)])


def _copy(src, dst, drop):
    shutil.copytree(src, dst)
    for rel in drop:
        path = os.path.join(dst, rel)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return str(dst)


def test_load_errors(tagger_dir, tagger, tmp_path, spm_model):
    with pytest.raises(TaggerDirError, match="does not exist"):
        CausalTagger.load(str(tmp_path / "nope"))
    with pytest.raises(TaggerDirError, match="tagger.json: missing.*training did not finish"):
        CausalTagger.load(_copy(tagger_dir, tmp_path / "a", ["tagger.json"]))
    with pytest.raises(TaggerDirError, match="checkpoint missing"):
        CausalTagger.load(_copy(tagger_dir, tmp_path / "b", ["checkpoints"]))
    with pytest.raises(TaggerDirError, match="vocab_ner.json: missing"):
        CausalTagger.load(_copy(tagger_dir, tmp_path / "c", ["vocab_ner.json"]))
    d = _copy(tagger_dir, tmp_path / "d", [])
    with open(os.path.join(d, "spm.model"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(TaggerDirError, match="spm.model: sha256 does not match"):
        CausalTagger.load(d)

    tagger.check_spm(spm_model)
    other = tmp_path / "other.model"
    other.write_bytes(open(spm_model, "rb").read() + b"\0")
    with pytest.raises(TaggerDirError, match=r"other.model: sha256 .* differs"):
        tagger.check_spm(str(other))

    from lime_jax.annotation.vocab import TagVocab, ner_vocab

    with pytest.raises(TaggerDirError, match=r"vocab_ner.json: .*'ner' vocabulary differs .*40 tags vs 22"):
        CausalTagger.load(tagger_dir, expected_vocabs={"ner": ner_vocab(scheme="types")})
    pos = tagger.vocabs["pos"]
    swapped = TagVocab("pos", (pos.labels[1], pos.labels[0]) + pos.labels[2:])
    with pytest.raises(TaggerDirError, match="same size, other labels or order"):
        tagger.check_vocabs({"pos": swapped})


def test_cli_round_trip(cache_dir, tmp_path, capsys):
    out = str(tmp_path / "cli_tagger")
    flags = ["--steps", "3", "--batch-size", "4", "--seq-len", "32", "--d-model", "16", "--n-layers", "1",
             "--n-heads", "2", "--d-ff", "16", "--log-every", "3"]
    assert cli.main(["tagger", "train", "--cache", cache_dir, "--out", out, *flags]) == 0
    meta = json.load(open(os.path.join(out, "tagger.json")))
    assert meta["seq_len"] == 32 and meta["model"]["d_model"] == 16 and meta["tokenization"] == "lime"
    assert meta["spm_sha256"] == cache_lib.sha256_file(os.path.join(cache_dir, "spm.model"))
    assert sorted(os.listdir(out)) == ["checkpoints", "spm.model", "tagger.json", "vocab_ner.json",
                                       "vocab_pos.json"]
    capsys.readouterr()
    assert cli.main(["tagger", "eval", "--tagger", out, "--cache", cache_dir, "--max-docs", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["documents"] == 3 and 0.0 <= res["pos_agreement"] <= 1.0
    # A second train into the same dir is refused; a missing cache is a clear error.
    assert cli.main(["tagger", "train", "--cache", cache_dir, "--out", out, *flags]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["tagger", "train", "--cache", cache_dir, "--out", out, "--overwrite", "--seed", "1",
                     *flags]) == 0
    assert json.load(open(os.path.join(out, "tagger.json")))["train"]["config"]["seed"] == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert cli.main(["tagger", "train", "--cache", cache_dir, "--out", str(tmp_path / "mine"), "--overwrite",
                     *flags]) == 2
    assert "which a tagger dir does not" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").exists()
    assert cli.main(["tagger", "eval", "--tagger", out, "--cache", str(tmp_path / "none")]) == 2
    assert "cache directory does not exist" in capsys.readouterr().err
    assert jax.device_count() == 8  # the tagger ran sharded over conftest's 8 CPU devices


def test_tagger_as_a_tag_source_for_show_and_retagging(tagger_dir, tagger, cache_dir, spm_model, tmp_path, capsys):
    """`--tags tagger:DIR` end to end: `show` prints its tags, `annotate --from-cache --tagger`
    writes them into a cache with the same pieces, and the manifest names the source."""
    import json

    from lime_jax.cli import annotate, show

    assert show.main(["--spm", spm_model, "--tagger", tagger_dir, "--json", "Congress shall act."]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["tag_source"] == f"tagger:{tagger_dir}"
    pos_ids = tagger.tag([np.asarray(rows["ids"][:-1], np.int32)])[0][0]
    assert rows["pos"][:-1] == [tagger.vocabs["pos"].tag(int(i)) for i in pos_ids]

    out = str(tmp_path / "retagged")
    assert annotate.main(["--from-cache", cache_dir, "--tagger", tagger_dir, "--out", out]) == 0
    docs, manifest = cache_lib.read_documents(out)
    src_docs, _ = cache_lib.read_documents(cache_dir)
    assert manifest["tag_source"] == f"tagger:{tagger_dir}" and manifest["tag_source_honest"]
    features = manifest["features"]
    rows_ = [features.index("targets_pos"), features.index("targets_ner")]
    for doc, src in zip(docs, src_docs):
        np.testing.assert_array_equal(doc[0], src[0])
        np.testing.assert_array_equal(doc[rows_, :-1], tagger.tag([src[0, :-1]])[0])
    # A SentencePiece model the tagger does not read is refused before any work.
    other = str(tmp_path / "other.model")
    with open(spm_model, "rb") as f, open(other, "wb") as g:  # + a protobuf field: parses, other bytes
        g.write(f.read() + b"\x1a\x02\x18\x00")
    assert show.main(["--spm", other, "--tags", f"tagger:{tagger_dir}", "Hi."]) == 1
    assert "sha256" in capsys.readouterr().err
