"""Parquet and Arrow IPC corpora: the same documents, caches and bad-input rules as JSONL."""
import json
import os

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from pyarrow import ipc

from lime_jax import corpus
from lime_jax.annotation import inputs, local_runner, spm
from lime_jax.cli import annotate, spm_train
from lime_jax.data import cache as cache_lib

TEXTS = [  # empty and blank documents included: they are documents in every format
    "The Senate met in Philadelphia in December 1790.",
    "",
    "Madison wrote to Jefferson about the café on Market Street.",
    "   ",
    "Congress funded the canal, the road and 12 lighthouses.",
]


def _jsonl(path, values, field="text"):
    path.write_text("".join(json.dumps({field: v}) + "\n" for v in values), encoding="utf-8")
    return str(path)


def _parquet(path, columns, **kwargs):
    pq.write_table(pa.table(columns), path, **kwargs)
    return str(path)


def _arrow_stream(path, table, max_chunksize):
    with ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=max_chunksize)
    return str(path)


def _shards(out):
    manifest = cache_lib.verify_cache(out, check_records=True)
    return manifest, [s["sha256"] for s in manifest["shards"]]


def test_every_format_reads_the_same_documents_batch_by_batch(tmp_path, monkeypatch):
    """Small batches over files of several row groups / record batches: every row, in order."""
    monkeypatch.setattr(inputs, "BATCH_ROWS", 4)
    texts = [f"document {i}: {t}" for i, t in enumerate(TEXTS * 6)]  # 30 rows
    table = pa.table({"id": list(range(30)), "text": texts})
    paths = {
        "jsonl": _jsonl(tmp_path / "d.jsonl", texts),
        "parquet": _parquet(tmp_path / "d.parquet", table, row_group_size=7),
        "arrow": str(tmp_path / "d.arrow"),
        "feather": str(tmp_path / "d.feather"),
        "stream": _arrow_stream(tmp_path / "d.arrows", table, max_chunksize=9),
    }
    feather.write_feather(table, paths["arrow"], chunksize=11)
    feather.write_feather(table.cast(pa.schema([("id", pa.int64()), ("text", pa.large_string())])),
                          paths["feather"], chunksize=30)
    assert pq.ParquetFile(paths["parquet"]).num_row_groups == 5
    for kind, path in paths.items():
        docs = list(inputs.iter_input_documents([path]))
        assert [t for _, t in docs] == texts, kind
        if kind != "jsonl":
            name = os.path.basename(path)
            assert [d for d, _ in docs] == [f"{name}:row {i}" for i in range(30)], kind


def test_parquet_is_streamed_not_loaded_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "BATCH_ROWS", 50)
    texts = [f"{i:06d} " + "x" * 20_000 for i in range(1000)]  # 20 MB of text
    path = _parquet(tmp_path / "big.parquet", {"text": texts}, row_group_size=50, compression="zstd")
    base, peak, n = pa.total_allocated_bytes(), 0, 0
    for n, (_, text) in enumerate(inputs.iter_input_documents([path]), start=1):
        assert text == texts[n - 1]
        peak = max(peak, pa.total_allocated_bytes() - base)
    assert n == 1000 and peak < 5_000_000  # Arrow memory for a batch of 50 rows (1 MB), not 20 MB


def test_text_field_for_jsonl_and_parquet(tmp_path):
    body = ["first body", "second body"]
    jsonl = _jsonl(tmp_path / "b.jsonl", body, field="body")
    parquet = _parquet(tmp_path / "b.parquet", {"text": ["not this", "nor this"], "body": body})
    for path in (jsonl, parquet):
        assert [t for _, t in inputs.iter_input_documents([path], text_field="body")] == body
    with pytest.raises(corpus.RecordError, match=r"b.jsonl:1: no field 'text' \(fields: body\)"):
        list(inputs.iter_input_documents([jsonl]))


