"""Self tags (lime_jax/inference/self_tags.py): decoding and scoring that feed a model its own
tag forecast equal a full forward pass over the tags they fed, and each fed tag is the forecast
of the position before."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lime_jax.ids import NONE_ID, PAD_ID
from lime_jax.inference import generate, self_tags
from lime_jax.model import Decoder, ModelConfig
from lime_jax.model.decode import IncrementalDecoder

META = (("pos", 9), ("ner", 6))


def _model(shift: int, heads_for=("pos", "ner")) -> Decoder:
    heads = tuple((n, s, shift + 1, 1.0) for n, s in META if n in heads_for)
    cfg = ModelConfig(vocab_size=40, d_model=32, d_ff=64, metadata=META, tag_heads=heads, dtype="float32")
    return Decoder(cfg, rngs=nnx.Rngs(3))


def _full_forward(model, ids, fed_KxN):
    tokens = jnp.asarray(np.array(ids, np.int32)[None])
    logits, heads = model.forward(tokens, {n: jnp.asarray(fed_KxN[k][None]) for k, (n, _) in enumerate(META)})
    return np.asarray(logits[0]), {h: np.asarray(v[0]) for h, v in heads.items()}


def _expected_fed(model, heads, shift, head_logits, n):
    """Tags position j must be fed: NONE/PAD at the start, then the forecast of position j-1."""
    fed = np.zeros((len(META), n), np.int32)
    for j in range(n):
        if j + shift <= 0:
            fed[:, j] = NONE_ID
        elif j == 0:
            fed[:, j] = PAD_ID
        else:
            fed[:, j] = self_tags.forecast({h: v[None, j - 1:j] for h, v in head_logits.items()}, heads, 1)[:, 0]
    return fed


@pytest.mark.parametrize("shift", [-1, 0, 1])
def test_self_decoding_is_a_forward_pass_over_its_own_forecasts(shift):
    model = _model(shift)
    heads = self_tags.forecast_heads(model.cfg, shift)
    inc = IncrementalDecoder(model)
    prompts = [np.array([5, 6, 7], np.int32), np.array([9], np.int32)]
    out = generate.decode_batch(inc, shift, prompts, [None, None], max_new=6, forecast_heads=heads)
    for prompt, dec in zip(prompts, out):
        ids = [0, *prompt.tolist(), *dec.ids]  # BOS first
        # The tags fed at each position are recovered from the pass itself: position j's tags are
        # the forecast at j-1, which depends only on positions < j (heads are causal).
        fed = np.zeros((len(META), len(ids)), np.int32)
        for _ in range(len(ids)):
            _, head_logits = _full_forward(model, ids, fed)
            fed = _expected_fed(model, heads, shift, head_logits, len(ids))
        logits, _ = _full_forward(model, ids, fed)
        # Greedy: every generated token is the argmax after its prefix.
        assert dec.ids == [int(np.argmax(logits[j])) for j in range(len(prompt), len(ids) - 1)]
        # Decoded.tags: what the model was fed for each generated token t_k (at position k - shift).
        for g, k in enumerate(range(len(prompt) + 1, len(ids))):
            if 0 <= k - shift < len(ids):
                np.testing.assert_array_equal(dec.tags[:, g], fed[:, k - shift])


def test_guide_dashes_are_forecast_and_a_model_without_heads_gets_pad():
    model = _model(1, heads_for=("pos",))  # no NER head: NER is PAD wherever it is not given
    heads = self_tags.forecast_heads(model.cfg, 1)
    assert heads == ["pos_ahead2", None]
    inc = IncrementalDecoder(model)
    guide = np.array([[3, generate.FORECAST_ID, 4], [2, generate.FORECAST_ID, 2]], np.int32)
    dec = generate.decode_batch(inc, 1, [np.array([5, 6], np.int32)], [np.array([[2, 3], [2, 2]], np.int32)],
                                max_new=3, guides=[guide], forecast_heads=heads)[0]
    assert dec.tags[:, 0].tolist() == [3, 2] and dec.tags[:, 2].tolist() == [4, 2]
    assert dec.tags[1, 1] == PAD_ID and dec.tags[0, 1] not in (PAD_ID, generate.FORECAST_ID)
    # A guide that starts with `-` after given prompt tags: the forecast made at the prompt's
    # next-to-last position (in the one-pass prefill), not PAD.
    dash_first = generate.decode_batch(inc, 1, [np.array([5, 6, 7], np.int32)], [np.array([[2, 3, 4], [2, 2, 2]], np.int32)],
                                       max_new=2, guides=[np.array([[generate.FORECAST_ID, 3], [generate.FORECAST_ID, 2]],
                                                                   np.int32)], forecast_heads=heads)[0]
    _, head_logits = _full_forward(model, [0, 5, 6, 7], np.array([[2, 3, 4, 0], [2, 2, 2, 0]], np.int32))
    expected = self_tags.forecast({h: v[None, 2:3] for h, v in head_logits.items()}, heads, 1)[:, 0]
    assert dash_first.tags[:, 0].tolist() == [int(expected[0]), PAD_ID]
    unheaded = generate.decode_batch(IncrementalDecoder(_model(1, heads_for=())), 1, [np.array([5, 6], np.int32)],
                                     [np.array([[2, 3], [2, 2]], np.int32)], max_new=3, guides=[guide])[0]
    assert unheaded.tags[:, 1].tolist() == [PAD_ID, PAD_ID]
    with pytest.raises(ValueError, match="ahead = 2"):
        self_tags.require_forecast(_model(1, heads_for=()).cfg, 1, "dir")


@pytest.mark.parametrize("shift", [0, 1])
def test_self_scoring_matches_a_forward_pass_over_the_fed_tags(shift):
    model = _model(shift)
    heads = self_tags.forecast_heads(model.cfg, shift)
    rng = np.random.default_rng(0)
    rows = []
    for n in (7, 4):
        targets = rng.integers(3, 40, n).astype(np.int32)
        rows.append({"targets": targets, "tokens": np.concatenate([[0], targets[:-1]]).astype(np.int32),
                     "head:pos_" + f"ahead{shift + 1}": rng.integers(1, 9, n).astype(np.int32)})
    scored = list(self_tags.score_self(IncrementalDecoder(model), shift, rows, 8, batch_rows=2))
    for row, (nll, hits, fed, head_hits) in zip(rows, scored):
        logits, head_logits = _full_forward(model, row["tokens"], fed)
        np.testing.assert_array_equal(fed, _expected_fed(model, heads, shift, head_logits, len(row["tokens"])))
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        np.testing.assert_allclose(nll, -logp[np.arange(len(nll)), row["targets"]], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(hits, np.argmax(logits, -1) == row["targets"])
        hid = f"pos_ahead{shift + 1}"
        pred = np.argmax(head_logits[hid][:, 1:], -1) + 1
        np.testing.assert_array_equal(head_hits[hid], (pred == row[f"head:{hid}"])[row[f"head:{hid}"] != PAD_ID])
