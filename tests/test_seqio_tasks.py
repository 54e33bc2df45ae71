"""SeqIO tasks, the LIME feature converter, and agreement with the Grain loader.

The only test module that imports seqio/TensorFlow (about 10 s): keep SeqIO tests here.
"""
import os

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

import tasks  # noqa: E402  (registers the default tasks if a default cache exists)
from lime_jax.data import cache, loader, synthetic  # noqa: E402
from lime_jax.data.seqio_features import LimeLMFeatureConverter  # noqa: E402
from lime_jax.annotation import vocab as vocab_lib  # noqa: E402
from lime_jax.annotation.spm import train_spm  # noqa: E402

POS = vocab_lib.pos_vocab([f"P{i}" for i in range(50)])
NER = vocab_lib.ner_vocab()


def _write_cache(d, docs, spm_model, vocabs=(POS, NER), extra=None):
    vocab_sizes = {"targets": 360, "targets_pos": vocabs[0].size, "targets_ner": vocabs[1].size}
    os.makedirs(d, exist_ok=True)
    with open(spm_model, "rb") as src, open(os.path.join(d, "spm.model"), "wb") as dst:
        dst.write(src.read())
    vocabs[0].save(os.path.join(d, "vocab_pos.json"))
    vocabs[1].save(os.path.join(d, "vocab_ner.json"))
    cache.write_cache(d, docs, vocab_sizes, docs_per_shard=7, extra={
        "spm_model": "spm.model", "tokenization": "lime", **(extra or {}),
        "vocab_files": {"targets_pos": "vocab_pos.json", "targets_ner": "vocab_ner.json"}})


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    words = "the of and to in a is that for it as was with be by on not he this are".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 12)) + f" {i} {i * 7}." for i in range(400)]
    return train_spm(iter(texts), str(tmp_path_factory.mktemp("spm") / "spm"), vocab_size=360)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, spm_model):
    """Hand-made documents (EOS last, tags NONE there) with unique first tokens per piece."""
    rng = np.random.default_rng(1)
    docs = []
    for _ in range(30):
        n = int(rng.integers(2, 45))
        doc = np.stack([rng.integers(3, 300, n), rng.integers(2, 52, n), rng.integers(1, 39, n)])
        doc[:, -1] = 1  # EOS, tags NONE
        docs.append(doc.astype(np.int32))
    d = str(tmp_path_factory.mktemp("corpus"))
    _write_cache(d, docs, spm_model)
    names = tasks.register_corpus_tasks(d, name_prefix="handmade")
    return d, docs, names


def _segments(batch_rows, tags=("pos", "ner")):
    """Sorted list of per-segment tuples (targets, inputs, tag inputs...) from packed rows."""
    out = []
    for row in batch_rows:
        seg = row["decoder_segment_ids"]
        for s in np.unique(seg[seg > 0]):
            m = seg == s
            assert (row["decoder_target_tokens"][m] != 0).all()
            out.append(tuple(tuple(row[k][m].tolist()) for k in
                             ["decoder_target_tokens", "decoder_input_tokens",
                              "decoder_positions"] + [f"decoder_input_{t}" for t in tags]))
    return sorted(out)