def test_bad_files_are_named(tmp_path):
    good = _jsonl(tmp_path / "a.jsonl", ["fine"])
    no_column = _parquet(tmp_path / "n.parquet", {"body": ["x"], "year": [1]})
    with pytest.raises(ValueError, match=r"n.parquet: no column 'text' \(columns: body, year; --text-field"):
        inputs.resolve_inputs([good, no_column])
    ints = _parquet(tmp_path / "i.parquet", {"text": [1, 2]})
    with pytest.raises(ValueError, match=r"i.parquet: column 'text' holds int64, not strings"):
        inputs.resolve_inputs([ints])
    fake = tmp_path / "f.arrow"
    fake.write_text("not arrow\n")
    with pytest.raises(ValueError, match=r"f.arrow: not a readable Parquet/Arrow file"):
        inputs.resolve_inputs([str(fake)])
    table = pa.table({"text": [f"row {i} " * 50 for i in range(100)]})
    cut = _arrow_stream(tmp_path / "cut.arrows", table, max_chunksize=10)
    with open(cut, "rb+") as f:  # an interrupted copy: the schema reads, a later batch does not
        f.truncate(os.path.getsize(cut) // 2)
    with pytest.raises(ValueError, match=r"cut.arrows: corrupt data from row 50 on: Expected to"):
        list(inputs.iter_input_documents([cut]))
    squeezed = tmp_path / "s.parquet.gz"
    squeezed.write_bytes(b"")
    with pytest.raises(ValueError, match=r"s.parquet.gz: Parquet and Arrow inputs are read uncompressed"):
        inputs.resolve_inputs([str(squeezed)])


def test_parquet_bad_utf8_names_file_row_and_byte(tmp_path):
    raw = pa.array([b"ok", b"caf\xe9"], pa.binary()).view(pa.string())  # Arrow does not check UTF-8
    path = _parquet(tmp_path / "u.parquet", {"text": raw})
    with pytest.raises(corpus.Utf8Error, match=r"u.parquet:row 1: invalid UTF-8 byte 0xe9 at byte 3 of field 'text'"):
        list(inputs.iter_input_documents([path]))
    assert [t for _, t in inputs.iter_input_documents([path], errors="replace")] == ["ok", "caf\ufffd"]


def test_parquet_cache_equals_jsonl_cache(tmp_path, spm_model):
    jsonl = _jsonl(tmp_path / "docs.jsonl", TEXTS * 2)
    parquet = _parquet(tmp_path / "docs.parquet", {"text": TEXTS * 2}, row_group_size=5)
    common = ["--spm", spm_model, "--docs-per-shard", "5"]
    assert annotate.main(["--input", jsonl, *common, "--out", str(tmp_path / "j")]) == 0
    assert annotate.main(["--input", parquet, *common, "--out", str(tmp_path / "p")]) == 0
    m_j, shards_j = _shards(str(tmp_path / "j"))
    m_p, shards_p = _shards(str(tmp_path / "p"))
    assert shards_p == shards_j and len(shards_j) == 2  # byte-identical shard files
    assert m_p["counts"] == m_j["counts"] and m_j["counts"]["records"] == 6


def test_null_rows_fail_or_are_skipped_and_counted_and_a_failed_run_resumes(tmp_path, spm_model, capsys):
    values = [f"Document number {i} is about the Senate." for i in range(12)]
    values[9] = None
    parquet = _parquet(tmp_path / "n.parquet", {"text": pa.array(values, pa.string())})
    out = str(tmp_path / "p")
    common = ["--spm", spm_model, "--docs-per-shard", "4"]

    assert annotate.main(["--input", parquet, *common, "--out", out]) == 1
    assert f"{parquet}:row 9: field 'text' is null" in capsys.readouterr().err
    with open(os.path.join(out, local_runner.PROGRESS_NAME)) as f:
        assert len(json.load(f)["shards"]) == 2  # the shards before the bad row are kept

    assert annotate.main(["--input", parquet, *common, "--out", out, "--on-error", "skip"]) == 0
    err = capsys.readouterr().err
    assert "resuming: 2 shards already written" in err and "skipped document n.parquet:row 9" in err
    manifest, shards = _shards(out)
    assert manifest["counts"]["documents"] == 12 and manifest["counts"]["skipped_documents"] == 1
    assert manifest["counts"]["records"] == 11
    assert manifest["skipped_documents"] == [
        {"id": "n.parquet:row 9", "error": f"RecordError: {parquet}:row 9: field 'text' is null"}]

    # The same documents as JSONL, the bad one a JSON null, the bad record sent to a worker
    # process: the same cache, skipped alike.
    jsonl = _jsonl(tmp_path / "n.jsonl", values)
    assert annotate.main(["--input", jsonl, *common, "--out", str(tmp_path / "j"), "--on-error", "skip",
                          "--workers", "2"]) == 0
    m_j, shards_j = _shards(str(tmp_path / "j"))
    assert shards_j == shards and m_j["counts"] == manifest["counts"]
    assert [s["id"] for s in m_j["skipped_documents"]] == ["n.jsonl:10"]


def test_missing_column_stops_before_any_work(tmp_path, spm_model, capsys):
    parquet = _parquet(tmp_path / "c.parquet", {"body": TEXTS})
    out = tmp_path / "cache"
    assert annotate.main(["--input", parquet, "--spm", spm_model, "--out", str(out)]) == 1
    assert f"{parquet}: no column 'text' (columns: body;" in capsys.readouterr().err
    assert not out.exists()
    assert annotate.main(["--input", parquet, "--spm", spm_model, "--out", str(out), "--text-field", "body"]) == 0
    assert cache_lib.load_manifest(str(out))["settings"]["text_field"] == "body"


def test_spm_train_from_parquet_equals_jsonl(tmp_path):
    import itertools

    texts = [t for _, t in itertools.islice(corpus.iter_documents(corpus.BUNDLED["train"]), 200)]
    jsonl = _jsonl(tmp_path / "s.jsonl", texts)
    parquet = _parquet(tmp_path / "s.parquet", {"body": texts}, row_group_size=64)
    for name, path, extra in (("j", jsonl, []), ("p", parquet, ["--text-field", "body"])):
        assert spm_train.main(["--input", path, *extra, "--vocab-size", "512", "--out", str(tmp_path / name)]) == 0
    j, p = spm.Tokenizer(str(tmp_path / "j.model")), spm.Tokenizer(str(tmp_path / "p.model"))
    assert [p.id_to_piece(i) for i in range(512)] == [j.id_to_piece(i) for i in range(512)]


def test_beam_reads_parquet_like_the_local_runner(tmp_path, spm_model):
    pytest.importorskip("apache_beam")
    values = [*TEXTS, None, *TEXTS]
    parquet = _parquet(tmp_path / "b.parquet", {"text": pa.array(values, pa.string())})
    common = ["--input", parquet, "--spm", spm_model, "--docs-per-shard", "4", "--on-error", "skip"]
    assert annotate.main([*common, "--out", str(tmp_path / "local")]) == 0
    assert annotate.main([*common, "--out", str(tmp_path / "beam"), "--runner", "beam",
                          "--beam_options=--runner=DirectRunner --direct_num_workers=1"]) == 0
    m_local, shards_local = _shards(str(tmp_path / "local"))
    m_beam, shards_beam = _shards(str(tmp_path / "beam"))
    # One input file: Beam cuts the same shards.
    assert shards_beam == shards_local and m_beam["counts"] == m_local["counts"]
    assert m_beam["skipped_documents"] == m_local["skipped_documents"]
    assert [s["id"] for s in m_beam["skipped_documents"]] == ["b.parquet:row 5"]
