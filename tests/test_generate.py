"""KV-cache decoding, sampling, metadata guidance and `lime-jax generate` errors."""
import json

import numpy as np
import pytest

from lime_jax.cli import generate as generate_cli
from lime_jax.inference import generate
from lime_jax.inference import model_dir
from lime_jax.data import cache as cache_lib
from lime_jax.annotation.vocab import TagVocab
from lime_jax.ids import EOS_TAG_ID, NONE_ID, PAD_ID
from test_evaluate import V, handset_params, numpy_model, tiny_cfg

POS = TagVocab("pos", ("CD", ".", "NN", "DT"))  # ids 3..6
NER = TagVocab("ner", ("O",))  # id 3
EOS = 1


@pytest.mark.parametrize("scan_layers", [False, True])
def test_kv_cache_decode_matches_full_forward(scan_layers):
    import jax
    from flax import nnx

    from lime_jax.model import ModelConfig
    from lime_jax.model.decode import IncrementalDecoder

    # Stacked layers decode in one scan over the layers, writing each layer's slice of the cache.
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      metadata=(("pos", 6), ("ner", 5)), dtype="float32", scan_layers=scan_layers)
    model = numpy_model(cfg)
    rng = np.random.default_rng(0)
    B, L, lengths = 3, 11, [7, 4, 1]  # ragged prompts, left-padded by the caller
    tokens = rng.integers(2, 64, (B, L)).astype(np.int32)
    tokens[:, 0] = 0
    meta = {"pos": rng.integers(1, 6, (B, L)).astype(np.int32), "ner": rng.integers(1, 5, (B, L)).astype(np.int32)}
    graphdef, state = nnx.split(model)
    full = np.asarray(jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, m))(state, tokens, meta))

    inc = IncrementalDecoder(model)
    P = max(lengths)
    cache = inc.init_cache(B, P + L)
    pt, valid = np.zeros((B, P), np.int32), np.zeros((B, P), bool)
    pm = {k: np.zeros((B, P), np.int32) for k in meta}
    for b, n in enumerate(lengths):
        pt[b, P - n:], valid[b, P - n:] = tokens[b, :n], True
        for k in meta:
            pm[k][b, P - n:] = meta[k][b, :n]
    logits, cache = inc.extend(cache, pt, pm, valid)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(logits[b, P - n:]), full[b, :n], atol=2e-5)
    for j in range(L - max(lengths)):  # then one token per step, each row at its own position
        step = np.array([[tokens[b, n + j]] for b, n in enumerate(lengths)], np.int32)
        step_meta = {k: np.array([[meta[k][b, n + j]] for b, n in enumerate(lengths)], np.int32) for k in meta}
        logits, cache = inc.extend(cache, step, step_meta)
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(np.asarray(logits[b, 0]), full[b, n + j], atol=2e-5)
    with pytest.raises(ValueError, match="KV cache full"):
        inc.extend(cache, np.zeros((B, L), np.int32), {k: np.ones((B, L), np.int32) for k in meta})


def test_sampling_filters():
    import jax

    from lime_jax.model.decode import sample

    logits = jax.numpy.array([[0.0, 3.0, 2.9, 1.0, -1.0], [5.0, 0.0, 0.0, 0.0, 4.0]])
    greedy = np.asarray(sample(logits, jax.random.key(0)))
    assert greedy.tolist() == [1, 0]
    for seed in range(20):
        key = jax.random.key(seed)
        assert np.asarray(sample(logits, key, temperature=1.0, top_k=1)).tolist() == [1, 0]
        assert np.asarray(sample(logits, key, temperature=1.0, top_p=0.01)).tolist() == [1, 0]
        draw = np.asarray(sample(logits, key, temperature=2.0, top_k=2))
        assert draw[0] in (1, 2) and draw[1] in (0, 4)
        # top_p=0.6 on row 0: p(1) ~ 0.47 < 0.6, so token 2 (mass before it 0.47) stays, 3 goes.
        assert np.asarray(sample(logits, key, temperature=1.0, top_p=0.6))[0] in (1, 2)
    draws = {int(np.asarray(sample(logits, jax.random.key(s), temperature=1.0))[0]) for s in range(40)}
    assert len(draws) > 2  # plain temperature sampling reaches beyond the top two


