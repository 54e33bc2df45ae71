"""LimeEmbed and decoder: equivalences, causality, packing isolation, golden numbers, bad input."""
import ast
import json
import math
import os
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lime_jax.model import Decoder, ModelConfig, abstract_model, loss_and_metrics, synthetic_batch

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = pathlib.Path(__file__).parent / "golden" / "model_tiny.json"
META = (("pos", 53), ("ner", 40))
TINY = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                   metadata=META, dtype="float32")


def gin_config(name: str) -> ModelConfig:
    gin.clear_config()
    try:
        gin.parse_config_file(str(REPO / "gin" / "models" / f"{name}.gin"))
        return ModelConfig()
    finally:
        gin.clear_config()


@nnx.jit
def logits_of(model, batch):
    meta = {n: batch[f"decoder_input_{n}"] for n in model.cfg.metadata_names}
    return model(batch["decoder_input_tokens"], metadata=meta,
                 segment_ids=batch["decoder_segment_ids"], positions=batch["decoder_positions"])


@pytest.fixture(scope="module")
def lime():
    return Decoder(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
    return synthetic_batch(TINY, batch_size=4, length=16, seed=1, docs_per_row=2)


def test_tiny_gin_matches_test_config():
    assert gin_config("tiny") == TINY.baseline()


def test_zeroed_metadata_tables_equal_baseline(lime, batch):
    baseline = Decoder(TINY.baseline(), rngs=nnx.Rngs(5))
    _, tables, rest = nnx.split(lime, nnx.PathContains("tables"), ...)
    nnx.update(baseline, rest)  # every non-metadata weight from the LIME model
    graphdef, state = nnx.split(lime)
    zeroed = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "'tables'" in jax.tree_util.keystr(path) else x, state))
    assert float(jnp.abs(zeroed.embed.tables["pos"][...]).max()) == 0
    assert float(jnp.abs(lime.embed.tables["pos"][...]).max()) > 0
    base_batch = {k: v for k, v in batch.items() if k not in ("decoder_input_pos", "decoder_input_ner")}
    np.testing.assert_array_equal(logits_of(zeroed, batch), logits_of(baseline, base_batch))
    # ...and the tables do matter when not zeroed.
    assert not np.allclose(logits_of(lime, batch), logits_of(baseline, base_batch), atol=1e-3)
    assert baseline.param_overhead() == 0.0
    # PAD tags (padding; "no metadata" in unguided decoding) add nothing, whatever the tables hold.
    pad_batch = {**batch, "decoder_input_pos": jnp.zeros_like(batch["decoder_input_pos"]),
                 "decoder_input_ner": jnp.zeros_like(batch["decoder_input_ner"])}
    np.testing.assert_array_equal(logits_of(lime, pad_batch), logits_of(baseline, base_batch))


def test_same_seed_pairs_lime_with_the_baseline():
    """Metadata tables draw from their own stream: every other weight equals the baseline's."""
    lime_params = nnx.to_flat_state(nnx.state(Decoder(TINY, rngs=nnx.Rngs(3)), nnx.Param))
    base_params = dict(nnx.to_flat_state(nnx.state(Decoder(TINY.baseline(), rngs=nnx.Rngs(3)), nnx.Param)))
    tables = [path for path, _ in lime_params if "tables" in path]
    assert len(tables) == 2
    for path, var in lime_params:
        if "tables" not in path:
            np.testing.assert_array_equal(var[...], base_params[path][...], err_msg=str(path))
    assert len(base_params) == len(lime_params) - len(tables)
    # The tables themselves are distinct draws, and differ from the token table's rows.
    pos, ner = (dict(lime_params)[("embed", "tables", n)][...] for n in ("pos", "ner"))
    assert not np.allclose(pos[:40], ner)
    assert not np.allclose(pos, dict(lime_params)[("embed", "token")][...][:53])


def test_tag_change_is_causal_and_stays_in_its_document(lime, batch):
    base = np.asarray(logits_of(lime, batch))
    seg = batch["decoder_segment_ids"][0]
    first_doc_end = int(np.argmax(seg == 2))  # row 0 packs two documents, no padding
    t = first_doc_end // 2
    changed = {k: v.copy() for k, v in batch.items()}
    changed["decoder_input_pos"][0, t] = 2 if batch["decoder_input_pos"][0, t] != 2 else 3
    out = np.asarray(logits_of(lime, changed))
    diff_L = np.abs(out[0] - base[0]).max(-1)
    assert np.all(diff_L[:t] == 0), "a tag changed logits before its position"
    assert diff_L[t] > 0, "a tag did not change the logits at its own position"
    assert np.all(diff_L[t:first_doc_end] > 0)
    assert np.all(diff_L[first_doc_end:] == 0), "a tag in document 1 leaked into document 2"
    np.testing.assert_array_equal(out[1:], base[1:])

    # A token change in the second document never reaches the first.
    changed = {k: v.copy() for k, v in batch.items()}
    changed["decoder_input_tokens"][0, first_doc_end + 2] += 1
    out = np.asarray(logits_of(lime, changed))
    np.testing.assert_array_equal(out[0, :first_doc_end], base[0, :first_doc_end])
    assert np.abs(out[0, first_doc_end + 2] - base[0, first_doc_end + 2]).max() > 0


