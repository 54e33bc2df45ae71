"""Sharded evaluation and generation: a loaded run's parameters stay on the devices with the
training shardings, and after set-up an eval batch or a decoding step moves only its inputs and
results, explicitly (checked under `jax.transfer_guard("disallow")`); results equal those of the
same run on one device."""
import dataclasses
import logging
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lime_jax.data import cache as cache_lib
from lime_jax.evaluation import evaluate
from lime_jax.inference import generate, model_dir, self_tags
from lime_jax.model import ModelConfig, abstract_model, decode, sharding
from lime_jax.trainer import state as state_lib

V = 64
TRAIN_MESH = (2, 2, 2)  # every mesh axis splits something: batch (data x fsdp), embed, heads/vocab/mlp
CFG = ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, tie_embeddings=False,
                  metadata=(("pos", 7), ("ner", 4)), tag_heads=(("pos", 7, 1, 1.0),), dtype="float32")


def _doc(rng, n: int) -> np.ndarray:
    """[targets, pos, ner, subword_index], EOS last."""
    return np.stack([np.append(rng.integers(2, V, n - 1), 1), np.append(rng.integers(3, 7, n - 1), 2),
                     np.append(rng.integers(3, 4, n - 1), 2), np.append(rng.integers(2, 4, n - 1), 1)]).astype(np.int32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A model dir trained, as its config says, on a (2, 2, 2) mesh; random parameters."""
    root = tmp_path_factory.mktemp("sharded")
    rng = np.random.default_rng(0)
    cache_dir = str(root / "heldout")
    cache_lib.write_cache(cache_dir, [_doc(rng, n) for n in (12, 9, 7)],
                          {"targets": V, "targets_pos": 7, "targets_ner": 4, "subword_index": 66},
                          features=("targets", "targets_pos", "targets_ner", "subword_index"),
                          extra={"spm_model": "spm.model"})
    _, abstract = abstract_model(CFG)
    params = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 0.3).astype(np.float32), abstract)
    out = str(root / "run")
    model_dir.save_model_dir(out, CFG, params, step=5, seq_len=8, batch_size=4, cache_dir=cache_dir,
                             eval_cache_dir=cache_dir, mesh_shape=TRAIN_MESH)
    return out


@pytest.fixture(scope="module")
def sharded(run_dir):
    return model_dir.load(run_dir)


@pytest.fixture(scope="module")
def single(run_dir):
    return model_dir.load(run_dir, mesh=sharding.make_mesh((1, 1, 1)))


def _on_devices(x, mesh) -> bool:
    return isinstance(x, jax.Array) and x.sharding.device_set == set(mesh.devices.flat)


def test_load_restores_every_param_with_its_training_sharding(sharded, single):
    mesh = sharded.mesh
    assert dict(mesh.shape) == dict(zip(sharding.MESH_AXES, TRAIN_MESH))
    # What the trainer shards the params of this config by (trainer/state.py), on this mesh.
    _, abstract = abstract_model(CFG)
    want = nnx.to_flat_state(state_lib.train_state_shardings(
        state_lib.TrainState(abstract, (), None, None), mesh, sharding.DEFAULT_RULES).params)
    got = nnx.to_flat_state(nnx.state(sharded.model))
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, var), (_, want_var) in zip(got, want):
        value = var.get_value()
        assert isinstance(value, jax.Array), path
        assert value.sharding == want_var.get_value(), path
    specs = {"/".join(map(str, p)): v.get_value().sharding.spec for p, v in got}
    assert specs["embed/token"] == PartitionSpec("tensor", "fsdp")
    assert specs["blocks/0/attn/wq"] == PartitionSpec("fsdp", "tensor", None)
    assert specs["blocks/0/mlp/w_down"] == PartitionSpec("tensor", "fsdp")
    assert specs["embed/tables/pos"] == PartitionSpec(None, None)
    assert specs["tag_heads/kernels/pos_ahead1"] == PartitionSpec("fsdp", None)
    # The values are the saved ones.
    reference = nnx.to_flat_state(nnx.state(single.model))
    for (path, var), (_, ref) in zip(got, reference):
        np.testing.assert_array_equal(*jax.device_get((var.get_value(), ref.get_value())), err_msg=str(path))


def test_inference_mesh_keeps_what_fits_of_the_training_mesh(sharded, caplog):
    run, devices = sharded.run, jax.devices()
    for train_mesh, n, want in [((2, 2, 2), 8, (2, 2, 2)), ((2, 2, 2), 4, (1, 2, 2)), ((-1, 1, 1), 8, (8, 1, 1)),
                                ((1, 16, 1), 8, (1, 8, 1)), ((8, 1, 2), 1, (1, 1, 1))]:
        with caplog.at_level(logging.WARNING, "lime_jax.inference.model_dir"):
            mesh = model_dir.inference_mesh(dataclasses.replace(run, mesh_shape=train_mesh), devices[:n])
        assert tuple(mesh.shape.values()) == want, train_mesh
    assert not caplog.records


@pytest.mark.parametrize("train_mesh, n, want, why", [
    ((1, -1, 1), 3, (3, 1, 1), "'embed'.*size 32.*3 devices"),  # d_model over fsdp=3: data only
    ((1, -1, 1), 6, (3, 2, 1), "'embed'.*size 32.*6 devices"),  # the largest fsdp that divides 32
    ((4, 4, 4), 8, (1, 4, 2), "'heads'.*size 2.*4 devices"),  # 2 KV heads over tensor=4: less tensor
])
def test_inference_mesh_falls_back_to_a_mesh_the_params_divide_over(sharded, caplog, train_mesh, n, want, why):
    run = dataclasses.replace(sharded.run, mesh_shape=train_mesh)
    with caplog.at_level(logging.WARNING, "lime_jax.inference.model_dir"):
        mesh = model_dir.inference_mesh(run, jax.devices()[:n])
    assert tuple(mesh.shape.values()) == want
    assert caplog.records and caplog.records[0].getMessage().endswith(f"restoring them onto mesh {want} instead")
    assert re.search(why, caplog.records[0].getMessage())


def test_an_fsdp_run_loads_and_scores_on_6_devices(run_dir, tmp_path, single):
    """A (1, -1, 1) run restored on 6 devices: fsdp=6 does not divide d_model, fsdp=2 does."""
    fsdp_dir = _with_config_lines(run_dir, tmp_path, "TrainConfig.mesh_shape = (1, -1, 1)")
    mesh = model_dir.inference_mesh(model_dir.read_run_config(fsdp_dir), jax.devices()[:6])
    loaded = model_dir.load(fsdp_dir, mesh=mesh)
    assert dict(loaded.mesh.shape) == {"data": 3, "fsdp": 2, "tensor": 1}
    assert nnx.state(loaded.model)["embed"]["token"].get_value().sharding.spec == PartitionSpec("tensor", "fsdp")
    rows = _rows(np.random.default_rng(6), 6, 8)
    scored = list(evaluate.Scorer(loaded, 6).score(rows, 8))
    for (nll, hits), (want_nll, want_hits) in zip(scored, evaluate.Scorer(single, 6).score(rows, 8), strict=True):
        np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(hits, want_hits)


def test_a_batch_runs_split_or_on_one_replica_of_the_same_buffers(sharded):
    full, one_row = sharded.placement(4), sharded.placement(1)
    assert full.mesh is sharded.mesh and full.batch_sharding.spec == PartitionSpec(("data", "fsdp"))
    assert full.model is not one_row.model and sharded.placement(8) is full
    # One row cannot split over data x fsdp: it runs on the devices of data index 0, which hold
    # one copy of the (fsdp, tensor)-split parameters, replicated over what is left.
    assert dict(one_row.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    assert set(one_row.mesh.devices.flat) == set(sharded.mesh.devices[0].flat)
    assert one_row.batch_sharding.spec == PartitionSpec(None)
    assert sharded.placement(2).batch_sharding.spec == PartitionSpec(("data", "fsdp"))  # fsdp splits 2 there
    for x, view in zip(jax.tree.leaves(nnx.state(sharded.model)), jax.tree.leaves(nnx.state(one_row.model)),
                       strict=True):
        assert view.sharding.spec == x.sharding.spec
        pointers = {s.device: s.data.unsafe_buffer_pointer() for s in x.addressable_shards}
        assert all(pointers[s.device] == s.data.unsafe_buffer_pointer() for s in view.addressable_shards)


def _with_config_lines(run_dir, tmp_path, *lines: str) -> str:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    with open(out / "config.gin", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(out)


def test_load_follows_the_runs_own_rules_and_mesh(run_dir, tmp_path):
    rules = (("batch", "data"), ("vocab", "tensor"), ("embed", None), ("mlp", "tensor"), ("heads", "tensor"))
    loaded = model_dir.load(_with_config_lines(run_dir, tmp_path, f"sharding_rules.rules = {rules!r}",
                                               "TrainConfig.mesh_shape = (4, 1, 2)"))
    assert dict(loaded.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    state = nnx.state(loaded.model)
    assert state["embed"]["token"].get_value().sharding.spec == PartitionSpec("tensor", None)
    assert state["blocks"][0]["attn"]["wq"].get_value().sharding.spec == PartitionSpec(None, "tensor", None)
    assert loaded.placement(4).batch_sharding.spec == PartitionSpec("data")


@pytest.mark.parametrize("line, message", [
    ("TrainConfig.mesh_shape = (2, 2)", r"config.gin: TrainConfig.mesh_shape must be 3 sizes"),
    ("sharding_rules.rules = (('batch', 'nope'),)", r"config.gin: sharding_rules.rules: .*unknown mesh axis 'nope'"),
])
def test_bad_mesh_or_rules_in_config_gin_name_the_field(run_dir, tmp_path, line, message):
    with pytest.raises(model_dir.ModelDirError, match=message):
        model_dir.load(_with_config_lines(run_dir, tmp_path, line))


@pytest.fixture(scope="module")
def xla_scores(sharded):
    """The run's own (xla) scores of `_rows(rng 5)` in batches of 4 and of 3 rows."""
    rows = _rows(np.random.default_rng(5), 8, 8)
    return {b: list(evaluate.Scorer(sharded, b).score(rows, 8)) for b in (4, 3)}


@pytest.mark.parametrize("trained", ["splash", "pallas_gpu", "cudnn"])
def test_a_kernel_not_native_here_scores_with_xla(run_dir, tmp_path, xla_scores, caplog, trained):
    """On CPU a TPU or GPU kernel would be emulated (splash cannot even tile seq_len=8); the
    loaded model computes with "xla" instead, the same numbers as a run trained with it."""
    with caplog.at_level(logging.INFO, "lime_jax.inference.model_dir"):
        loaded = model_dir.load(_with_config_lines(run_dir, tmp_path, f"ModelConfig.attention = {trained!r}"))
    assert loaded.cfg.attention == loaded.model.cfg.attention == loaded.placement(3).model.cfg.attention == "xla"
    assert any(f"attention 'xla' on cpu (trained with {trained!r}" in r.getMessage() for r in caplog.records)
    rows = _rows(np.random.default_rng(5), 8, 8)
    for batch_rows in (4, 3):
        got = list(evaluate.Scorer(loaded, batch_rows).score(rows, 8))
        for (nll, hits), (want_nll, want_hits) in zip(got, xla_scores[batch_rows], strict=True):
            np.testing.assert_array_equal(nll, want_nll)
            np.testing.assert_array_equal(hits, want_hits)


def test_inference_attention_keeps_a_kernel_only_where_it_runs_natively():
    for impl, backend, want in [("splash", "tpu", "splash"), ("splash", "gpu", "xla"), ("splash", "cpu", "xla"),
                                ("pallas_gpu", "gpu", "pallas_gpu"), ("pallas_gpu", "tpu", "xla"),
                                ("cudnn", "gpu", "xla"), ("xla", "tpu", "xla")]:
        assert model_dir.inference_attention(impl, backend) == want, (impl, backend)


def test_a_mesh_the_params_do_not_split_over_is_a_clear_error(run_dir):
    with pytest.raises(model_dir.ModelDirError, match=r"config.gin: the parameters do not shard over mesh.*heads"):
        model_dir.load(run_dir, mesh=sharding.make_mesh((1, 1, 8)))  # 4 heads over tensor=8


def _rows(rng, n_rows: int, length: int) -> list[dict]:
    rows = []
    for r in range(n_rows):
        n = length - r % 3  # ragged rows, padded by the scorer
        rows.append({"tokens": rng.integers(2, V, n).astype(np.int32),
                     "targets": rng.integers(2, V, n).astype(np.int32),
                     "segments": np.ones(n, np.int32), "positions": np.arange(n, dtype=np.int32),
                     "pos": rng.integers(1, 7, n).astype(np.int32), "ner": rng.integers(1, 4, n).astype(np.int32),
                     "head:pos_ahead1": rng.integers(0, 7, n).astype(np.int32)})
    return rows


@pytest.mark.parametrize("batch_rows", [4, 3])  # split over data x fsdp = 4, or replicated
def test_an_eval_batch_moves_only_its_rows_and_results(sharded, single, batch_rows):
    rows = _rows(np.random.default_rng(batch_rows), 2 * batch_rows, 8)
    scorer = evaluate.Scorer(sharded, batch_rows)
    list(scorer.score_with_heads(rows, 8))  # set-up: compiles
    with jax.transfer_guard("disallow"):
        scored = list(scorer.score_with_heads(rows, 8))
    expected = list(evaluate.Scorer(single, batch_rows).score_with_heads(rows, 8))
    for (nll, hits, heads), (want_nll, want_hits, want_heads) in zip(scored, expected, strict=True):
        np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(hits, want_hits)
        assert heads.keys() == want_heads.keys() == {"pos_ahead1"}
        np.testing.assert_array_equal(heads["pos_ahead1"], want_heads["pos_ahead1"])


@pytest.mark.parametrize("batch, cache_batch_axes", [(4, ("data", "fsdp")), (1, None)])  # split, or one replica
def test_a_generation_step_moves_only_its_tokens_and_results(sharded, single, batch, cache_batch_axes):
    rng = np.random.default_rng(batch)
    P = 5
    prompt = rng.integers(2, V, (batch, P)).astype(np.int32)
    prompt[:, 0] = 0
    valid = np.ones((batch, P), bool)
    valid[-1, :2] = False  # left padding
    prompt_meta = {"pos": rng.integers(1, 7, (batch, P)).astype(np.int32),
                   "ner": rng.integers(1, 4, (batch, P)).astype(np.int32)}
    step = rng.integers(2, V, (batch, 1)).astype(np.int32)
    step_meta = {"pos": rng.integers(1, 7, (batch, 1)).astype(np.int32),
                 "ner": rng.integers(1, 4, (batch, 1)).astype(np.int32)}
    out = {}
    for name, loaded in (("sharded", sharded), ("single", single)):
        inc = loaded.decoder
        placement = loaded.placement(batch)
        cache = inc.init_cache(batch, P + 4)
        if loaded is sharded:  # the KV cache is split like the activations: batch and KV heads
            assert cache["k"].sharding.mesh is placement.mesh
            assert cache["k"].sharding.spec == PartitionSpec(None, cache_batch_axes, None, "tensor", None)
            assert cache["valid"].sharding.spec == PartitionSpec(cache_batch_axes, None)
            assert cache["pos"].sharding.spec == PartitionSpec(cache_batch_axes)
        created = {k: v.sharding for k, v in cache.items() if isinstance(v, jax.Array)}
        _, _, cache = inc.extend(cache, prompt, prompt_meta, valid, heads=True)  # set-up: the prefill
        tokens_d, meta_d = jax.device_put((step, step_meta), placement.batch_sharding)
        key = jax.device_put(jax.random.key(7), NamedSharding(placement.mesh, PartitionSpec()))
        before = cache
        with jax.transfer_guard("disallow"):
            logits, heads, cache = inc.extend(cache, tokens_d, meta_d, heads=True)
            last_BxV = jax.lax.index_in_dim(logits, -1, axis=1, keepdims=False)
            greedy = inc.sample(last_BxV, key)
            drawn = inc.sample(last_BxV, key, temperature=0.8, top_k=5, top_p=0.9)
            out[name] = jax.device_get((logits, heads, greedy, drawn))
        assert all(_on_devices(x, placement.mesh) for x in jax.tree.leaves(cache) if isinstance(x, jax.Array))
        # Each step returns the cache sharded as it was made, so the donated one was written in place.
        for k, x in created.items():
            assert cache[k].sharding.is_equivalent_to(x, cache[k].ndim), (k, cache[k].sharding, x)
        assert before["k"].is_deleted() and before["v"].is_deleted()
        assert _on_devices(logits, placement.mesh)
    (logits, heads, greedy, drawn), (want_logits, want_heads, want_greedy, want_drawn) = out["sharded"], out["single"]
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(heads["pos_ahead1"], want_heads["pos_ahead1"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(greedy, want_greedy)
    np.testing.assert_array_equal(drawn, want_drawn)


def test_cache_dims_the_mesh_does_not_divide_stay_whole():
    mesh = sharding.make_mesh((2, 1, 4))  # batch over data x fsdp = 2; tensor = 4 > CFG's 2 KV heads
    split, whole = (decode.cache_shardings(CFG, b, 16, mesh, sharding.DEFAULT_RULES) for b in (4, 3))
    assert split["k"].spec == split["v"].spec == PartitionSpec(None, ("data", "fsdp"), None, None, None)
    assert (split["valid"].spec, split["pos"].spec) == (PartitionSpec(("data", "fsdp"), None),
                                                       PartitionSpec(("data", "fsdp")))
    assert whole["k"].spec == PartitionSpec(None, None, None, None, None)
    assert (whole["valid"].spec, whole["pos"].spec, whole["index"].spec) == (PartitionSpec(None, None),
                                                                             PartitionSpec(None), PartitionSpec())
    cache = decode.init_cache(CFG, 3, 16, mesh=mesh, rules=sharding.DEFAULT_RULES)
    assert {k: v.sharding for k, v in cache.items() if isinstance(v, jax.Array)} == whole
    assert not np.asarray(cache["valid"]).any() and int(cache["index"]) == cache["host_index"] == 0


@pytest.mark.slow
def test_decoding_and_self_scoring_on_the_mesh_equal_one_device(sharded, single):
    heads = self_tags.forecast_heads(CFG, 0)
    prompts = [np.array([5, 6, 7], np.int32), np.array([9], np.int32)]
    rows = _rows(np.random.default_rng(3), 3, 6)
    out = {}
    for name, loaded in (("sharded", sharded), ("single", single)):
        decoded = generate.decode_batch(loaded.decoder, 0, prompts, [None, None], 4, forecast_heads=heads)
        scored = list(self_tags.score_self(loaded.decoder, 0, rows, 6, batch_rows=2))
        out[name] = decoded, scored
    (decoded, scored), (want_decoded, want_scored) = out["sharded"], out["single"]
    for got, want in zip(decoded, want_decoded, strict=True):
        assert got.ids == want.ids and got.stopped_at_eos == want.stopped_at_eos
        np.testing.assert_array_equal(got.tags, want.tags)
    for (nll, hits, fed, hh), (want_nll, want_hits, want_fed, want_hh) in zip(scored, want_scored, strict=True):
        np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(hits, want_hits)
        np.testing.assert_array_equal(fed, want_fed)
        np.testing.assert_array_equal(hh["pos_ahead1"], want_hh["pos_ahead1"])


def test_heldout_eval_on_the_mesh_equals_one_device(sharded, single):
    res = evaluate.evaluate(sharded, ["heldout"], batch_rows=4)["heldout"]
    want = evaluate.evaluate(single, ["heldout"], batch_rows=4)["heldout"]
    assert res["tokens"] == want["tokens"] == 28
    assert res["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert (res["accuracy"], res["cohesion"], res["heads"]) == (want["accuracy"], want["cohesion"], want["heads"])
    for mode in ("unguided", "self"):
        assert res["modes"][mode]["loss"] == pytest.approx(want["modes"][mode]["loss"], rel=1e-5)
        assert res["modes"][mode]["accuracy"] == want["modes"][mode]["accuracy"]
