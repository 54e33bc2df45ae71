"""Tag-prediction heads (lime_jax/model/heads.py): causality, loss wiring, targets, paired init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lime_jax.data import packing
from lime_jax.features import target_feature
from lime_jax.model import Decoder, ModelConfig, loss_and_metrics, synthetic_batch
from lime_jax.model.heads import check_causal

META = (("pos", 12), ("ner", 7))


def _cfg(shift_heads_ahead: int, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=32, d_ff=64, metadata=META, dtype="float32",
                       tag_heads=(("pos", 12, shift_heads_ahead, 1.0), ("ner", 7, shift_heads_ahead, 0.5)), **kw)


@pytest.mark.parametrize("shift", [0, 1])
def test_a_head_never_sees_the_tag_it_predicts(shift):
    """Head `ahead = shift + 1` at position i predicts the tag of token i+ahead, which the model is
    fed at position i+ahead-shift = i+1: perturbing it moves nothing at <= i, but does move i+1."""
    ahead = shift + 1
    model = Decoder(_cfg(ahead), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    B, L = 2, 10
    tokens = jnp.asarray(rng.integers(3, 64, (B, L)), jnp.int32)
    meta = {n: rng.integers(2, s, (B, L)).astype(np.int32) for n, s in META}
    _, heads = model.forward(tokens, {k: jnp.asarray(v) for k, v in meta.items()})
    for i in range(L - 1):
        fed_at = i + ahead - shift  # where the tag of token i+ahead enters
        for name, size in META:
            bumped = {k: v.copy() for k, v in meta.items()}
            bumped[name][:, fed_at] = 2 + (bumped[name][:, fed_at] - 1) % (size - 2)
            _, moved = model.forward(tokens, {k: jnp.asarray(v) for k, v in bumped.items()})
            for hid in heads:
                np.testing.assert_array_equal(np.asarray(moved[hid][:, :i + 1]), np.asarray(heads[hid][:, :i + 1]))
                assert not np.allclose(np.asarray(moved[hid][:, fed_at]), np.asarray(heads[hid][:, fed_at]))


def test_leaky_heads_are_refused():
    check_causal(_cfg(1).tag_heads, shift=0, has_tables=True)
    check_causal(_cfg(0).tag_heads, shift=0, has_tables=False)  # aux: no metadata inputs
    with pytest.raises(ValueError, match=r"pos_ahead1.*ahead >= 2"):
        check_causal(_cfg(1).tag_heads, shift=1, has_tables=True)
    with pytest.raises(ValueError, match="ahead must be"):
        ModelConfig(tag_heads=(("pos", 12, -1, 1.0),))
    with pytest.raises(ValueError, match="duplicate"):
        ModelConfig(tag_heads=(("pos", 12, 1, 1.0), ("pos", 12, 1, 2.0)))


def test_loss_adds_each_head_weighted_and_reports_its_accuracy():
    cfg = _cfg(1)
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(cfg, 3, 24, seed=2).items()}
    objective, m = loss_and_metrics(model, batch)
    _, lm_only = loss_and_metrics(Decoder(cfg.replace(tag_heads=()), rngs=nnx.Rngs(1)),
                                  {k: v for k, v in batch.items() if not k.startswith("decoder_target_pos_")
                                   and not k.startswith("decoder_target_ner_")})
    np.testing.assert_allclose(float(m["loss"]), float(lm_only["loss"]), rtol=1e-6)  # heads leave the LM alone

    _, heads = model.forward(batch["decoder_input_tokens"], {n: batch[f"decoder_input_{n}"] for n, _ in META},
                             batch["decoder_segment_ids"], batch["decoder_positions"])
    expected = float(m["loss"])
    for name, _, ahead, weight in cfg.tag_heads:
        hid, tags = f"{name}_ahead{ahead}", np.asarray(batch[target_feature(name, ahead)])
        w = np.asarray(batch["decoder_loss_weights"]) * (tags != 0)
        logp = np.asarray(jax.nn.log_softmax(heads[hid]))
        nll = -np.take_along_axis(logp, tags[..., None], -1)[..., 0]
        ce = (nll * w).sum() / w.sum()
        hits = ((np.argmax(logp[..., 1:], -1) + 1 == tags) * w).sum()  # a prediction is never PAD
        np.testing.assert_allclose(float(m[f"{hid}/loss"]), ce, rtol=1e-5)
        assert float(m[f"{hid}/num_tags"]) == w.sum() and float(m[f"{hid}/num_correct"]) == hits
        expected += weight * ce
    np.testing.assert_allclose(float(objective), expected, rtol=1e-5)

    grads = nnx.grad(lambda mdl: loss_and_metrics(mdl, batch)[0])(model)
    assert all(float(jnp.abs(g[...]).sum()) > 0 for g in grads.tag_heads.kernels.values())


def test_heads_come_from_their_own_stream():
    with_heads = Decoder(_cfg(1), rngs=nnx.Rngs(7))
    without = Decoder(_cfg(1).replace(tag_heads=()), rngs=nnx.Rngs(7))
    a = dict(nnx.to_flat_state(nnx.state(with_heads, nnx.Param)))
    b = dict(nnx.to_flat_state(nnx.state(without, nnx.Param)))
    assert sorted(set(a) - set(b)) == [("tag_heads", "kernels", "ner_ahead1"), ("tag_heads", "kernels", "pos_ahead1")]
    for k in b:
        np.testing.assert_array_equal(np.asarray(a[k][...]), np.asarray(b[k][...]))
    overhead = with_heads.param_overhead()
    assert overhead > without.param_overhead()
    assert overhead * with_heads.param_count() == pytest.approx(sum(s * 32 for _, s in META) * 2)


@pytest.mark.parametrize("ahead", [0, 1, 2, 3])
def test_head_targets_are_the_shifted_tags_with_pad_outside(ahead):
    tags = np.array([5, 6, 7, 8, 1], np.int32)  # the last is the EOS piece's tag
    got = packing.head_targets(tags, ahead)
    tokens = np.concatenate([[-1], tags])  # token j's tag; t_0 = BOS has none
    for i in range(len(tags)):
        j = i + ahead
        assert got[i] == (tokens[j] if 1 <= j <= len(tags) else 0)
    cols = packing.piece_columns(np.stack([np.arange(10, 15), tags, tags]).astype(np.int32), [1], 0, [(2, ahead)])
    np.testing.assert_array_equal(cols[:, 3], got)
