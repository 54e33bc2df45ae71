"""Re-tagging a cache with an honest tag source keeps the token stream and names the source."""
import json

import numpy as np
import pytest

from lime_jax.annotation import local_runner, tag_sources
from lime_jax.annotation.retag import retag_cache
from lime_jax.annotation.worker import ProcessorSpec
from lime_jax.data import cache as cache_lib
from lime_jax.ids import EOS_TAG_ID

TEXTS = [
    "President Lincoln spoke in Gettysburg in 1863. The nation mourned.",
    "We will balance the budget by 1999, said the Secretary of the Treasury.",
    "Unquestionably, Congress must act.",
]


@pytest.fixture(scope="module")
def oracle_cache(tmp_path_factory, spm_model):
    root = tmp_path_factory.mktemp("retag")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = str(root / "oracle")
    local_runner.annotate_corpus([str(corpus)], out, ProcessorSpec(spm_model), docs_per_shard=2)
    return out


def test_prefix_retag_keeps_pieces_and_names_the_source(oracle_cache, tmp_path, annotator, spm_model):
    out = str(tmp_path / "prefix")
    manifest = retag_cache(oracle_cache, out, tag_sources.PREFIX)
    oracle_docs, oracle_manifest = cache_lib.read_documents(oracle_cache)
    docs, _ = cache_lib.read_documents(out)
    assert oracle_manifest["tag_source"] == "oracle"
    assert manifest["tag_source"] == "prefix" and manifest["tag_source_honest"] is True
    assert [s["num_records"] for s in manifest["shards"]] == [2, 1]  # same shard layout
    features = manifest["features"]
    tok, sub = features.index("targets"), features.index("subword_index")
    rows = [features.index(f"targets_{t}") for t in tag_sources.TAG_ROWS]
    from lime_jax.annotation.spm import Tokenizer

    want = tag_sources.prefix_tags(Tokenizer(spm_model), annotator, [d[tok, :-1] for d in oracle_docs])
    changed = 0
    for doc, oracle, tags in zip(docs, oracle_docs, want):
        np.testing.assert_array_equal(doc[[tok, sub]], oracle[[tok, sub]])
        np.testing.assert_array_equal(doc[rows, :-1], tags)
        np.testing.assert_array_equal(doc[rows, -1], [EOS_TAG_ID, EOS_TAG_ID])  # EOS keeps its tag
        changed += int((doc[rows] != oracle[rows]).sum())
    assert changed > 0  # prefix tags differ from oracle ones somewhere on these sentences
    # Same settings again: a no-op; other settings: an error unless overwrite.
    assert retag_cache(oracle_cache, out, tag_sources.PREFIX)["shards"] == manifest["shards"]
    with pytest.raises(ValueError, match="other inputs or settings"):
        retag_cache(oracle_cache, out, tag_sources.PREFIX, window=4)


def test_windows_restart_the_prefix(oracle_cache, tmp_path, annotator, spm_model):
    from lime_jax.annotation.spm import Tokenizer

    out = str(tmp_path / "w")
    retag_cache(oracle_cache, out, tag_sources.PREFIX, window=5, max_docs=1)
    docs, manifest = cache_lib.read_documents(out)
    assert len(docs) == 1
    features = manifest["features"]
    rows = [features.index(f"targets_{t}") for t in tag_sources.TAG_ROWS]
    pieces = docs[0][features.index("targets"), :-1]
    tok = Tokenizer(spm_model)
    for start in range(0, len(pieces), 5):
        want = tag_sources.prefix_tags(tok, annotator, [pieces[start:start + 5]])[0]
        np.testing.assert_array_equal(docs[0][rows, start:min(start + 5, len(pieces))], want)