def test_parse_guide_forms_and_errors():
    vocabs, names = {"pos": POS, "ner": NER}, ("pos", "ner")
    np.testing.assert_array_equal(generate.parse_guide("CD CD .", vocabs, names), [[3, 3, 4], [3, 3, 3]])
    F = generate.FORECAST_ID
    np.testing.assert_array_equal(generate.parse_guide("NN/O NONE - EOS <eos>", vocabs, names),
                                  [[5, NONE_ID, F, EOS_TAG_ID, EOS_TAG_ID], [3, NONE_ID, F, EOS_TAG_ID, EOS_TAG_ID]])
    np.testing.assert_array_equal(generate.parse_guide('[{"pos": "CD"}, {"pos": "EOS", "ner": "EOS"}]', vocabs, names),
                                  [[3, EOS_TAG_ID], [3, EOS_TAG_ID]])
    as_list = generate.parse_guide('[{"pos": "CD", "ner": "O"}, {"pos": "."}]', vocabs, names)
    as_dict = generate.parse_guide('{"pos": ["CD", "."], "ner": ["O", "O"]}', vocabs, names)
    np.testing.assert_array_equal(as_list, [[3, 4], [3, 3]])
    np.testing.assert_array_equal(as_dict, as_list)
    with pytest.raises(generate.GuideError, match=r"step 2: unknown pos tag 'VBZ'.*CD, \., NN, DT"):
        generate.parse_guide("CD VBZ", vocabs, names)
    with pytest.raises(generate.GuideError, match="unknown ner tag 'B-XYZ'"):
        generate.parse_guide("CD/B-XYZ", vocabs, names)
    with pytest.raises(generate.GuideError, match="tag type"):
        generate.parse_guide('[{"pos": "CD", "lemma": "x"}]', vocabs, names)
    with pytest.raises(generate.GuideError, match="unknown pos tag"):
        generate.parse_guide('[{"pos": ["CD"]}]', vocabs, names)
    with pytest.raises(generate.GuideError, match="invalid JSON"):
        generate.parse_guide('[{"pos": "CD"', vocabs, names)
    with pytest.raises(generate.GuideError, match="equal length"):
        generate.parse_guide('{"pos": ["CD"], "ner": []}', vocabs, names)


def _inc(shift_tag_next, **kw):
    from lime_jax.model.decode import IncrementalDecoder

    cfg = tiny_cfg()
    return IncrementalDecoder(handset_params(cfg, {t: 2 for t in range(V)}, logit=1.0,
                                             tag_next=shift_tag_next, **kw))


# Tag -> next token for a model that follows its tags: EOS -> EOS, CD -> 7, '.' -> 8, NN -> 9,
# DT -> 10; NONE (a whitespace-only piece) -> 12. Without a tag (PAD adds nothing, even though
# the hand-set table has a row for it) every token predicts token 2.
FOLLOW_TAGS = {PAD_ID: 11, NONE_ID: 12, EOS_TAG_ID: EOS, 3: 7, 4: 8, 5: 9, 6: 10}


def test_lime_plus1_follows_guide_then_continues_unguided():
    inc = _inc(FOLLOW_TAGS)
    prompts = [np.array([3, 4, 5], np.int32), np.array([6], np.int32)]
    prompt_tags = [np.array([[6, 6, 6], [3, 3, 3]], np.int32), np.array([[6], [3]], np.int32)]
    guides = [np.array([[3, 3, 4, EOS_TAG_ID], [3, 3, 3, EOS_TAG_ID]], np.int32), np.array([[5], [3]], np.int32)]
    out = generate.decode_batch(inc, 1, prompts, prompt_tags, max_new=4, guides=guides)
    assert out[0].ids == [7, 7, 8] and out[0].stopped_at_eos  # the guide's EOS -> EOS
    np.testing.assert_array_equal(out[0].tags, guides[0][:, :3])
    assert out[1].ids == [9, 2, 2, 2] and not out[1].stopped_at_eos  # then no metadata: tokens decide
    assert out[1].tags[0].tolist() == [5, PAD_ID, PAD_ID, PAD_ID]
    unguided = generate.decode_batch(inc, 1, prompts, prompt_tags, max_new=3, guides=None)
    assert [d.ids for d in unguided] == [[2, 2, 2], [2, 2, 2]]


