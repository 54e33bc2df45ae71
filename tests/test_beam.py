"""`lime-jax annotate --runner beam` on the DirectRunner: the same examples as the local
multi-process path (order aside), spaCy loaded once per worker, the same manifest contract."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("apache_beam")

from lime_jax.cli import annotate  # noqa: E402
from lime_jax.data import cache as cache_lib  # noqa: E402

TEXTS_A = [
    "The Congress shall assemble at least once in every year.",
    "",
    "President Lincoln spoke in Gettysburg, Pennsylvania, in November 1863.",
    "We hold these truths to be self-evident, that all men are created equal.",
    "Emoji 🙂 and ﬁne ligatures don't break anything.",
] * 3
TEXTS_B = [
    "The Senate of the United States shall be composed of two Senators from each State.",
    "   ",
    "Washington crossed the Delaware on December 25, 1776.",
] * 3


def _records(out_dir):
    manifest = cache_lib.verify_cache(out_dir, check_records=True)
    recs = []
    for path in cache_lib.shard_paths(out_dir, manifest):
        reader = cache_lib.open_reader(path)
        recs += reader.read_all()
        reader.close()
    return manifest, recs


@pytest.fixture
def inputs(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("\n".join(TEXTS_A) + "\n", encoding="utf-8")
    b.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS_B), encoding="utf-8")
    return [str(a), str(b)]


def test_beam_cache_equals_local_cache(tmp_path, inputs, spm_model, capsys):
    common = ["--input", *inputs, "--spm", spm_model, "--docs-per-shard", "4"]
    local_out, beam_out = str(tmp_path / "local"), str(tmp_path / "beam")
    assert annotate.main([*common, "--out", local_out, "--workers", "2"]) == 0
    assert annotate.main([*common, "--out", beam_out, "--runner", "beam",
                          "--beam_options=--runner=DirectRunner --direct_num_workers=1"]) == 0
    m_local, r_local = _records(local_out)
    m_beam, r_beam = _records(beam_out)
    assert sorted(r_beam) == sorted(r_local) and len(r_beam) == 18  # 24 documents, 6 empty
    for key in ("features", "vocab_sizes", "vocab_files", "tokenization", "spacy", "counts", "spm_sha256"):
        assert m_beam[key] == m_local[key], key
    for name in ("spm.model", "vocab_pos.json", "vocab_ner.json"):
        with open(os.path.join(local_out, name), "rb") as f1, open(os.path.join(beam_out, name), "rb") as f2:
            assert f1.read() == f2.read(), name
    beam_info = m_beam["throughput"]["beam"]
    # Shards are cut per input file: 4 + 4 + 4 + 3 of a.txt, 4 + 4 + 1 of b.jsonl.
    assert beam_info["shards"] == len(m_beam["shards"]) == 7
    # spaCy + SentencePiece loaded once per worker (one in-process worker), not once per shard.
    assert beam_info["processor_loads"] == 1
    assert not os.path.exists(os.path.join(beam_out, ".beam-staging"))

    # The cache feeds the loader like a local one.
    from lime_jax.data import loader

    batch = next(iter(loader.build_dataset(beam_out, seq_len=32, batch_size=2, shard_index=0, shard_count=1,
                                           read_threads=1)))
    assert batch["decoder_input_pos"].shape == (2, 32) and np.any(batch["decoder_input_pos"] > 1)

    # A re-run with the same settings is a no-op; the local cache's settings differ (runner).
    capsys.readouterr()
    assert annotate.main([*common, "--out", beam_out, "--runner", "beam"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert annotate.main([*common, "--out", local_out, "--runner", "beam"]) == 1
    assert "other inputs or settings" in capsys.readouterr().err


def test_beam_rejects_max_docs_over_several_files(tmp_path, inputs, spm_model, capsys):
    assert annotate.main(["--input", *inputs, "--spm", spm_model, "--out", str(tmp_path / "c"),
                          "--runner", "beam", "--max-docs", "3"]) == 1
    assert "needs a single input file" in capsys.readouterr().err


def test_beam_empty_input_is_a_clear_error(tmp_path, spm_model, capsys):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    assert annotate.main(["--input", str(path), "--spm", spm_model, "--out", str(tmp_path / "c"),
                          "--runner", "beam"]) == 1
    assert f"no documents in {path}: the input is empty" in capsys.readouterr().err
