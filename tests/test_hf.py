"""Hugging Face export and import (lime_jax.hf) against real transformers models, PyTorch on CPU.

Export: a baseline and a LIME model (random weights, non-zero tag tables, RMSNorm gains away from
1) written as model dirs, exported with `lime-jax export` and loaded with AutoModelForCausalLM and
AutoTokenizer: f32 logits equal ours, greedy generation gives the same ids, the tokenizer gives our
SentencePiece ids. Import: a tiny random Gemma made and saved by transformers gives its own logits
at step 0 and trains a few LIME steps (INIT_FROM_HF); mismatches fail naming the field or tensor.
"""
import itertools
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, GemmaConfig, GemmaForCausalLM
from transformers.models.bert_generation import BertGenerationTokenizer

from conftest import SPM_TEST_VOCAB
from lime_jax import corpus
from lime_jax.annotation.spm import Tokenizer
from lime_jax.cli import export as export_cli
from lime_jax.hf import gemma
from lime_jax.hf import init as hf_init
from lime_jax.hf.export import export_model_dir
from lime_jax.ids import EOS_ID, NONE_ID, PAD_ID
from lime_jax.inference import generate
from lime_jax.inference import model_dir as model_dir_lib
from lime_jax.model import ModelConfig, abstract_model
from lime_jax.model.decode import IncrementalDecoder
from lime_jax.trainer import train as train_lib
from lime_jax.trainer.config import ConfigError
from tasks import testing
from test_hostile_input import HOSTILE
from test_metadata import ODD_TEXT

V = SPM_TEST_VOCAB
TINY = dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, dtype="float32")
TABLES = (("pos", testing.POS.size), ("ner", testing.NER.size))
NEW = 20  # greedy tokens compared


def _key(path) -> str:
    return "/".join(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def model_from(cfg, value_of):
    """A Decoder whose parameter at each path is `value_of(key, abstract leaf)`."""
    graphdef, abstract = abstract_model(cfg)
    values = jax.tree_util.tree_map_with_path(lambda p, x: jnp.asarray(value_of(_key(p), x)), abstract)
    return nnx.merge(graphdef, values)


def random_model(cfg, seed: int):
    rng = np.random.default_rng(seed)

    def value(key, x):
        if key.endswith("scale"):  # RMSNorm gains away from 1 exercise Gemma's (1 + weight)
            return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        if x.ndim == 0:  # a learned metadata weight
            return np.float32(rng.uniform(0.5, 1.5))
        return (rng.standard_normal(x.shape) * 0.2).astype(np.float32)

    return model_from(cfg, value)


def random_batch(cfg, seed: int, B: int = 3, L: int = 32) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Tokens starting with the BOS input 0, tags over each table (PAD included)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.vocab_size, (B, L)).astype(np.int32)
    tokens[:, 0] = PAD_ID
    return tokens, {n: rng.integers(0, s, (B, L)).astype(np.int32) for n, s in cfg.metadata}


def hf_logits(hf, tokens, tags=None) -> np.ndarray:
    kwargs = {f"{n}_ids": torch.from_numpy(t).long() for n, t in (tags or {}).items()}
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(tokens).long(), **kwargs).logits.numpy()


def max_diff(model, hf, tokens, tags) -> float:
    ours = np.asarray(model(tokens, tags or None))
    return float(np.abs(ours - hf_logits(hf, tokens, tags)).max())


