"""lime-jax eval: metrics on hand-made cases with a model whose parameters are set by hand."""
import json
import math

import numpy as np
import pytest

from lime_jax.cli import eval as eval_cli
from lime_jax.evaluation import evaluate
from lime_jax.inference import model_dir
from lime_jax.data import cache as cache_lib
from lime_jax.annotation.vocab import TagVocab

V, D = 16, 24  # tokens use embedding dims 0..15, POS tags dims 16..22 (see handset_params)


def numpy_model(cfg, seed: int = 0):
    """A Decoder with random numpy parameters, built from abstract shapes (no init compiles)."""
    import jax
    from flax import nnx

    from lime_jax.model import abstract_model

    graphdef, abstract = abstract_model(cfg)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if "scale" in jax.tree_util.keystr(path):
            return np.ones(x.shape, np.float32)
        return (rng.standard_normal(x.shape) * 0.3).astype(np.float32)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


def handset_params(cfg, next_token: dict[int, int], logit: float = 4.0, tag_next: dict[int, int] | None = None,
                   tag_logit: float = 8.0):
    """A Decoder that predicts `next_token[input]` (and, given tags, `tag_next[pos tag]`).

    Blocks are zeroed (identity residual), the token table is one-hot, the POS table one-hot in
    dims 16..; the untied head reads the token (and tag) dims, so the logits are known exactly.
    """
    model = numpy_model(cfg)
    for block in model.blocks:
        block.attn.wo[...] = np.zeros(block.attn.wo.shape, np.float32)
        block.mlp.w_down[...] = np.zeros(block.mlp.w_down.shape, np.float32)
    token = np.zeros((V, D), np.float32)
    token[np.arange(V), np.arange(V)] = 1.0
    model.embed.token[...] = token
    head = np.zeros((D, V), np.float32)
    for t, nxt in next_token.items():
        head[t, nxt] = logit
    for name, size in cfg.metadata:
        table = np.zeros((size, D), np.float32)
        if name == "pos":
            table[np.arange(size), 16 + np.arange(size)] = 1.0
            for tag, nxt in (tag_next or {}).items():
                head[16 + tag, nxt] = tag_logit
        model.embed.tables[name][...] = table
    model.head[...] = head
    return model


def tiny_cfg(metadata=(("pos", 7), ("ner", 4))):
    from lime_jax.model import ModelConfig

    return ModelConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=8,
                       metadata=metadata, tie_embeddings=False, dtype="float32")


# Two documents [targets, pos, ner, subword_index], EOS last (token 1, tag EOS 2, no word 1).
DOC_A = np.array([[2, 3, 4, 5, 9, 1],
                  [3, 4, 4, 5, 6, 2],
                  [3, 3, 3, 3, 3, 2],
                  [2, 2, 3, 2, 2, 1]], np.int32)  # words: [2], [3 4], [5], [9]
DOC_B = np.array([[7, 8, 9, 10, 11, 12, 13, 1],
                  [3, 3, 3, 4, 4, 4, 5, 2],
                  [3, 3, 3, 3, 3, 3, 3, 2],
                  [2, 3, 4, 2, 3, 4, 5, 1]], np.int32)  # words: [7 8 9], [10 11 12 13]
SUCCESSOR = {t: t + 1 for t in range(2, V - 1)} | {0: 2}  # BOS -> 2, t -> t + 1


@pytest.fixture(scope="module")
def handset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cache_dir = str(root / "heldout")
    cache_lib.write_cache(cache_dir, [DOC_A, DOC_B],
                          {"targets": V, "targets_pos": 7, "targets_ner": 4, "subword_index": 66},
                          features=("targets", "targets_pos", "targets_ner", "subword_index"),
                          extra={"spm_model": "spm.model"})
    cfg = tiny_cfg()
    model = handset_params(cfg, SUCCESSOR)
    from flax import nnx

    out = str(root / "lime")
    model_dir.save_model_dir(out, cfg, nnx.state(model, nnx.Param), step=7, seq_len=8, batch_size=2,
                             shift=0, cache_dir=cache_dir, eval_cache_dir=cache_dir)
    return out


def test_word_places_from_subword_index():
    si = np.array([1, 2, 2, 3, 2, 3, 4, 1, 2, 3])
    place, length = evaluate.word_places(si)
    assert place.tolist() == [0, 1, 1, 2, 1, 2, 3, 0, 1, 2]
    assert length.tolist() == [0, 1, 2, 2, 3, 3, 3, 0, 2, 2]