def test_oracle_guide_ends_with_the_eos_tag():
    inc = _inc(FOLLOW_TAGS)
    guide = generate.oracle_guide(np.array([[3, 4], [3, 3]], np.int32))
    np.testing.assert_array_equal(guide, [[3, 4, EOS_TAG_ID], [3, 3, EOS_TAG_ID]])
    out = generate.decode_batch(inc, 1, [np.array([3], np.int32)], [np.array([[6], [3]], np.int32)], max_new=5,
                                guides=[guide])[0]
    assert out.ids == [7, 8] and out.stopped_at_eos


def test_lime_tags_come_from_retagging_the_prefix():
    inc = _inc(FOLLOW_TAGS)
    calls = []

    def retag(seqs):  # a tagger: CD for even ids, NN for odd ids
        calls.append([list(s) for s in seqs])
        return [np.stack([np.where(np.array(s) % 2 == 0, 3, 5), np.full(len(s), 3)]).astype(np.int32)
                for s in seqs]

    # shift 0: the input token's own tags. Prompt [3] tagged '.', so the model predicts 8;
    # 8 is even -> CD -> 7; 7 odd -> NN -> 9; 9 -> NN -> 9.
    out = generate.decode_batch(inc, 0, [np.array([3], np.int32)], [np.array([[4], [3]], np.int32)],
                                max_new=4, retag=retag)[0]
    assert out.ids == [8, 7, 9, 9]
    assert calls[0] == [[3, 8]] and calls[1] == [[3, 8, 7]]
    assert out.tags[0].tolist() == [3, 5, 5, 5]
    with pytest.raises(ValueError, match="retag"):
        generate.decode_batch(inc, 0, [np.array([3], np.int32)], [np.array([[4], [3]], np.int32)], max_new=1)


@pytest.fixture(scope="module")
def handset_dirs(tmp_path_factory):
    from flax import nnx

    root = tmp_path_factory.mktemp("gen")
    cache_dir = str(root / "cache")
    doc = np.array([[2, 3, 1], [3, 3, 2], [3, 3, 2], [2, 2, 1]], np.int32)
    cache_lib.write_cache(cache_dir, [doc], {"targets": V, "targets_pos": 7, "targets_ner": 4, "subword_index": 66},
                          features=("targets", "targets_pos", "targets_ner", "subword_index"),
                          extra={"spm_model": "spm.model",
                                 "vocab_files": {"targets_pos": "vocab_pos.json", "targets_ner": "vocab_ner.json"}})
    POS.save(f"{cache_dir}/vocab_pos.json")
    NER.save(f"{cache_dir}/vocab_ner.json")
    dirs = {}
    for arm, metadata, shift in (("baseline", (), 0), ("lime", (("pos", 7), ("ner", 4)), 0),
                                 ("lime_plus1", (("pos", 7), ("ner", 4)), 1)):
        cfg = tiny_cfg(metadata)
        model = handset_params(cfg, {t: 2 for t in range(V)})
        dirs[arm] = str(root / arm)
        model_dir.save_model_dir(dirs[arm], cfg, nnx.state(model, nnx.Param), step=3, seq_len=8, shift=shift,
                                 cache_dir=cache_dir)
    return dirs


@pytest.mark.parametrize("arm, args, message", [
    ("baseline", ["--guide", "CD"], "baseline run"),
    ("lime", ["--guide", "CD"], "shift 0"),
    ("lime_plus1", ["--guide", "CD CD CD", "--max-new", "2"], "guide has 3 steps but --max-new is 2"),
    ("lime_plus1", ["--guide", "CD XX"], "unknown pos tag 'XX'; vocabulary 'pos' holds CD, ., NN, DT"),
])
def test_generate_cli_rejects_bad_guides(handset_dirs, capsys, arm, args, message):
    assert generate_cli.main(["--model_dir", handset_dirs[arm], "--prompt", "x", *args]) == 2
    assert message in capsys.readouterr().err