@pytest.mark.parametrize("suffix,shift", [("lime", 0), ("lime_plus1", 1)])
def test_seqio_and_grain_pack_the_same_segments(corpus, suffix, shift):
    d, docs, _ = corpus
    name = f"handmade_{suffix}"
    conv = tasks.feature_converter(name)
    assert conv.shift == shift and tasks.TASK_SHIFTS[name] == shift
    ds = seqio.get_dataset(name, {"targets": 16}, conv, shuffle=False)
    seqio_rows = list(ds.as_numpy_iterator())
    grain_rows = []
    for batch in loader.build_dataset(d, 16, 4, shift=shift, shuffle=False, num_epochs=1,
                                      shard_index=0, shard_count=1):
        grain_rows += [{k: v[r] for k, v in batch.items()} for r in range(4)]
    seqio_segs, grain_segs = _segments(seqio_rows), _segments(grain_rows)
    assert seqio_segs == grain_segs
    assert len(seqio_segs) == sum(-(-doc.shape[1] // 16) for doc in docs)


def test_task_reproduces_the_cache(corpus):
    d, docs, names = corpus
    assert names == ["handmade_lime", "handmade_lime_plus1"]
    task = seqio.get_mixture_or_task("handmade_lime")
    got = list(task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
    assert len(got) == len(docs)
    for ex, doc in zip(got, docs):  # append_eos puts back EOS / NONE, aligned in every stream
        for i, k in enumerate(["targets", "targets_pos", "targets_ner"]):
            np.testing.assert_array_equal(ex[k], doc[i])
    # With a sequence length, long documents are split (not trimmed): every token survives.
    pieces = list(task.get_dataset({"targets": 16}, shuffle=False).as_numpy_iterator())
    assert sum(len(p["targets"]) for p in pieces) == sum(doc.shape[1] for doc in docs)
    assert max(len(p["targets"]) for p in pieces) == 16


def test_tag_vocabulary():
    v = tasks.TagVocabulary(NER)
    assert (v.pad_id, v.eos_id, v.vocab_size) == (0, 1, 39)
    ids = v.encode("O B-PERSON I-PERSON <none> O")
    assert ids == [2, NER.id("B-PERSON"), NER.id("I-PERSON"), 1, 2]
    assert v.decode(ids) == "O B-PERSON I-PERSON <none> O"  # NONE (= EOS) does not cut
    import tensorflow as tf

    np.testing.assert_array_equal(v.encode_tf(tf.constant("O B-DATE")).numpy(),
                                  [2, NER.id("B-DATE")])
    assert v.decode_tf(tf.constant([2, 1])).numpy() == b"O <none>"
    with pytest.raises(ValueError, match="unknown ner tag 'X-Y'"):
        v.encode("O X-Y")
    assert v == tasks.TagVocabulary(vocab_lib.ner_vocab()) != tasks.TagVocabulary(POS)


def test_converter_unpacked_and_hand_made_shift():
    import tensorflow as tf

    ex = {"targets": [5, 6, 7, 1], "targets_pos": [20, 21, 22, 1], "targets_ner": [30, 31, 32, 1]}
    ds = tf.data.Dataset.from_tensors({k: tf.constant(v, tf.int32) for k, v in ex.items()})
    want = {0: [1, 20, 21, 22], 1: [20, 21, 22, 1], -1: [1, 1, 20, 21]}
    for shift, pos in want.items():
        out = next(LimeLMFeatureConverter(shift=shift, pack=False)(
            ds, {"targets": 6}).as_numpy_iterator())
        assert out["decoder_input_pos"].tolist() == pos + [0, 0]
        assert out["decoder_target_tokens"].tolist() == [5, 6, 7, 1, 0, 0]
        assert out["decoder_loss_weights"].tolist() == [1, 1, 1, 1, 0, 0]


def test_corpus_task_rejects_mismatched_vocab(tmp_path, spm_model, corpus):
    _, docs, _ = corpus
    # A types-only NER vocabulary (21 ids) over documents tagged with BIO ids (up to 38).
    _write_cache(str(tmp_path), docs, spm_model, vocabs=(POS, vocab_lib.ner_vocab(scheme="types")))
    with pytest.raises(cache.CacheError, match="feature 'targets_ner'"):
        cache.verify_cache(str(tmp_path), check_records=True)
    with pytest.raises(cache.CacheError, match="'vocab_sizes.targets_ner'.*size 21.*asks for 39"):
        loader.build_dataset(str(tmp_path), 16, 2, shard_index=0, shard_count=1,
                             expected_vocab_sizes={"targets_ner": NER.size})
    os.remove(tmp_path / "vocab_pos.json")
    with pytest.raises(cache.CacheError, match=r"manifest.json: field 'vocab_files.targets_pos'"):
        tasks.register_corpus_tasks(str(tmp_path), name_prefix="broken")


def test_generators_are_deterministic():
    a = synthetic.addition_examples(30, seed=3)
    assert a == synthetic.addition_examples(30, seed=3) != synthetic.addition_examples(30, seed=4)
    for ex in a:
        x, y = map(int, ex["prompt"].removeprefix("Q: What is ").removesuffix("?\nA:").split(" + "))
        assert ex["answer"] == f" {x + y}" and ex["text"] == ex["prompt"] + ex["answer"]
        assert len(str(x)) == ex["digits"] and ex["carries"] == synthetic.count_carries(x, y)
    assert synthetic.count_carries(348, 275) == 2
    r = synthetic.reasoning_examples(10, seed=0)
    assert r == synthetic.reasoning_examples(10, seed=0)
    for ex in r:
        assert ex["answer"] in ex["choices"] and len(set(ex["choices"])) == len(ex["choices"])
        assert ex["prompt"].startswith("Q: ") and ex["prompt"].endswith("\nA:")
    transfer = next(ex for ex in r if ex["template"] == "transfer")
    have, give = [int(w) for w in transfer["prompt"].split() if w.isdigit()][0::2]
    assert transfer["answer"] == f" {have - give}"


@pytest.mark.slow
def test_synthetic_tasks_annotated_with_the_pipeline(tmp_path, spm_model, corpus):
    from lime_jax.annotation.annotator import DEFAULT_SPACY_MODEL, SpacyAnnotator

    _, docs, _ = corpus
    pos, ner = SpacyAnnotator().vocabularies()
    _write_cache(str(tmp_path), docs, spm_model, vocabs=(pos, ner),
                 extra={"spacy": {"model": DEFAULT_SPACY_MODEL, "ner_scheme": "bio"}})
    tasks.register_corpus_tasks(str(tmp_path), name_prefix="spacycache")
    names = tasks.register_synthetic_tasks(str(tmp_path), name_prefix="t_",
                                           splits={"train": (0, 8), "validation": (1, 4)})
    assert names == ["t_addition", "t_addition_lime_plus1", "t_reasoning",
                     "t_reasoning_lime_plus1"]
    mixtures = tasks.register_mixtures("spacycache", "t_", addition_rate=0.5)
    task = seqio.get_mixture_or_task("t_addition")
    exs = list(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
    want = synthetic.addition_examples(4, seed=1)
    spm = task.output_features["targets"].vocabulary
    for ex, w in zip(exs, want):
        assert ex["prompt"].decode() == w["prompt"] and ex["answer"].decode() == w["answer"]
        assert len(ex["targets"]) == len(ex["targets_pos"]) == len(ex["targets_ner"])
        assert ex["targets"][-1] == 1 and ex["targets_pos"][-1] == ex["targets_ner"][-1] == 1
        assert w["answer"].strip() in spm.decode(ex["targets"].tolist())
        assert (ex["targets_pos"][:-1] >= 1).all() and (ex["targets_ner"] < ner.size).all()
    mixed = seqio.get_dataset(mixtures[1], {"targets": 32}, tasks.feature_converter(mixtures[1]),
                              dataset_split="train", shuffle=True, seed=0, num_epochs=1)
    batch = next(mixed.as_numpy_iterator())
    assert batch["decoder_input_pos"].shape == (32,) and tasks.TASK_SHIFTS[mixtures[1]] == 1
