"""The Grain loader: shifts, packing integrity, determinism, sharding, Orbax state, bad caches."""
import collections
import copy
import os

import numpy as np
import pytest

from lime_jax.data import cache, loader, packing

SIZES = {"targets": 1_000_000, "targets_pos": 53, "targets_ner": 40}
NONE = 1


def make_docs(n, max_len=40, seed=0):
    """Documents whose tokens are unique (doc i: 1000*i + position) and whose tags vary."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(1, max_len))
        docs.append(np.stack([
            1000 * (i + 1) + np.arange(length),
            rng.integers(1, 53, length), rng.integers(1, 40, length)]).astype(np.int32))
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cache"))
    docs = make_docs(60)
    cache.write_cache(d, docs, SIZES, docs_per_shard=16)
    return d, docs


def build(d, **kw):
    args = dict(seq_len=32, batch_size=4, seed=0, shard_index=0, shard_count=1, read_threads=2)
    args.update(kw)
    return loader.build_dataset(d, **args)


def segments(batch, tags=("pos", "ner")):
    """Every packed segment as (targets, inputs, {tag: inputs}) and checks within-row layout."""
    out = []
    for r in range(batch["decoder_target_tokens"].shape[0]):
        seg_ids = batch["decoder_segment_ids"][r]
        assert (batch["decoder_loss_weights"][r] == (seg_ids > 0)).all()
        for s in np.unique(seg_ids[seg_ids > 0]):
            idx = np.nonzero(seg_ids == s)[0]
            assert (np.diff(idx) == 1).all(), "a segment is not contiguous"
            np.testing.assert_array_equal(batch["decoder_positions"][r, idx], np.arange(len(idx)))
            out.append((batch["decoder_target_tokens"][r, idx],
                        batch["decoder_input_tokens"][r, idx],
                        {t: batch[f"decoder_input_{t}"][r, idx] for t in tags}))
        pad = seg_ids == 0
        for k, v in batch.items():
            assert (v[r, pad] == 0).all(), f"{k} not 0 on padding"
    return out


def expected_inputs(tags, shift):
    """Contract: position i sees tags of target i - 1 + shift, NONE outside the segment."""
    n = len(tags)
    return np.array([tags[i - 1 + shift] if 0 <= i - 1 + shift < n else NONE for i in range(n)])


@pytest.mark.parametrize("shift", [-1, 0, 1, 2])
def test_input_tags_follow_the_contract(shift):
    rng = np.random.default_rng(shift + 1)
    for n in range(1, 7):
        tags_KxN = rng.integers(2, 50, (2, n))
        got = packing.input_tags(tags_KxN, shift)
        for k in range(2):
            np.testing.assert_array_equal(got[k], expected_inputs(tags_KxN[k], shift))


def test_batch_keys_shapes(corpus):
    d, _ = corpus
    batch = next(iter(build(d)))
    assert sorted(batch) == sorted([
        "decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
        "decoder_positions", "decoder_loss_weights", "decoder_input_pos", "decoder_input_ner"])
    for v in batch.values():
        assert v.shape == (4, 32) and v.dtype == np.int32
    baseline = next(iter(build(d, tags=())))
    assert "decoder_input_pos" not in baseline


def test_shifts_on_hand_made_documents(tmp_path):
    # doc A: 3 tokens; doc B: 5 tokens, split at seq_len 4 into pieces of 4 and 1.
    a = np.array([[11, 12, 13], [21, 22, 23], [31, 32, 33]], np.int32)
    b = np.array([[41, 42, 43, 44, 45], [2, 3, 4, 5, 6], [7, 8, 9, 10, 11]], np.int32)
    cache.write_cache(str(tmp_path), [a, b], SIZES)
    want = {
        0: {11: [1, 21, 22], 41: [1, 2, 3, 4], 45: [1]},
        1: {11: [21, 22, 23], 41: [2, 3, 4, 5], 45: [6]},
        -1: {11: [1, 1, 21], 41: [1, 1, 2, 3], 45: [1]},
    }
    for shift, by_first in want.items():
        ds = build(str(tmp_path), seq_len=4, batch_size=2, shift=shift, shuffle=False, num_epochs=1)
        segs = [s for batch in ds for s in segments(batch)]
        assert sorted(int(t[0]) for t, _, _ in segs) == [11, 41, 45]
        for targets, inputs, tags in segs:
            np.testing.assert_array_equal(inputs, np.r_[0, targets[:-1]])  # BOS then shift
            np.testing.assert_array_equal(tags["pos"], by_first[int(targets[0])])
            np.testing.assert_array_equal(tags["ner"], np.where(
                tags["pos"] == NONE, NONE, tags["pos"] + (10 if targets[0] == 11 else 5)))


@pytest.mark.parametrize("shift", [0, 1, -1])
def test_epoch_over_two_processes_keeps_every_document_intact(corpus, shift):
    d, docs = corpus
    seq_len = 16
    by_first = {}
    for p in range(2):
        for batch in build(d, seq_len=seq_len, shift=shift, num_epochs=1, seed=3,
                           shard_index=p, shard_count=2):
            for targets, inputs, tags in segments(batch):
                assert (targets != 0).all() and (tags["pos"] != 0).all()
                assert int(targets[0]) not in by_first, "a piece was repeated"
                by_first[int(targets[0])] = (targets, inputs, tags)
    expected = {}
    for doc in docs:
        for start in range(0, doc.shape[1], seq_len):
            piece = doc[:, start:start + seq_len]
            expected[int(piece[0, 0])] = piece
    assert sorted(by_first) == sorted(expected), "a piece was skipped or invented"
    for first, piece in expected.items():
        targets, inputs, tags = by_first[first]
        np.testing.assert_array_equal(targets, piece[0])
        np.testing.assert_array_equal(inputs, np.r_[0, piece[0, :-1]])
        np.testing.assert_array_equal(tags["pos"], expected_inputs(piece[1], shift))
        np.testing.assert_array_equal(tags["ner"], expected_inputs(piece[2], shift))


def test_processes_get_disjoint_documents(corpus):
    d, _ = corpus
    seen = []
    for p in range(2):
        firsts = {int(t[0]) // 1000 for b in build(d, num_epochs=1, shard_index=p, shard_count=2)
                  for t, _, _ in segments(b)}
        seen.append(firsts)
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 60


def test_same_seed_same_batches_and_reshuffle_per_epoch(corpus):
    d, _ = corpus

    def take(ds, n):
        it = iter(ds)
        return [next(it) for _ in range(n)]

    a, b, c = take(build(d, seed=7), 6), take(build(d, seed=7), 6), take(build(d, seed=8), 6)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["decoder_target_tokens"], y["decoder_target_tokens"])
               for x, y in zip(a, c))
    # Two epochs: every document twice, in a different order the second time.
    order = [int(t[0]) // 1000 for batch in build(d, num_epochs=2, seq_len=64)
             for t, _, _ in segments(batch)]
    counts = collections.Counter(order)
    assert set(counts.values()) == {2} and len(counts) == 60
    assert order[:60] != order[60:]


def test_orbax_save_restore_continues_exactly(corpus, tmp_path):
    """Through the trainer's `data` item (data_state's handler), as a checkpoint holds it."""
    import orbax.checkpoint as ocp

    from lime_jax.trainer import data_state

    d, _ = corpus
    k, n = 5, 9
    reference = list(zip(range(n), iter(build(d, shift=1))))
    it = iter(build(d, shift=1))
    for _ in range(k):
        next(it)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mgr:
        mgr.save(k, args=ocp.args.Composite(data=data_state.ShardStateSave(data_state.as_sharded(it, 0, 1))))
        mgr.wait_until_finished()
    fresh = iter(build(d, shift=1))
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mgr:
        restored = mgr.restore(k, args=ocp.args.Composite(
            data=data_state.ShardStateRestore(data_state.as_sharded(fresh, 0, 1))))["data"]
    for step in range(k, n):
        batch = next(restored)
        for key in batch:
            np.testing.assert_array_equal(batch[key], reference[step][1][key])


def test_finite_epoch_pads_last_batch(corpus):
    d, docs = corpus
    batches = list(build(d, num_epochs=1, batch_size=8, seq_len=64))
    assert all(b["decoder_target_tokens"].shape == (8, 64) for b in batches)
    assert sum(int(b["decoder_loss_weights"].sum()) for b in batches) == sum(
        x.shape[1] for x in docs)


@pytest.mark.parametrize("damage", ["truncate", "manifest", "vocab", "tags"])
def test_bad_cache_fails_before_any_batch(tmp_path, damage):
    d = str(tmp_path)
    cache.write_cache(d, make_docs(10), SIZES, docs_per_shard=4)
    expected = None
    if damage == "truncate":
        path = os.path.join(d, "shard-00001.array_record")
        data = open(path, "rb").read()
        open(path, "wb").write(data[:1000])
        match = "shard-00001.array_record"
    elif damage == "manifest":
        cache.write_cache(d + "/other", make_docs(3), SIZES)
        os.replace(os.path.join(d, "other", "manifest.json"), os.path.join(d, "manifest.json"))
        match = "manifest.json: field 'shards'"
    elif damage == "vocab":
        expected = {**SIZES, "targets_pos": 50}
        match = "manifest.json: field 'vocab_sizes.targets_pos'"
    else:
        match = r"manifest.json: field 'features'.*\['dep'\]"
    with pytest.raises(cache.CacheError, match=match):
        build(d, expected_vocab_sizes=expected, tags=("dep",) if damage == "tags" else None)


@pytest.mark.slow
def test_worker_processes_and_restore(corpus):
    d, _ = corpus
    it = iter(build(d, worker_count=2))
    try:
        for _ in range(4):
            next(it)
        state = copy.deepcopy(it.get_state())
        after = [next(it) for _ in range(3)]
    finally:
        it.close()
    fresh = iter(build(d, worker_count=2))
    try:
        fresh.set_state(state)
        for want in after:
            got = next(fresh)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    finally:
        fresh.close()