def test_generate_cli_without_checkpoint(handset_dirs, tmp_path, capsys):
    import shutil

    shutil.copy(f"{handset_dirs['lime']}/config.gin", tmp_path / "config.gin")
    assert generate_cli.main(["--model_dir", str(tmp_path), "--prompt", "x"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory, spm_model, annotator):
    """LIME and LIME+1 model dirs (random params) over a cache made by the real pipeline."""
    import shutil

    from flax import nnx

    from lime_jax.annotation.pipeline import FEATURES, DocumentProcessor
    from lime_jax.model import ModelConfig

    root = tmp_path_factory.mktemp("real")
    proc = DocumentProcessor(annotator, spm_model)
    docs, _ = proc.process(["The President spoke to Congress in Washington.", "We added 12 and 30."])
    cache_dir = str(root / "cache")
    cache_lib.write_cache(cache_dir, docs, proc.vocab_sizes, features=FEATURES,
                          extra={"spm_model": "spm.model", "tokenization": "lime",
                                 "vocab_files": {"targets_pos": "vocab_pos.json", "targets_ner": "vocab_ner.json"}})
    shutil.copy(spm_model, f"{cache_dir}/spm.model")
    proc.pos_vocab.save(f"{cache_dir}/vocab_pos.json")
    proc.ner_vocab.save(f"{cache_dir}/vocab_ner.json")
    sizes = {n: proc.vocab_sizes[f"targets_{n}"] for n in ("pos", "ner")}
    cfg = ModelConfig(vocab_size=proc.tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                      d_ff=32, metadata=tuple(sizes.items()), dtype="float32")
    dirs = {}
    # `_self`: with tag heads forecasting the tags the run is fed (ahead = shift + 1).
    for arm, shift, heads in (("lime", 0, False), ("lime_plus1", 1, False), ("lime_self", 0, True),
                              ("lime_plus1_self", 1, True), ("aux", 0, True)):
        arm_cfg = cfg.replace(tag_heads=tuple((n, s, shift + 1, 1.0) for n, s in sizes.items()) if heads else (),
                              metadata=() if arm == "aux" else cfg.metadata)
        params = nnx.state(numpy_model(arm_cfg, seed=1), nnx.Param)
        dirs[arm] = str(root / arm)
        model_dir.save_model_dir(dirs[arm], arm_cfg, params, step=1, seq_len=64, shift=shift, cache_dir=cache_dir,
                                 eval_cache_dir=cache_dir)
    return dirs


@pytest.mark.slow
def test_generate_text_with_oracle_guidance_and_reannotation(real_dirs, capsys):
    lp1 = model_dir.load(real_dirs["lime_plus1"])
    prompt = "Q: What is 12 + 30?\nA:"
    res = generate.generate(lp1, prompt, guide_from=" 42")
    _, answer = generate.split_prompt(lp1, prompt, " 42")
    assert res["guide_steps"] == answer.shape[1] + 1  # + the end-of-text EOS
    assert len(res["ids"]) <= answer.shape[1] + 1
    assert res["tags_source"].startswith("guide-from")
    expected = [lp1.vocabs["pos"].tag(int(t)) for t in answer[1]] + ["<eos>"]
    assert [t["pos"] for t in res["tags"]] == expected[:len(res["ids"])]
    assert "CD" in expected
    lime = model_dir.load(real_dirs["lime"])
    res = generate.generate(lime, "The President", max_new=3, temperature=0.8, top_k=5, seed=3)
    assert res["tags_source"] == "re-annotation of the decoded prefix (prefix)"
    assert len(res["tags"]) == len(res["ids"]) and all(set(t) == {"pos", "ner"} for t in res["tags"])
    assert generate_cli.main(["--model_dir", real_dirs["lime"], "--prompt", "The President", "--max-new", "2"]) == 0
    assert "tags source: re-annotation" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_tasks_end_to_end_on_the_real_pipeline(real_dirs):
    from lime_jax.evaluation import evaluate

    for arm, modes in (("lime_plus1", ["unguided", "guided"]), ("lime", ["reannotated", "unguided"])):
        loaded = model_dir.load(real_dirs[arm])
        res = evaluate.evaluate(loaded, ["heldout", "lambada", "addition", "reasoning"], addition_n=6,
                                reasoning_n=4)
        assert res["modes"] == modes and res["heldout"]["tokens"] > 0
        assert res["lambada"]["items"] == 0  # two one-sentence documents: no cloze item
        for task, n in (("addition", 6), ("reasoning", 4)):
            assert list(res[task]["modes"]) == modes
            for m in modes:
                assert res[task]["modes"][m]["n"] == n and 0.0 <= res[task]["modes"][m]["accuracy"] <= 1.0
        assert set(res["addition"]["modes"][modes[0]]["by_bucket"]) == {"1", "2", "3"}
        assert set(res["reasoning"]["modes"][modes[0]]["by_bucket"]) == {"comparison", "transfer"}


@pytest.mark.slow
def test_generate_with_self_tags_and_forecast_guides(real_dirs, capsys):
    """`--tags self` needs no spaCy at inference; a guide's `-` steps take the forecast."""
    for arm in ("lime_self", "lime_plus1_self"):
        assert generate_cli.main(["--model_dir", real_dirs[arm], "--prompt", "The President", "--max-new", "4",
                                  "--tags", "self", "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["tags_source"] == "self (the model's forecast, prompt included)"
        assert len(res["tags"]) == len(res["ids"]) and all("<pad>" not in t.values() for t in res["tags"])
    lp1 = model_dir.load(real_dirs["lime_plus1_self"])
    res = generate.generate(lp1, "Q: What is 12 + 30?\nA:", guide="CD - CD", max_new=3)
    assert res["tags_source"] == "guide (steps it leaves open: the model's forecast)"
    assert res["tags"][0]["pos"] == "CD"
    if len(res["tags"]) > 1:
        assert res["tags"][1]["pos"] != "<pad>"  # the `-` step: the forecast, not PAD
    plain = model_dir.load(real_dirs["lime_plus1"])
    res = generate.generate(plain, "Q: What is 12 + 30?\nA:", guide="CD -", max_new=2)
    assert res["tags_source"] == "guide (steps it leaves open: PAD, unguided (the model has no tag heads))"
    for arm, args, message in (("lime", ["--tags", "self"], "ahead = 1"),
                               ("lime_plus1", ["--tags", "prefix"], "use --tags self"),
                               ("lime_plus1_self", ["--tags", "oracle"], "--guide-from"),
                               ("lime", ["--tags", "oracle"], "no whole-document annotation")):
        assert generate_cli.main(["--model_dir", real_dirs[arm], "--prompt", "x", *args]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_eval_reports_unguided_self_and_oracle_side_by_side(real_dirs):
    from lime_jax.evaluation import evaluate

    for arm, modes in (("lime_plus1_self", ["unguided", "guided", "self"]),
                       ("lime_self", ["reannotated", "unguided", "self"]), ("aux", ["none"])):
        loaded = model_dir.load(real_dirs[arm])
        res = evaluate.evaluate(loaded, ["heldout", "addition", "reasoning"], addition_n=3, reasoning_n=2)
        assert res["modes"] == modes
        for task in ("addition", "reasoning"):
            assert list(res[task]["modes"]) == modes
        h = res["heldout"]
        assert set(h["heads"]) == {f"pos_ahead{loaded.shift + 1}", f"ner_ahead{loaded.shift + 1}"}
        assert all(0.0 <= v["accuracy"] <= 1.0 and v["n"] > 0 for v in h["heads"].values())
        if arm == "aux":
            assert "modes" not in h
            continue
        assert set(h["modes"]) == {"unguided", "self"} and set(h["modes"]["self"]["heads"]) == set(h["heads"])
        assert h["modes"]["self"]["accuracy"] != h["accuracy"] or h["modes"]["self"]["loss"] != h["loss"]
        assert any("heldout self" in line for line in evaluate.summary_lines(res))
