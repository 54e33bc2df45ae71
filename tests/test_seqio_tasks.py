"""SeqIO tasks, the LIME feature converter, batches from a task or mixture (`seqio_source`) and
their agreement with the Grain loader, and the default registrations made by `import tasks`.

The only test module that imports seqio/TensorFlow (about 10 s): keep SeqIO tests here.
"""
import collections
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

import tasks  # noqa: E402  (registers the default tasks if a default cache exists)
from lime_jax.annotation import vocab as vocab_lib  # noqa: E402
from lime_jax.annotation.spm import train_spm  # noqa: E402
from lime_jax.data import cache, loader, packing, seqio_source, synthetic  # noqa: E402
from lime_jax.data.seqio_features import LimeLMFeatureConverter, input_tags_tf  # noqa: E402
from tasks import testing  # noqa: E402

POS, NER = testing.POS, testing.NER


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    words = "the of and to in a is that for it as was with be by on not he this are".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 12)) + f" {i} {i * 7}." for i in range(400)]
    return train_spm(iter(texts), str(tmp_path_factory.mktemp("spm") / "spm"), vocab_size=360)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, spm_model):
    """Random documents (EOS last, tags EOS there) in a cache, registered as `handmade_*`."""
    docs = testing.random_documents(30, 360, seed=1)
    d = str(tmp_path_factory.mktemp("corpus"))
    testing.write_cache_dir(d, docs, spm_model)
    names = tasks.register_corpus_tasks(d, name_prefix="handmade")
    return d, docs, names


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, spm_model):
    return testing.make_tiny_tasks(str(tmp_path_factory.mktemp("tiny")), spm_model)


def _batches(name, n=None, **kw):
    args = dict(split="train", seq_len=16, batch_size=4, shift=0, tags=("pos", "ner"), seed=0,
                shard_index=0, shard_count=1, shuffle=False, num_epochs=1)
    args.update(kw)
    it = seqio_source.seqio_batches(name, **args)
    return list(it) if n is None else [next(it) for _ in range(n)]


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w)
        for k in w:
            assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape, k
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)


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
    for ex, doc in zip(got, docs):  # append_eos puts back EOS (tag EOS), aligned in every stream
        for i, k in enumerate(["targets", "targets_pos", "targets_ner"]):
            np.testing.assert_array_equal(ex[k], doc[i])
    # With a sequence length, long documents are split (not trimmed): every token survives.
    pieces = list(task.get_dataset({"targets": 16}, shuffle=False).as_numpy_iterator())
    assert sum(len(p["targets"]) for p in pieces) == sum(doc.shape[1] for doc in docs)
    assert max(len(p["targets"]) for p in pieces) == 16


def test_tag_vocabulary():
    v = tasks.TagVocabulary(NER)
    assert (v.pad_id, v.eos_id, v.vocab_size) == (0, 2, 40)
    ids = v.encode("O B-PERSON I-PERSON <none> O")
    assert ids == [3, NER.id("B-PERSON"), NER.id("I-PERSON"), 1, 3]
    assert v.decode(ids) == "O B-PERSON I-PERSON <none> O"  # NONE (whitespace) does not cut
    assert v.decode([3, 2, 3]) == "O <eos>"  # EOS does, as in SentencePiece vocabularies
    import tensorflow as tf

    np.testing.assert_array_equal(v.encode_tf(tf.constant("O B-DATE")).numpy(),
                                  [3, NER.id("B-DATE")])
    assert v.decode_tf(tf.constant([3, 1])).numpy() == b"O <none>"
    with pytest.raises(ValueError, match="unknown ner tag 'X-Y'"):
        v.encode("O X-Y")
    assert v == tasks.TagVocabulary(vocab_lib.ner_vocab()) != tasks.TagVocabulary(POS)


def test_converter_unpacked_and_hand_made_shift():
    import tensorflow as tf

    ex = {"targets": [5, 6, 7, 1], "targets_pos": [20, 21, 22, 2], "targets_ner": [30, 31, 32, 2]}
    ds = tf.data.Dataset.from_tensors({k: tf.constant(v, tf.int32) for k, v in ex.items()})
    # LIME+1's last input carries EOS's tag (2); BOS and outside the segment carry NONE (1).
    want = {0: [1, 20, 21, 22], 1: [20, 21, 22, 2], -1: [1, 1, 20, 21]}
    for shift, pos in want.items():
        out = next(LimeLMFeatureConverter(shift=shift, pack=False)(
            ds, {"targets": 6}).as_numpy_iterator())
        assert out["decoder_input_pos"].tolist() == pos + [0, 0]
        assert out["decoder_target_tokens"].tolist() == [5, 6, 7, 1, 0, 0]
        assert out["decoder_loss_weights"].tolist() == [1, 1, 1, 1, 0, 0]