def greedy_both(model, hf, shift: int, prompt: list[int], prompt_tags: np.ndarray, guide: np.ndarray | None):
    """Greedy ids (EOS excluded) from our KV-cache decoder and from transformers' generate."""
    ours = generate.decode_batch(IncrementalDecoder(model), shift, [np.array(prompt)], [prompt_tags], NEW,
                                 guides=[guide])[0].ids
    n = len(prompt)

    def tags_of(k: int) -> np.ndarray:  # token t_k's tags as decode_batch sees them (t_0 = BOS)
        if k <= 0:
            return np.full(len(prompt_tags), NONE_ID)
        if k <= n:
            return prompt_tags[:, k - 1]
        return guide[:, k - n - 1] if guide is not None and k - n - 1 < guide.shape[1] else np.zeros(len(prompt_tags))

    names = model.cfg.metadata_names
    per_position = np.stack([tags_of(p + shift) for p in range(n + NEW + 1)], axis=1).astype(np.int64)
    kwargs = {f"{name}_ids": torch.from_numpy(per_position[k][None]) for k, name in enumerate(names)}
    with torch.no_grad():
        out = hf.generate(torch.tensor([[PAD_ID] + prompt]), max_new_tokens=NEW, do_sample=False, **kwargs)
    theirs = out[0, n + 1:].tolist()
    return ours, theirs[:theirs.index(EOS_ID)] if EOS_ID in theirs else theirs


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, spm_model) -> str:
    """A cache holding the SentencePiece model and tag vocabularies the model dirs name."""
    d = str(tmp_path_factory.mktemp("cache"))
    testing.write_cache_dir(d, testing.random_documents(8, V, seed=0), spm_model)
    return d


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cache_dir) -> dict:
    """arm -> (our model, its HF export, metadata shift): a tied gelu baseline; a LIME+1 model with
    learned table weights, an untied head and silu."""
    arms = {"baseline": (ModelConfig(**TINY), 0),
            "lime": (ModelConfig(**TINY, metadata=TABLES, metadata_weight="learned", tie_embeddings=False,
                                 mlp_activation="silu"), 1)}
    out = {}
    for seed, (arm, (cfg, shift)) in enumerate(arms.items()):
        root = tmp_path_factory.mktemp(arm)
        model = random_model(cfg, seed)
        model_dir_lib.save_model_dir(str(root / "run"), cfg, nnx.state(model, nnx.Param), step=7, seq_len=64,
                                     shift=shift, cache_dir=cache_dir)
        assert export_cli.main(["--model_dir", str(root / "run"), "--out", str(root / "hf")]) == 0
        out[arm] = (model, str(root / "hf"), shift)
    return out