def test_cohesion_groups_by_word_length_and_place():
    counter = evaluate.CohesionCounter()
    si = np.array([2, 2, 3, 2, 3, 4, 5, 6, 7, 1])  # words of 1, 2 and 6 pieces, then NONE
    correct = np.array([1, 0, 1, 1, 1, 0, 1, 1, 1, 1])
    counter.add(*evaluate.word_places(si), correct, np.ones(10))
    res = counter.result()
    assert res["by_word_length"]["1"] == {"1": {"n": 1, "accuracy": 1.0}}
    assert res["by_word_length"]["2"] == {"1": {"n": 1, "accuracy": 0.0}, "2": {"n": 1, "accuracy": 1.0}}
    assert res["by_word_length"]["5+"]["3"] == {"n": 1, "accuracy": 0.0}
    assert res["by_word_length"]["5+"]["5+"] == {"n": 2, "accuracy": 1.0}  # places 5 and 6
    assert res["by_place"]["1"] == {"n": 3, "accuracy": 2 / 3}
    assert "0" not in res["by_place"]  # the NONE piece is no word


def test_heldout_metrics_of_a_known_model(handset_dir):
    loaded = model_dir.load(handset_dir)
    assert (loaded.step, loaded.run.arm, loaded.run.seq_len) == (7, "lime", 8)
    res = evaluate.evaluate(loaded, ["heldout"], batch_rows=4)
    h = res["heldout"]
    # DOC_A: inputs BOS 2 3 4 5 9 -> predicts 2 3 4 5 6 10, targets 2 3 4 5 9 1: 4 of 6 right.
    # DOC_B: inputs BOS 7 8 9 10 11 12 13 -> 2 8 9 10 11 12 13 14 vs 7 8 ... 13 1: 6 of 8 right.
    assert h["tokens"] == 14
    assert h["accuracy"] == pytest.approx(10 / 14)
    logit = 4.0 * math.sqrt(D / 2) * 1.0  # rmsnorm of sqrt(D) (e_t + e_tag) scales by 1/sqrt(2)
    logz = math.log(math.exp(logit) + V - 1)
    expected_loss = (10 * (logz - logit) + 4 * logz) / 14
    assert h["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert h["perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-4)
    coh = h["cohesion"]["by_word_length"]
    # Word [3 4] of DOC_A: both right. Word [7 8 9]: piece 1 wrong (BOS predicts 2), 2 and 3 right.
    # Word [10 11 12 13]: all right. Words [2] right, [5] right, [9] wrong.
    assert coh["1"]["1"] == {"n": 3, "accuracy": 2 / 3}
    assert coh["2"] == {"1": {"n": 1, "accuracy": 1.0}, "2": {"n": 1, "accuracy": 1.0}}
    assert coh["3"]["1"] == {"n": 1, "accuracy": 0.0}
    assert coh["4"]["4"] == {"n": 1, "accuracy": 1.0}


def test_eval_cli_writes_json(handset_dir, capsys):
    assert eval_cli.main(["--model_dir", handset_dir, "--task", "heldout"]) == 0
    with open(f"{handset_dir}/{evaluate.RESULTS_NAME}") as f:
        res = json.load(f)
    assert res["heldout"]["accuracy"] == pytest.approx(10 / 14)
    assert res["tokens_seen"] == 7 * 16
    assert "accuracy=0.7143" in capsys.readouterr().out


def test_cloze_items_pick_sentence_final_nouns():
    pos = TagVocab("pos", ("NN", ".", "DT", "VB"))
    nn, period, dt = pos.id("NN"), pos.id("."), pos.id("DT")
    # 40 pieces of context (DT words), then a 2-piece noun, '.', then a 1-piece noun not
    # followed by '.', then a final noun + '.'.
    n_ctx = 40
    targets = np.arange(2, 2 + n_ctx + 6, dtype=np.int32)
    tags = np.array([dt] * n_ctx + [nn, nn, period, nn, nn, period], np.int32)
    si = np.array([2] * n_ctx + [2, 3, 2, 2, 2, 2], np.int32)
    doc = np.stack([targets, tags, np.full_like(tags, 3), si])
    manifest = {"features": ["targets", "targets_pos", "targets_ner", "subword_index"]}
    items = evaluate.cloze_items([doc], manifest, pos, seq_len=16, min_context=32)
    # Items from the end: the noun at 44 (then the next one must end <= 45 - 16).
    assert items == [(0, 45 - 16, 44, 1)]
    items = evaluate.cloze_items([doc], manifest, pos, seq_len=3, min_context=32)
    assert items == [(0, 42, 44, 1), (0, 39, 40, 2)]  # windows [42, 45) and [39, 42)