def test_bad_requests_fail_before_work(oracle_cache, tmp_path):
    with pytest.raises(ValueError, match="already holds oracle tags"):
        retag_cache(oracle_cache, str(tmp_path / "o"), tag_sources.ORACLE)
    with pytest.raises(ValueError, match="max_pieces=3"):
        retag_cache(oracle_cache, str(tmp_path / "p"), tag_sources.PREFIX, max_pieces=3)
    with pytest.raises(ValueError, match="pass the loaded tagger"):
        retag_cache(oracle_cache, str(tmp_path / "t"), tag_sources.TagSource("tagger", str(tmp_path)))
    with pytest.raises(cache_lib.CacheError):
        retag_cache(str(tmp_path / "missing"), str(tmp_path / "m"), tag_sources.PREFIX)


def test_cli_with_worker_processes_matches_the_library(oracle_cache, tmp_path, capsys):
    from lime_jax.cli import annotate

    lib, cli = str(tmp_path / "lib"), str(tmp_path / "cli")
    retag_cache(oracle_cache, lib, tag_sources.PREFIX)
    assert annotate.main(["--from-cache", oracle_cache, "--tags", "prefix", "--workers", "2", "--out", cli]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tag_source"] == "prefix"
    for a, b in zip(cache_lib.read_documents(lib)[0], cache_lib.read_documents(cli)[0]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(SystemExit) as exit_:  # an honest source needs pieces: a clear usage error
        annotate.main(["--input", "bundled:heldout", "--spm", "x.model", "--tags", "prefix", "--out", cli])
    assert exit_.value.code == 2 and "--from-cache" in capsys.readouterr().err


def _random_lime_dir(root, spm_model, cache_dir, shift):
    from flax import nnx
    from test_evaluate import numpy_model

    from lime_jax.annotation.spm import Tokenizer
    from lime_jax.inference import model_dir
    from lime_jax.model import ModelConfig

    cfg = ModelConfig(vocab_size=Tokenizer(spm_model).vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                      d_ff=32, metadata=(("pos", 53), ("ner", 40)), dtype="float32")
    out = str(root / f"shift{shift}")
    model_dir.save_model_dir(out, cfg, nnx.state(numpy_model(cfg), nnx.Param), step=1, seq_len=16, shift=shift,
                             cache_dir=cache_dir, eval_cache_dir=cache_dir)
    return model_dir.load(out)


def test_eval_with_prefix_tags_equals_eval_on_the_retagged_cache(oracle_cache, tmp_path, spm_model):
    """`lime-jax eval --tags prefix` re-tags each seq_len window in memory; the same numbers come
    from evaluating a cache re-tagged by `annotate --from-cache --tags prefix --window seq_len`."""
    from lime_jax.evaluation import evaluate

    loaded = _random_lime_dir(tmp_path, spm_model, oracle_cache, shift=0)
    honest = evaluate.evaluate(loaded, ["heldout"], tags=tag_sources.PREFIX)
    retagged = str(tmp_path / "prefix16")
    retag_cache(oracle_cache, retagged, tag_sources.PREFIX, window=16)
    cached = evaluate.evaluate(loaded, ["heldout"], eval_cache_dir=retagged)
    oracle = evaluate.evaluate(loaded, ["heldout"])
    assert honest["tag_source"] == cached["tag_source"] == "prefix" and honest["tags_honest"] and cached["tags_honest"]
    assert oracle["tag_source"] == "oracle" and not oracle["tags_honest"]
    assert honest["heldout"]["loss"] == pytest.approx(cached["heldout"]["loss"], rel=1e-6)
    assert honest["heldout"]["accuracy"] == cached["heldout"]["accuracy"]
    assert honest["heldout"]["loss"] != pytest.approx(oracle["heldout"]["loss"], rel=1e-6)  # the tags matter
    assert evaluate.results_path(loaded.run.model_dir, "prefix").endswith("eval_results_prefix.json")
    plus1 = _random_lime_dir(tmp_path, spm_model, oracle_cache, shift=1)
    with pytest.raises(ValueError, match="no tag source is honest"):
        evaluate.evaluate(plus1, ["heldout"], tags=tag_sources.PREFIX)