def test_baseline_is_a_stock_gemma_with_our_logits_and_greedy_ids(exported, capsys):
    model, hf_dir, _ = exported["baseline"]
    assert sorted(os.listdir(hf_dir)) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                          "spiece.model", "tokenizer_config.json"]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)  # no custom code
    assert type(hf).__name__ == "GemmaForCausalLM"
    tokens, _ = random_batch(model.cfg, seed=1)
    diff = max_diff(model, hf, tokens, {})
    with capsys.disabled():
        print(f"\nbaseline export: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    ours, theirs = greedy_both(model, hf, 0, [5, 17, 300, 42], np.zeros((0, 4), np.int32), None)
    assert len(ours) == NEW and ours == theirs


def test_lime_export_takes_tags_beside_input_ids(exported, capsys):
    model, hf_dir, shift = exported["lime"]
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    assert config["model_type"] == "lime_gemma" and config["lime_shift"] == 1
    assert [t[:2] for t in config["lime_tables"]] == [list(t) for t in TABLES]
    assert {"modeling_lime_gemma.py", "vocab_pos.json", "vocab_ner.json"} <= set(os.listdir(hf_dir))
    card = open(os.path.join(hf_dir, "README.md")).read()
    assert "pos_ids" in card and "lime-jax show" in card and "tagger:DIR" in card
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32)
    text = "In 1863 🙂"
    assert AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)(text).input_ids == \
        AutoTokenizer.from_pretrained(exported["baseline"][1])(text).input_ids
    tokens, tags = random_batch(model.cfg, seed=2)
    diff = max_diff(model, hf, tokens, tags)
    with capsys.disabled():
        print(f"\nLIME export: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    # The tags matter (non-zero tables), and PAD tags are "no metadata".
    assert np.abs(hf_logits(hf, tokens, tags) - hf_logits(hf, tokens)).max() > 1e-2
    np.testing.assert_array_equal(hf_logits(hf, tokens), hf_logits(hf, tokens, {n: 0 * t for n, t in tags.items()}))
    rng = np.random.default_rng(3)
    prompt_tags = np.stack([rng.integers(2, s, 4) for _, s in TABLES]).astype(np.int32)
    guide = np.stack([rng.integers(2, s, NEW) for _, s in TABLES]).astype(np.int32)
    ours, theirs = greedy_both(model, hf, shift, [5, 17, 300, 42], prompt_tags, guide)
    assert len(ours) == NEW and ours == theirs


def test_export_refuses_a_used_directory_and_a_missing_run(exported, tmp_path, capsys):
    _, hf_dir, _ = exported["baseline"]
    assert export_cli.main(["--model_dir", str(tmp_path), "--out", hf_dir]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert export_cli.main(["--model_dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "hf")]) == 1
    assert "model directory does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return AutoTokenizer.from_pretrained(exported["baseline"][1])


def test_tokenizer_gives_our_ids_on_held_out_text(hf_tokenizer, spm_model):
    ours = Tokenizer(spm_model)
    texts = [t for _, t in itertools.islice(corpus.iter_documents(corpus.BUNDLED["heldout"]), 20)]
    texts += ["In 1863, 4,000,000 people 🙂 paid $12.50 — naïve façade Ω", "x</s>y <pad> <0x41>"]
    pieces = set()
    for text in texts:
        ids = ours.encode_with_offsets(text)[0].tolist()
        assert hf_tokenizer(text).input_ids == ids
        pieces |= {ours.id_to_piece(i) for i in ids}
    assert {"<0xF0>", "1", "8", "6", "3"} <= pieces  # byte fallback and one piece per digit were exercised
    assert hf_tokenizer.sp_model.decode(hf_tokenizer(texts[-2]).input_ids) == texts[-2]


@settings(max_examples=150, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=ODD_TEXT | HOSTILE | st.sampled_from(["\u00a0\u0300", "ﬁ\u0301", "</s>", "  9 99  ", "\u3000x"]))
def test_tokenizer_gives_our_ids_on_hostile_text(hf_tokenizer, spm_model, text):
    assert hf_tokenizer(text).input_ids == Tokenizer(spm_model).encode_with_offsets(text)[0].tolist()


# ----------------------------------------------------------------------------- import


@pytest.fixture(scope="module")
def hf_gemma(tmp_path_factory, spm_model) -> tuple[str, GemmaForCausalLM]:
    """A tiny random Gemma made and saved by transformers, the test SentencePiece model as its tokenizer."""
    hf_dir = str(tmp_path_factory.mktemp("hf_gemma"))
    torch.manual_seed(0)
    config = GemmaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         bos_token_id=PAD_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model = GemmaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma starts its gains at 0, i.e. 1 + 0
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(hf_dir)
    BertGenerationTokenizer(vocab_file=spm_model, bos_token="<pad>", sep_token=None,
                            split_special_tokens=True).save_pretrained(hf_dir)
    return hf_dir, model


def test_import_gives_the_checkpoint_logits_at_step_0(hf_gemma, capsys):
    hf_dir, hf = hf_gemma
    cfg = ModelConfig(**TINY, metadata=TABLES)
    params = hf_init.load_params(hf_dir, cfg)
    assert not params["embed/tables/pos"].any() and not params["embed/tables/ner"].any()
    model = model_from(cfg, lambda key, x: params[key])
    tokens, tags = random_batch(cfg, seed=4)
    tags = {n: np.maximum(t, 2) for n, t in tags.items()}  # real tags everywhere: the zero tables add nothing
    diff = float(np.abs(np.asarray(model(tokens, tags)) - hf_logits(hf, tokens)).max())
    with capsys.disabled():
        print(f"\nHF import at step 0: max |logit diff| {diff:.2e}")
    assert diff < 1e-5


def test_import_mismatches_name_the_field_or_tensor(hf_gemma, tmp_path):
    hf_dir, _ = hf_gemma
    with pytest.raises(gemma.HFError, match=r"intermediate_size=128 but ModelConfig.d_ff=96 "
                                            r"\(bind ModelConfig.d_ff = 128\)"):
        hf_init.load_params(hf_dir, ModelConfig(**{**TINY, "d_ff": 96}))
    with pytest.raises(gemma.HFError, match=r"tie_word_embeddings=True but ModelConfig.tie_embeddings=False"):
        hf_init.load_params(hf_dir, ModelConfig(**TINY, tie_embeddings=False))
    bad = str(tmp_path / "bad")
    shutil.copytree(hf_dir, bad)
    tensors, _ = gemma.read_tensors(bad)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:, :32].copy()
    gemma.write_tensors(os.path.join(bad, gemma.SAFETENSORS), tensors)
    with pytest.raises(gemma.HFError, match=r"model.safetensors: tensor model.layers.1.mlp.up_proj.weight has "
                                            r"shape \[128, 32\], the ModelConfig needs \[128, 64\]"):
        hf_init.load_params(bad, ModelConfig(**TINY))
    config = json.load(open(os.path.join(bad, "config.json")))
    json.dump({**config, "model_type": "llama"}, open(os.path.join(bad, "config.json"), "w"))
    with pytest.raises(gemma.HFError, match=r"model_type is 'llama'.*does not scale embeddings"):
        hf_init.load_params(bad, ModelConfig(**TINY))


def _train_bindings(model_dir, cache, hf_dir, **extra):
    b = [f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 3", f"CACHE_DIR = '{cache}'", "SEQ_LEN = 32",
         "BATCH_SIZE = 8", "CHECKPOINT_EVERY = 3", f"INIT_FROM_HF = '{hf_dir}'", f"ModelConfig.vocab_size = {V}",
         "TrainConfig.progress = False", "TrainConfig.log_every = 1", "DataConfig.read_threads = 1",
         "OptimizerConfig.learning_rate = 1e-4"]
    return b + [f"{k} = {v}" for k, v in extra.items()]


@pytest.mark.slow
def test_init_from_hf_trains_lime_steps_and_exports_back(hf_gemma, tmp_path, capsys):
    hf_dir, _ = hf_gemma
    cache = str(tmp_path / "cache")  # annotated with the checkpoint's tokenizer
    testing.write_cache_dir(cache, testing.random_documents(40, V, seed=1), os.path.join(hf_dir, "spiece.model"))
    with pytest.raises(ConfigError, match=r"(?s)INIT_FROM_HF: .*intermediate_size=128 but ModelConfig.d_ff=96"):
        train_lib.train(["runs/lime.gin", "models/tiny.gin"],
                        _train_bindings(str(tmp_path / "bad"), cache, hf_dir, **{"ModelConfig.d_ff": 96}))
    run = str(tmp_path / "run")
    # Stacked layers: import stacks the checkpoint's layers, export unstacks them.
    summary = train_lib.train(["runs/lime.gin", "models/tiny.gin"],
                              _train_bindings(run, cache, hf_dir, **{"ModelConfig.scan_layers": True}))
    assert summary["step"] == 3 and math.isfinite(summary["train_loss"])
    loaded = model_dir_lib.load(run)
    cfg = loaded.cfg
    assert cfg.scan_layers and loaded.model.blocks.attn.wq.shape[0] == cfg.n_layers  # stacked
    trained = gemma.flat_params(nnx.state(loaded.model, nnx.Param))
    start = hf_init.load_params(hf_dir, cfg)
    # Three Adam steps at lr <= 1e-4 move the imported weights by < 3e-4 (a random init is ~0.1
    # away): the run started from the checkpoint. The zero tables learn.
    drift = max(float(np.abs(trained[k] - v).max()) for k, v in start.items() if "tables" not in k)
    assert 0 < drift < 1e-3
    assert trained["embed/tables/pos"].any() and trained["embed/tables/ner"].any()
    out = str(tmp_path / "hf_out")
    export_model_dir(run, out)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    tokens, tags = random_batch(cfg, seed=5)
    diff = max_diff(loaded.model, hf, tokens, tags)
    with capsys.disabled():
        print(f"\ntrained LIME run export: max |logit diff| {diff:.2e}")
    assert diff < 1e-4


def test_only_the_modelling_file_imports_torch_or_transformers():
    from test_architecture import forbidden_imports, import_graph

    graph = import_graph()
    library = [m for m in graph if m != "lime_jax.hf.modeling_lime_gemma"]
    found = forbidden_imports(graph, library, ["torch", "transformers"], direct_lazy=True)
    assert not found, "torch/transformers outside the exported modelling file:\n" + "\n".join(found)