CLOZE_POS = TagVocab("pos", ("NN", ".", "DT", "NNS"))  # ids 3..6; only NN steers the model
NN, PERIOD, DT, NNS = (CLOZE_POS.id(t) for t in ("NN", ".", "DT", "NNS"))


def _cloze_doc(tokens, pos, subword_index):
    """[targets, pos, ner, subword_index] with EOS (tags EOS, no word) appended."""
    rows = [list(tokens) + [1], list(pos) + [2], [3] * len(tokens) + [2], list(subword_index) + [1]]
    return np.array(rows, np.int32)


# One cloze item per document (a noun ending a sentence), then one with none. The LIME+1 model
# predicts t + 1 from token t, or 15 from the tag NN (its next token's tag, when guided):
CLOZE_DOCS = [
    _cloze_doc([2, 3, 4, 9, 15, 6], [DT, DT, DT, DT, NN, PERIOD], [2] * 6),  # guided hit; unguided 9 -> 10
    _cloze_doc([2, 3, 14, 15, 7], [DT, DT, DT, NN, PERIOD], [2] * 5),  # hit either way: 14 -> 15
    # a two-piece noun: unguided gets its first piece (14 -> 15), not its second (15 -> nothing)
    _cloze_doc([2, 3, 14, 15, 15, 7], [DT, DT, DT, NN, NN, PERIOD], [2, 2, 2, 2, 3, 2]),
    _cloze_doc([2, 3, 9, 10, 11, 7], [DT, DT, DT, NNS, NNS, PERIOD], [2, 2, 2, 2, 3, 2]),  # hit: 9 10 11
    _cloze_doc([2, 3, 5, 12, 7], [DT, DT, DT, NNS, PERIOD], [2] * 5),  # miss: 5 -> 6
    # no item: a noun before --cloze-context, a noun not ending a sentence, a '.' after a non-noun
    _cloze_doc([15, 3, 4, 5, 15, 6, 7, 8], [NN, PERIOD, DT, DT, NN, DT, DT, PERIOD], [2] * 8),
]


@pytest.fixture(scope="module")
def cloze_dir(tmp_path_factory):
    from flax import nnx

    root = tmp_path_factory.mktemp("cloze")
    cache_dir = str(root / "heldout")
    cache_lib.write_cache(cache_dir, CLOZE_DOCS, {"targets": V, "targets_pos": 7, "targets_ner": 4, "subword_index": 66},
                          features=("targets", "targets_pos", "targets_ner", "subword_index"),
                          extra={"spm_model": "spm.model", "vocab_files": {"targets_pos": "vocab_pos.json"}})
    CLOZE_POS.save(f"{cache_dir}/vocab_pos.json")
    cfg = tiny_cfg()
    model = handset_params(cfg, SUCCESSOR, tag_next={NN: 15})
    out = str(root / "lime_plus1")
    model_dir.save_model_dir(out, cfg, nnx.state(model, nnx.Param), step=1, seq_len=8, shift=1,
                             cache_dir=cache_dir, eval_cache_dir=cache_dir)
    return out


def test_lambada_scores_known_cloze_items(cloze_dir):
    loaded = model_dir.load(cloze_dir)
    res = evaluate.evaluate(loaded, ["lambada"], cloze_context=2, batch_rows=4)["lambada"]
    assert res["items"] == 5
    # Guided (the word's own tags): all but 5 -> 12. Unguided (PAD): 14 -> 15 and 9 10 11 only.
    assert res["modes"]["guided"] == {"accuracy": 4 / 5, "n": 5, "by_bucket": {
        "1": {"accuracy": 2 / 3, "n": 3}, "2": {"accuracy": 1.0, "n": 2}}}
    assert res["modes"]["unguided"] == {"accuracy": 2 / 5, "n": 5, "by_bucket": {
        "1": {"accuracy": 1 / 3, "n": 3}, "2": {"accuracy": 1 / 2, "n": 2}}}


def test_bucket_accuracy():
    res = evaluate.bucket_accuracy([True, False, True, True], [1, 1, 2, 3])
    assert res["accuracy"] == 0.75 and res["n"] == 4
    assert res["by_bucket"] == {"1": {"accuracy": 0.5, "n": 2}, "2": {"accuracy": 1.0, "n": 1},
                                "3": {"accuracy": 1.0, "n": 1}}


def test_model_dir_without_checkpoint_is_a_clear_error(handset_dir, tmp_path, capsys):
    import shutil

    shutil.copy(f"{handset_dir}/config.gin", tmp_path / "config.gin")
    assert eval_cli.main(["--model_dir", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(model_dir.ModelDirError, match="does not exist"):
        model_dir.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(model_dir.ModelDirError, match="config.gin: not found"):
        model_dir.load(str(tmp_path / "empty"))