def test_corpus_task_rejects_mismatched_vocab(tmp_path, spm_model, corpus):
    _, docs, _ = corpus
    # A types-only NER vocabulary (22 ids) over documents tagged with BIO ids (up to 39).
    testing.write_cache_dir(str(tmp_path), docs, spm_model,
                            ner=vocab_lib.ner_vocab(scheme="types"))
    with pytest.raises(cache.CacheError, match="feature 'targets_ner'"):
        cache.verify_cache(str(tmp_path), check_records=True)
    with pytest.raises(cache.CacheError, match="'vocab_sizes.targets_ner'.*size 22.*asks for 40"):
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
    testing.write_cache_dir(str(tmp_path), docs, spm_model, pos=pos, ner=ner,
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
        assert ex["targets"][-1] == 1 and ex["targets_pos"][-1] == ex["targets_ner"][-1] == 2  # EOS, tag EOS
        assert w["answer"].strip() in spm.decode(ex["targets"].tolist())
        assert (ex["targets_pos"][:-1] >= 1).all() and (ex["targets_ner"] < ner.size).all()
    mixed = seqio.get_dataset(mixtures[1], {"targets": 32}, tasks.feature_converter(mixtures[1]),
                              dataset_split="train", shuffle=True, seed=0, num_epochs=1)
    batch = next(mixed.as_numpy_iterator())
    assert batch["decoder_input_pos"].shape == (32,) and tasks.TASK_SHIFTS[mixtures[1]] == 1
    # The registered mixture as a run's MIXTURE_OR_TASK_NAME: addition examples reach batches.
    train = seqio.get_mixture_or_task("t_addition_lime_plus1").get_dataset(
        None, split="train", shuffle=False)
    additions = {tuple(ex["targets"].tolist()) for ex in train.as_numpy_iterator()}
    it = seqio_source.seqio_batches(mixtures[1], split="train", seq_len=32, batch_size=2,
                                    shift=1, tags=("pos", "ner"), seed=0, shard_index=0,
                                    shard_count=1, shuffle=True, num_epochs=None)
    pieces = set()
    for _ in range(4):
        b = next(it)
        assert all(v.shape == (2, 32) and v.dtype == np.int32 for v in b.values())
        for r in range(2):
            seg = b["decoder_segment_ids"][r]
            pieces |= {tuple(b["decoder_target_tokens"][r][seg == s].tolist())
                       for s in np.unique(seg[seg > 0])}
    assert pieces & additions


@pytest.mark.parametrize("shift", [0, 1, -1])
def test_tf_input_tags_equal_numpy(shift):
    rng = np.random.default_rng(shift + 5)
    for n in [0, 1, 2, 3, 7, 16]:
        tags = rng.integers(1, 50, n).astype(np.int32)
        np.testing.assert_array_equal(input_tags_tf(tags, shift).numpy(),
                                      packing.input_tags(tags, shift), err_msg=f"length {n}")


@pytest.mark.parametrize("shift,shard_count", [(0, 1), (1, 1), (-1, 1), (1, 2)])
def test_task_batches_equal_grain_batches(corpus, shift, shard_count):
    """Same cache, unshuffled: the SeqIO path gives the loader's batches, every one of an epoch
    (same pieces in the same order, packed by the same packer)."""
    d, _, _ = corpus
    for shard_index in range(shard_count):
        want = list(loader.build_dataset(d, 16, 4, shift=shift, shuffle=False, num_epochs=1,
                                         shard_index=shard_index, shard_count=shard_count))
        got = _batches("handmade_lime", shift=shift, shard_index=shard_index,
                       shard_count=shard_count)
        _assert_same_batches(got, want)
    baseline = _batches("handmade_lime", n=1, tags=())[0]
    assert sorted(baseline) == sorted(k for k in want[0] if not k.startswith("decoder_input_")
                                      or k == "decoder_input_tokens")


def test_mixture_batches_are_deterministic_and_mix_both_tasks(tiny):
    kw = dict(shuffle=True, num_epochs=None, seed=3)
    first = _batches(tiny.mixtures[0], n=6, **kw)
    _assert_same_batches(_batches(tiny.mixtures[0], n=6, **kw), first)
    other = _batches(tiny.mixtures[0], n=6, **{**kw, "seed": 4})
    assert any((a["decoder_target_tokens"] != b["decoder_target_tokens"]).any()
               for a, b in zip(first, other))
    # Pieces are recognisable by their first tokens: both tasks' documents appear.
    firsts = {part: {tuple(doc[0, :3]) for doc in docs} for part, docs in tiny.docs.items()}
    seen = collections.Counter()
    for b in first:
        starts = (b["decoder_positions"] == 0) & (b["decoder_segment_ids"] > 0)
        for r, c in zip(*np.nonzero(starts)):
            piece = tuple(b["decoder_target_tokens"][r, c:c + 3])
            seen.update(part for part, f in firsts.items() if piece in f)
    assert seen["a"] > 0 and seen["b"] > 0
    for b in first:
        assert all(v.shape == (4, 16) and v.dtype == np.int32 for v in b.values())


def test_state_restore_gives_the_same_next_batches(tiny, tmp_path):
    """JSON state at any point resumes exactly, also inside a partly consumed block of packed
    rows; it goes through the trainer's `data` item (data_state's handler) as the loader's does,
    as this process's one data shard: another process count is refused, naming the cause."""
    import orbax.checkpoint as ocp

    from lime_jax.trainer import data_state
    from lime_jax.trainer.config import ConfigError

    kw = dict(split="train", seq_len=16, batch_size=4, shift=1, tags=("pos", "ner"), seed=7,
              shard_index=0, shard_count=1, shuffle=True, num_epochs=None)
    reference = _batches(tiny.mixtures[1], n=30, **kw)
    it = seqio_source.seqio_batches(tiny.mixtures[1], **kw)
    for k in range(25):
        if k in (3, 20):
            state = json.loads(json.dumps(it.get_state()))
            fresh = seqio_source.seqio_batches(tiny.mixtures[1], **kw)
            fresh.set_state(state)
            _assert_same_batches([next(fresh) for _ in range(3)], reference[k:k + 3])
        next(it)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mgr:
        mgr.save(25, args=ocp.args.Composite(data=data_state.ShardStateSave(data_state.as_sharded(it, 0, 1))))
        mgr.wait_until_finished()

    def restore(process_count):
        fresh = seqio_source.seqio_batches(tiny.mixtures[1], **kw)
        with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mgr:
            return mgr.restore(25, args=ocp.args.Composite(data=data_state.ShardStateRestore(
                data_state.as_sharded(fresh, 0, process_count))))["data"]

    restored = restore(1)
    _assert_same_batches([next(restored) for _ in range(5)], reference[25:])
    # Process 0 of 2: SeqIO reads one shard per process, so data_shards cannot help.
    with pytest.raises(ConfigError, match=r"1 data shards; this run's SeqIO input \(MIXTURE_OR_TASK_NAME\) reads "
                                          r"one shard per process, 2 here.*resume on 1 process\(es\) "
                                          r"\(process_dataset.data_shards applies to a CACHE_DIR input only\)"):
        restore(2)


def test_seqio_batches_errors_name_the_problem(corpus):
    with pytest.raises(ValueError, match="'no_such_task' is not registered; import"):
        _batches("no_such_task", n=1)
    with pytest.raises(ValueError, match="has no split 'test'"):
        _batches("handmade_lime", n=1, split="test")
    with pytest.raises(ValueError, match=r"needs features \['targets_lemma'\]"):
        _batches("handmade_lime", n=1, tags=("pos", "lemma"))


def _default_caches(root, spm_model, heldout_ner=NER):
    """`root/sotu_train` and `root/sotu_heldout`, each with its own copy of `spm_model`."""
    testing.write_cache_dir(os.path.join(root, "sotu_train"),
                            testing.random_documents(5, 360, seed=0), spm_model)
    testing.write_cache_dir(os.path.join(root, "sotu_heldout"),
                            testing.random_documents(3, 360, seed=1), spm_model, ner=heldout_ner)


def test_default_tasks_accept_copies_of_one_vocabulary(tmp_path, spm_model, caplog):
    _default_caches(str(tmp_path), spm_model)
    assert os.path.join(tmp_path, "sotu_train", "spm.model") != spm_model
    with caplog.at_level(logging.WARNING, logger="tasks"):
        names = tasks.register_defaults(str(tmp_path))
    assert not caplog.records
    assert {"sotu_lime", "sotu_lime_plus1", "sotu_and_addition_lime"} <= set(names)
    task = seqio.get_mixture_or_task("sotu_lime")
    assert set(task.splits) == {"train", "validation"}
    assert len(list(task.get_dataset(None, split="validation", shuffle=False))) == 3


@pytest.mark.parametrize("damage", ["other_ner_vocab", "heldout_manifest", "train_spm_missing",
                                    "absent"])
def test_default_tasks_skip_odd_caches_with_a_warning(tmp_path, spm_model, caplog, damage):
    root = str(tmp_path)
    if damage != "absent":
        _default_caches(root, spm_model, heldout_ner=vocab_lib.ner_vocab(scheme="types")
                        if damage == "other_ner_vocab" else NER)
    if damage == "heldout_manifest":
        with open(os.path.join(root, "sotu_heldout", "manifest.json"), "w") as f:
            f.write("{ not json")
    if damage == "train_spm_missing":
        os.remove(os.path.join(root, "sotu_train", "spm.model"))
    with caplog.at_level(logging.WARNING, logger="tasks"):
        names = tasks.register_defaults(root)
    messages = " | ".join(r.getMessage() for r in caplog.records)
    if damage == "absent":
        assert names == [] and not caplog.records
    elif damage == "train_spm_missing":
        assert names == []
        assert "sotu_train" in messages and "field 'spm_model'" in messages
        assert "holds no usable sotu_train/" in messages
    else:
        assert "sotu_lime" in names
        assert set(seqio.get_mixture_or_task("sotu_lime").splits) == {"train"}
        want = ("vocabularies of other content for ['targets_ner']"
                if damage == "other_ner_vocab" else "manifest.json: not valid JSON")
        assert "not registering split 'validation'" in messages and want in messages


def test_import_tasks_survives_an_odd_cache(tmp_path, spm_model):
    """The original failure: `import tasks` raising over the cache named by LIME_JAX_CACHE_DIR."""
    root = str(tmp_path)
    _default_caches(root, spm_model)
    shutil.rmtree(os.path.join(root, "sotu_heldout"))
    os.makedirs(os.path.join(root, "sotu_heldout"))  # an interrupted build: no manifest
    env = {**os.environ, "LIME_JAX_CACHE_DIR": root}
    out = subprocess.run([sys.executable, "-c", "import tasks; print(tasks.DEFAULT_TASKS)"],
                         env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'sotu_lime'" in out.stdout
    assert "not registering split 'validation'" in out.stderr
    assert "manifest not found" in out.stderr


def _mixture_run(model_dir: str, mixture: str, vocab_size: int, stop_after_steps=None) -> list[float]:
    from lime_jax.trainer import metrics as metrics_lib
    from lime_jax.trainer import train as train_lib

    train_lib.train(["runs/lime.gin"], [
        f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 5", f"MIXTURE_OR_TASK_NAME = '{mixture}'",
        "SEQ_LEN = 32", "BATCH_SIZE = 8", "CHECKPOINT_EVERY = 5", f"ModelConfig.vocab_size = {vocab_size}",
        "ModelConfig.d_model = 32", "ModelConfig.d_ff = 64", "ModelConfig.n_layers = 1", "ModelConfig.n_heads = 2",
        "ModelConfig.n_kv_heads = 1", "ModelConfig.dtype = 'float32'", "TrainConfig.log_every = 1",
        "TrainConfig.progress = False"], stop_after_steps=stop_after_steps)
    rows = metrics_lib.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_trainer_trains_from_a_seqio_mixture_and_resumes_exactly(tiny, spm_model, tmp_path):
    """MIXTURE_OR_TASK_NAME instead of CACHE_DIR: 5 steps from a registered mixture, and a run
    stopped after 3 steps resumes from its checkpointed SeqIO iterator onto the same batches."""
    import seqio

    vocab_size = seqio.SentencePieceVocabulary(spm_model).vocab_size
    whole = _mixture_run(str(tmp_path / "whole"), tiny.mixtures[0], vocab_size)
    assert len(whole) == 5 and all(np.isfinite(whole))
    split_dir = str(tmp_path / "split")
    assert _mixture_run(split_dir, tiny.mixtures[0], vocab_size, stop_after_steps=3) == whole[:3]
    np.testing.assert_array_equal(_mixture_run(split_dir, tiny.mixtures[0], vocab_size), whole)