def test_positions_restart_per_document(lime, batch):
    # A document's logits do not depend on where it sits in the packed row.
    seg, L = batch["decoder_segment_ids"][0], batch["decoder_segment_ids"].shape[1]
    start = int(np.argmax(seg == 2))
    alone = {k: np.zeros_like(v) for k, v in batch.items()}
    for k in batch:
        alone[k][0, :L - start] = batch[k][0, start:]
    alone["decoder_segment_ids"][0, :L - start] = 1
    np.testing.assert_allclose(np.asarray(logits_of(lime, alone))[0, :L - start],
                               np.asarray(logits_of(lime, batch))[0, start:], rtol=1e-5, atol=1e-5)


def _grad_norms(model, batch):
    def objective(model):
        return loss_and_metrics(model, batch)

    (loss, metrics), grads = nnx.jit(nnx.value_and_grad(objective, has_aux=True))(model)
    norms = {"/".join(map(str, path)): float(jnp.linalg.norm(v[...]))
             for path, v in nnx.to_flat_state(grads)}
    total = math.sqrt(sum(n * n for n in norms.values()))
    return {"loss": float(loss), "num_tokens": float(metrics["num_tokens"]),
            "num_correct": float(metrics["num_correct"]), "grad_norm": total,
            "grad_norms": dict(sorted(norms.items()))}


def test_golden_loss_and_grad_norms(lime, batch):
    got = _grad_norms(lime, batch)
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"golden rewritten: {GOLDEN}; review its diff, then rerun without UPDATE_GOLDEN")
    how = ("tests/golden/model_tiny.json is stale or the model changed numerics; if the change is "
           "intended, regenerate with: UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_model.py -k golden")
    assert GOLDEN.exists(), how
    want = json.loads(GOLDEN.read_text())
    assert sorted(want["grad_norms"]) == sorted(got["grad_norms"]), how
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, err_msg=how)
    assert got["num_tokens"] == want["num_tokens"] and got["num_correct"] == want["num_correct"], how
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4, err_msg=how)
    for k, v in want["grad_norms"].items():
        np.testing.assert_allclose(got["grad_norms"][k], v, rtol=1e-4, atol=1e-7, err_msg=f"{k}: {how}")
    # Metadata tables get gradients (they are trained), and the loss is near ln(V) at init.
    assert got["grad_norms"]["embed/tables/pos"] > 0 and got["grad_norms"]["embed/tables/ner"] > 0
    assert abs(got["loss"] - math.log(TINY.vocab_size)) < 1.5


def test_lm_hits_are_argmax_hits(lime, batch):
    """`num_correct` compares each target's logit with the row max (no argmax pass): the same count
    as argmax == target. Half the targets are made the model's own argmax so there are hits."""
    top_BxL = np.asarray(jnp.argmax(logits_of(lime, batch), axis=-1))
    even_BxL = (np.arange(top_BxL.shape[1]) % 2 == 0)[None] & (batch["decoder_loss_weights"] > 0)
    batch = {**batch, "decoder_target_tokens": np.where(even_BxL, top_BxL, batch["decoder_target_tokens"])}
    _, m = loss_and_metrics(lime, batch)
    hits_BxL = np.asarray(jnp.argmax(logits_of(lime, batch), axis=-1)) == batch["decoder_target_tokens"]
    want = float(np.sum(hits_BxL * batch["decoder_loss_weights"]))
    assert float(m["num_correct"]) == want >= even_BxL.sum(), (m["num_correct"], want, even_BxL.sum())


def test_learned_weights_bf16_compute_and_untied_head():
    cfg = TINY.replace(n_layers=1, metadata_weight="learned", metadata_weight_init=0.5,
                       dtype="bfloat16", tie_embeddings=False)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    b = synthetic_batch(cfg, batch_size=2, length=8, seed=3)
    assert model.embed.weights["pos"][...].dtype == jnp.float32
    assert model.head[...].dtype == jnp.float32
    logits = logits_of(model, b)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 8, cfg.vocab_size)
    grads = nnx.jit(nnx.grad(lambda m: loss_and_metrics(m, b)[0]))(model)
    assert float(jnp.abs(grads.embed.weights["pos"][...])) > 0  # the weight is learned
    # The untied head never sees metadata: its gradient only depends on the final hidden state.
    assert set(nnx.to_flat_state(grads).to_nested_state()["embed"]) == {"token", "tables", "weights"}


@pytest.mark.parametrize("name,low,high", [("500m", 0.45e9, 0.6e9), ("1b", 0.9e9, 1.2e9),
                                           ("2b", 1.8e9, 2.2e9), ("quickstart", 1e6, 3e6)])
def test_size_configs_param_counts(name, low, high):
    cfg = gin_config(name).replace(metadata=META)
    _, abstract = abstract_model(cfg)  # jax.eval_shape only: nothing is allocated
    n = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(abstract))
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    assert model.param_count() == n
    overhead = model.param_overhead()
    print(f"{name}: {n / 1e6:.2f}M params, metadata overhead {100 * overhead:.4f}%")
    assert low <= n <= high
    assert overhead == (53 + 40) * cfg.d_model / n
    assert overhead < (0.02 if name == "quickstart" else 3e-4)


def _bad(batch, key, fn):
    out = {k: v.copy() for k, v in batch.items()}
    out[key] = fn(out[key])
    return out


def _set(value, at=(1, 3)):
    def f(a):
        a[at] = value
        return a
    return f


def _with_cfg(model, **changes):
    """`model`'s weights under a config with `changes` (switches that add no parameters)."""
    other = Decoder(model.cfg.replace(**changes), rngs=nnx.Rngs(1))
    nnx.update(other, nnx.state(model))
    return other


def test_out_of_range_ids_raise_eagerly_and_are_never_clipped(lime, batch):
    for value in (53, -1):
        with pytest.raises(ValueError, match=r"metadata 'pos': 1 id\(s\) outside \[0, 53\)"):
            loss_and_metrics(lime, _bad(batch, "decoder_input_pos", _set(value)))
    for value in (512, -1):
        with pytest.raises(ValueError, match=r"tokens: 1 id\(s\) outside \[0, 512\)"):
            loss_and_metrics(lime, _bad(batch, "decoder_input_tokens", _set(value)))
    with pytest.raises(ValueError, match=r"decoder_target_tokens: 1 id\(s\) outside \[0, 512\)"):
        loss_and_metrics(lime, _bad(batch, "decoder_target_tokens", _set(-1)))

    # Under jit (no host check) a bad id reads NaN: never a clipped row, nor the last row for
    # -1 (numpy-style wrapping). (1, 3) is a weighted, non-PAD position of the batch.
    assert batch["decoder_loss_weights"][1, 3] == 1 and batch["decoder_input_pos"][1, 3] > 0
    graphdef, state = nnx.split(lime)
    loss_fn = jax.jit(lambda state, batch: loss_and_metrics(nnx.merge(graphdef, state), batch)[0])
    assert np.isfinite(loss_fn(state, batch))
    for key, values in (("decoder_input_tokens", (512, -1)), ("decoder_input_pos", (53, -1)),
                        ("decoder_input_ner", (40, -1)), ("decoder_target_tokens", (512, -1))):
        for value in values:
            assert np.isnan(loss_fn(state, _bad(batch, key, _set(value)))), (key, value)


def test_check_ids_raises_under_jit_naming_the_feature(lime, batch):
    graphdef, state = nnx.split(_with_cfg(lime, check_ids=True))

    @jax.jit
    def grad_step(state, batch):  # the shape of the trainer's step: jit(value_and_grad(loss))
        return jax.value_and_grad(lambda s: loss_and_metrics(nnx.merge(graphdef, s), batch)[0])(state)

    for key, value, what in (("decoder_input_ner", 40, r"metadata 'ner': 1 id\(s\) outside \[0, 40\)"),
                             ("decoder_input_pos", -1, r"metadata 'pos': 1 id\(s\) outside \[0, 53\)"),
                             ("decoder_input_tokens", -1, r"tokens: 1 id\(s\) outside \[0, 512\)"),
                             ("decoder_target_tokens", 600, r"decoder_target_tokens: 1 id\(s\) outside")):
        with pytest.raises(Exception, match=what):
            jax.block_until_ready(grad_step(state, _bad(batch, key, _set(value))))
    loss, _ = grad_step(state, batch)
    assert np.isfinite(loss)


def test_z_loss_adds_its_term_to_the_objective_only(lime, batch):
    z = 0.01
    ce_loss, ce_metrics = loss_and_metrics(lime, batch)
    z_obj, z_metrics = loss_and_metrics(_with_cfg(lime, z_loss=z), batch)
    logits_BxLxV = np.asarray(logits_of(lime, batch), np.float64)
    logz_BxL = np.log(np.exp(logits_BxLxV).sum(-1))
    w_BxL = batch["decoder_loss_weights"]
    want = z * (logz_BxL ** 2 * w_BxL).sum() / w_BxL.sum()
    assert ce_metrics["z_loss"] == 0 and ce_loss == ce_metrics["loss"]
    assert z_metrics["loss"] == ce_metrics["loss"]  # the reported loss stays cross entropy
    np.testing.assert_allclose(z_obj - ce_loss, want, rtol=1e-5)
    np.testing.assert_allclose(z_metrics["z_loss"], want, rtol=1e-5)
    assert want > z  # mean logZ^2 is far from 0 at init (logZ is about ln V): the check has teeth


def test_model_package_imports_no_data_stack():
    # model/ must load without data/, SeqIO, TF or spaCy; sharding.py sits below the model.
    model_dir = REPO / "lime_jax" / "model"
    third_party = {"seqio", "tensorflow", "spacy", "grain", "sentencepiece", "apache_beam"}
    for path in sorted(model_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in third_party, f"{path.name} imports {name}"
                if name.startswith("lime_jax"):
                    assert name in ("lime_jax.ids", "lime_jax.features") or name.startswith("lime_jax.model"), \
                        f"{path.name} imports {name}"
                if path.name == "sharding.py":
                    assert not name.startswith("lime_jax.model"), f"sharding.py imports {name}"


def test_bad_shapes_dtypes_and_features(lime, batch):
    with pytest.raises(ValueError, match=r"metadata 'pos': expected shape \(4, 16\)"):
        loss_and_metrics(lime, _bad(batch, "decoder_input_pos", lambda a: a[:, :8]))
    with pytest.raises(TypeError, match=r"metadata 'ner': expected an integer array"):
        loss_and_metrics(lime, _bad(batch, "decoder_input_ner", lambda a: a.astype(np.float32)))
    with pytest.raises(TypeError, match=r"tokens: expected an integer array"):
        loss_and_metrics(lime, _bad(batch, "decoder_input_tokens", lambda a: a.astype(np.float32)))
    with pytest.raises(ValueError, match=r"tokens: expected shape \[batch, length\]"):
        lime(batch["decoder_input_tokens"][0], metadata={})
    with pytest.raises(ValueError, match=r"decoder_positions|positions: expected shape"):
        loss_and_metrics(lime, _bad(batch, "decoder_positions", lambda a: a[:, :3]))
    missing = {k: v for k, v in batch.items() if k != "decoder_input_ner"}
    with pytest.raises(ValueError, match=r"lacks metadata feature\(s\) \['decoder_input_ner'\]"):
        loss_and_metrics(lime, missing)
    with pytest.raises(ValueError, match=r"missing"):
        lime(batch["decoder_input_tokens"], metadata={"pos": batch["decoder_input_pos"]})
    extra = dict(batch, decoder_input_lemma=batch["decoder_input_pos"])
    with pytest.raises(ValueError, match=r"decoder_input_lemma"):
        loss_and_metrics(lime, extra)
    with pytest.raises(ValueError, match=r"unexpected metadata feature\(s\) \['lemma'\]"):
        lime(batch["decoder_input_tokens"], metadata={"pos": batch["decoder_input_pos"],
                                                      "ner": batch["decoder_input_ner"],
                                                      "lemma": batch["decoder_input_pos"]})
    with pytest.raises(ValueError, match=r"decoder_loss_weights"):
        loss_and_metrics(lime, {k: v for k, v in batch.items() if k != "decoder_loss_weights"})


def test_config_validation():
    with pytest.raises(ValueError, match="n_heads=6 must be a multiple of n_kv_heads=4"):
        TINY.replace(n_heads=6, n_kv_heads=4, head_dim=16)
    with pytest.raises(ValueError, match="duplicate table names"):
        TINY.replace(metadata=(("pos", 53), ("pos", 40)))
    with pytest.raises(ValueError, match="metadata_weight"):
        TINY.replace(metadata_weight="sometimes")
    with pytest.raises(TypeError, match="ModelConfig.dtype"):
        TINY.replace(dtype="int32")
    with pytest.raises(ValueError, match="ModelConfig.z_loss"):
        TINY.replace(z_loss=-1e-4)
    with pytest.raises(TypeError, match="ModelConfig.check_ids"):
        TINY.replace(check_ids="yes")
    assert TINY.replace(metadata=[["pos", 53]]).metadata == (("pos", 53),)  # gin/JSON lists
