"""The annotated-document cache: ArrayRecord shards plus a JSON manifest.

Format (docs/architecture.md, "Cache on disk"): one record = one document, the bytes of a
C-order int32 array of shape [F, L] (F = number of features). Tags are stored unshifted.

Imports numpy, array_record and the standard library only: annotation workers write shards
without loading jax or TensorFlow.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
from array_record.python import array_record_module

from lime_jax import corpus
from lime_jax.hashing import sha256_file

# The manifest's "format" field. Bump the version when the meaning of stored ids changes, so
# old caches are refused (with how to rebuild them) instead of read with the wrong meaning.
FORMAT_VERSION = 2
FORMAT = f"lime_jax.cache.v{FORMAT_VERSION}"
FORMAT_CHANGE = "tag id 2 is EOS, the tag of each document's EOS piece; labels start at 3"  # from v1
MANIFEST_NAME = "manifest.json"
DEFAULT_FEATURES = ("targets", "targets_pos", "targets_ner")
SHARD_PATTERN = "shard-%05d.array_record"
_SHARD_RE = re.compile(r"^shard-\d{5}\.array_record$")
# group_size:1 makes every record its own chunk: cheap random access for Grain.
WRITER_OPTIONS = "group_size:1"
# Random-access reads (what Grain does) want no readahead.
READER_OPTIONS = "readahead_buffer_size:0"


class CacheError(ValueError):
    """A cache directory, manifest or shard is missing, malformed or inconsistent."""


class CacheFormatError(CacheError):
    """A cache written in another format version than this code reads: rebuild it."""


def shard_name(shard_index: int) -> str:
    return SHARD_PATTERN % shard_index


def _check_document(doc: np.ndarray, where: str, num_features: int | None) -> np.ndarray:
    doc = np.asarray(doc)
    if doc.ndim != 2 or doc.shape[1] == 0:
        raise CacheError(f"{where}: expected an int array of shape [F, L] with L >= 1, got "
                         f"shape {doc.shape}")
    if not np.issubdtype(doc.dtype, np.integer):
        raise CacheError(f"{where}: expected integer ids, got dtype {doc.dtype}")
    if num_features is not None and doc.shape[0] != num_features:
        raise CacheError(f"{where}: has {doc.shape[0]} features, other documents have "
                         f"{num_features}")
    if doc.min() <= 0 or doc.max() > np.iinfo(np.int32).max:
        raise CacheError(f"{where}: ids must be in [1, 2**31): 0 is PAD and may not appear "
                         f"inside a document (min {doc.min()}, max {doc.max()})")
    return np.ascontiguousarray(doc, dtype=np.int32)


def write_shard(out_dir: str, shard_index: int, docs: Sequence[np.ndarray]) -> dict:
    """Writes `docs` (int32 [F, L] each) to `shard-%05d.array_record` atomically.

    Returns the manifest entry `{"path", "num_records", "bytes", "sha256"}` (path relative to
    out_dir): the shard is hashed here, once; readers check its size and `lime-jax verify-cache`
    its hash.
    """
    name = shard_name(shard_index)
    path = os.path.join(out_dir, name)
    num_features = None
    arrays = []
    for i, doc in enumerate(docs):
        arr = _check_document(doc, f"{path}: document {i}", num_features)
        num_features = arr.shape[0]
        arrays.append(arr)
    os.makedirs(out_dir, exist_ok=True)
    # Temp name does not match the shard pattern, so a crash never leaves a half-written shard
    # that looks complete.
    tmp = os.path.join(out_dir, f".{name}.tmp-{os.getpid()}")
    writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
    try:
        for arr in arrays:
            writer.write(arr.tobytes())
    finally:
        writer.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    size, digest = os.path.getsize(tmp), sha256_file(tmp)
    os.replace(tmp, path)
    return {"path": name, "num_records": len(arrays), "bytes": size, "sha256": digest}


def write_manifest(out_dir: str, manifest: Mapping) -> None:
    """Validates and writes `manifest.json` atomically (temp file + os.replace)."""
    path = os.path.join(out_dir, MANIFEST_NAME)
    _validate_manifest(dict(manifest), path)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rebuild_command(out_dir: str, manifest: Mapping) -> str:
    """How to rebuild the cache in `out_dir` in the current format, from what its manifest
    records. An annotated cache is moved aside first: its copy of the SentencePiece model is an
    input."""
    settings = manifest.get("settings") or {}

    def flags(values: Mapping) -> str:
        return "".join(f" --{k} {v}" for k, v in values.items() if v is not None)

    if "retag" in settings:  # written by `annotate --from-cache`
        src = manifest.get("retagged_from", {}).get("path", "SOURCE_CACHE")
        tags = manifest.get("tag_source", "SOURCE")
        tagger = " (and retrain the tagger with `lime-jax tagger train` on a rebuilt cache)"
        return (f"rebuild {src} first{tagger if tags.startswith('tagger:') else ''}, then: lime-jax annotate "
                f"--from-cache {src} --tags {tags} --out {out_dir} --overwrite"
                + flags({"window": settings["retag"].get("window"), "max-docs": settings["retag"].get("max_docs")}))
    if "inputs" not in settings:  # not written by `lime-jax annotate` (e.g. cache.write_cache)
        return f"lime-jax annotate --input INPUT --spm SPM_MODEL --out {out_dir} --overwrite"
    bundled = {p.name: f"bundled:{split}" for split, p in corpus.BUNDLED.items()}
    names = [i["name"] for i in settings["inputs"]]
    old = f"{out_dir.rstrip(os.sep)}.old"
    cmd = (f"mv {out_dir} {old} && lime-jax annotate --input {' '.join(bundled.get(n, n) for n in names)} "
           f"--spm {os.path.join(old, manifest.get('spm_model', 'spm.model'))} --out {out_dir}"
           + flags({"tokenization": settings.get("tokenization"), "ner-scheme": settings.get("ner_scheme"),
                    "spacy-model": settings.get("spacy_model"), "docs-per-shard": settings.get("docs_per_shard"),
                    "max-docs": settings.get("max_docs"), "utf8-errors": settings.get("utf8_errors")}))
    if not all(n in bundled for n in names):
        cmd += " (the manifest records the inputs' file names only: give their paths)"
    return cmd


def _check_format(manifest: Mapping, path: str) -> None:
    """Raises CacheFormatError, saying how to rebuild the cache, unless `manifest` (read from
    `path`) is of format FORMAT: every reader goes through here (`load_manifest`)."""
    found = manifest.get("format")
    if found == FORMAT:
        return
    out_dir = os.path.dirname(path) or "."
    raise CacheFormatError(
        f"{path}: field 'format': the cache in {out_dir} has format {found!r}, this lime_jax reads "
        f"{FORMAT!r} ({FORMAT_CHANGE}); rebuild it: {rebuild_command(out_dir, manifest)}")


def _validate_manifest(manifest: dict, path: str) -> dict:
    def fail(field: str, msg: str):
        raise CacheError(f"{path}: field {field!r}: {msg}")

    _check_format(manifest, path)
    features = manifest.get("features")
    if (not isinstance(features, list) or not features
            or not all(isinstance(f, str) and f for f in features)
            or len(set(features)) != len(features)):
        fail("features", f"expected a non-empty list of distinct names, got {features!r}")
    if features[0] != "targets":
        fail("features", f"the first feature must be 'targets', got {features!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        fail("shards", f"expected a list, got {type(shards).__name__}")
    seen = set()
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            fail(f"shards[{i}]", "expected an object")
        p = s.get("path")
        if not isinstance(p, str) or not _SHARD_RE.match(p):
            fail(f"shards[{i}].path", f"expected 'shard-NNNNN.array_record', got {p!r}")
        if p in seen:
            fail(f"shards[{i}].path", f"{p} is listed twice")
        seen.add(p)
        n = s.get("num_records")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            fail(f"shards[{i}].num_records", f"expected an int >= 0, got {n!r}")
        b = s.get("bytes", 0)  # absent in caches written before shard sizes were recorded
        if not isinstance(b, int) or isinstance(b, bool) or b < 0:
            fail(f"shards[{i}].bytes", f"expected an int >= 0, got {b!r}")
        h = s.get("sha256")
        if not isinstance(h, str) or not re.fullmatch(r"[0-9a-f]{64}", h):
            fail(f"shards[{i}].sha256", f"expected 64 hex digits, got {h!r}")
    sizes = manifest.get("vocab_sizes")
    if not isinstance(sizes, dict) or set(sizes) != set(features):
        fail("vocab_sizes", f"expected one size per feature {features}, got {sizes!r}")
    for k, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 2:
            fail(f"vocab_sizes.{k}", f"expected an int >= 2, got {v!r}")
    return manifest


def load_manifest(out_dir: str) -> dict:
    """Reads and validates `out_dir/manifest.json`."""
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isdir(out_dir):
        raise CacheError(f"{out_dir}: cache directory does not exist")
    if not os.path.isfile(path):
        raise CacheError(f"{path}: manifest not found (was the cache written completely?)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    except UnicodeDecodeError as e:
        raise CacheError(f"{path}: not UTF-8 text (byte {e.start}): not a manifest written by lime_jax") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{path}: expected a JSON object at the top level")
    return _validate_manifest(manifest, path)


def shard_paths(out_dir: str, manifest: Mapping) -> list[str]:
    return [os.path.join(out_dir, s["path"]) for s in manifest["shards"]]


def read_document(rec_bytes: bytes, num_features: int, where: str = "record") -> np.ndarray:
    """Decodes one record into an int32 array [num_features, L]."""
    if len(rec_bytes) == 0 or len(rec_bytes) % (4 * num_features):
        raise CacheError(f"{where}: {len(rec_bytes)} bytes is not an int32 array of "
                         f"{num_features} features x L >= 1 positions")
    return np.frombuffer(rec_bytes, np.int32).reshape(num_features, -1)


def check_vocab_sizes(out_dir: str, manifest: Mapping, expected: Mapping[str, int]) -> None:
    """Raises CacheError when the cache was built with other vocab sizes than `expected`."""
    path = os.path.join(out_dir, MANIFEST_NAME)
    have = manifest["vocab_sizes"]
    for feature, size in expected.items():
        if feature not in have:
            raise CacheError(f"{path}: field 'vocab_sizes.{feature}': the config asks for "
                             f"feature {feature!r} (size {size}), the cache has only "
                             f"{sorted(have)}")
        if have[feature] != size:
            raise CacheError(f"{path}: field 'vocab_sizes.{feature}': cache was built with "
                             f"size {have[feature]}, the config asks for {size}; rebuild the "
                             f"cache or fix the config")


def stray_shards(out_dir: str, manifest: Mapping) -> list[str]:
    """Shard files in `out_dir` that the manifest does not list."""
    listed = {s["path"] for s in manifest["shards"]}
    return sorted(n for n in os.listdir(out_dir) if _SHARD_RE.match(n) and n not in listed)


def check_shard(out_dir: str, manifest: Mapping, i: int, check_hash: bool = True) -> str | None:
    """What is wrong with shard `i` of the manifest (missing, another size than recorded,
    another sha256 when `check_hash`, unreadable, another record count), or None."""
    entry = manifest["shards"][i]
    path = os.path.join(out_dir, entry["path"])
    mpath = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return f"{path}: shard listed in {mpath} (shards[{i}]) is missing"
    size = os.path.getsize(path)
    if "bytes" in entry and size != entry["bytes"]:
        return (f"{path}: {size} bytes, manifest field 'shards[{i}].bytes' says {entry['bytes']} "
                "(truncated or rewritten shard)")
    if check_hash:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            return (f"{path}: sha256 {digest[:12]}... does not match manifest field "
                    f"'shards[{i}].sha256' {entry['sha256'][:12]}... (truncated, corrupt or rewritten shard)")
    try:
        reader = open_reader(path)
    except CacheError as e:
        return str(e)
    try:
        n = reader.num_records()
    finally:
        reader.close()
    if n != entry["num_records"]:
        return f"{path}: holds {n} records, manifest field 'shards[{i}].num_records' says {entry['num_records']}"
    return None


def verify_cache(out_dir: str, expected_vocab_sizes: Mapping[str, int] | None = None,
                 check_hashes: bool = True, check_records: bool = False) -> dict:
    """Checks a cache directory against its manifest; returns the manifest.

    Raises CacheError (naming the file and field) for a missing, truncated or corrupt shard
    (size, sha256 or record-count mismatch, unreadable ArrayRecord), shard files the manifest
    does not list, or vocab sizes other than `expected_vocab_sizes`. `check_hashes=False` skips
    hashing (what training does at start: shards were hashed when written, and
    `lime-jax verify-cache` hashes them again). `check_records` also decodes every record and
    checks its shape and id ranges (reads the whole cache).
    """
    manifest = load_manifest(out_dir)
    mpath = os.path.join(out_dir, MANIFEST_NAME)
    if expected_vocab_sizes is not None:
        check_vocab_sizes(out_dir, manifest, expected_vocab_sizes)
    stray = stray_shards(out_dir, manifest)
    if stray:
        raise CacheError(f"{mpath}: field 'shards': does not list {stray} found in {out_dir} "
                         "(manifest and shards come from different runs?)")
    features = manifest["features"]
    num_features = len(features)
    sizes = np.array([manifest["vocab_sizes"][f] for f in features], np.int64)[:, None]
    for i, path in enumerate(shard_paths(out_dir, manifest)):
        problem = check_shard(out_dir, manifest, i, check_hash=check_hashes)
        if problem is not None:
            raise CacheError(problem)
        if not check_records or not manifest["shards"][i]["num_records"]:
            continue
        reader = open_reader(path)
        try:
            records = reader.read_all()
        except RuntimeError as e:
            raise CacheError(f"{path}: corrupt ArrayRecord data ({e})") from None
        finally:
            reader.close()
        for j, rec in enumerate(records):
            doc = read_document(rec, num_features, f"{path}: record {j}")
            bad = (doc <= 0) | (doc >= sizes)
            if bad.any():
                f = int(np.nonzero(bad.any(axis=1))[0][0])
                raise CacheError(f"{path}: record {j}, feature {features[f]!r}: ids "
                                 f"must be in [1, {int(sizes[f, 0])})")
    return manifest


def read_documents(out_dir: str, max_docs: int | None = None, check_hashes: bool = True
                   ) -> tuple[list[np.ndarray], dict]:
    """The first `max_docs` (default all) documents of a verified cache, int32 [F, L] each, in
    shard order, and its manifest."""
    manifest = verify_cache(out_dir, check_hashes=check_hashes)
    docs: list[np.ndarray] = []
    for path in shard_paths(out_dir, manifest):
        if max_docs is not None and len(docs) >= max_docs:
            break
        reader = open_reader(path)
        try:
            records = reader.read_all()
        finally:
            reader.close()
        docs += [read_document(r, len(manifest["features"]), f"{path}: record {i}") for i, r in enumerate(records)]
    return docs[:max_docs], manifest


def open_reader(path: str, options: str = READER_OPTIONS):
    """Opens an ArrayRecord file, raising CacheError when it is not a readable one."""
    try:
        reader = array_record_module.ArrayRecordReader(path, options)
    except Exception as e:  # the C++ reader raises RuntimeError/ValueError variants
        raise CacheError(f"{path}: unreadable ArrayRecord file ({e})") from None
    # A truncated or garbage file opens without an exception but in a failed state.
    if not reader.ok():
        raise CacheError(f"{path}: unreadable ArrayRecord file (truncated or corrupt; no valid "
                         "footer/index)")
    return reader


def write_cache(out_dir: str, docs: Sequence[np.ndarray], vocab_sizes: Mapping[str, int],
                features: Sequence[str] = DEFAULT_FEATURES, docs_per_shard: int = 1000,
                extra: Mapping | None = None) -> dict:
    """Writes `docs` as shards of `docs_per_shard` plus a manifest (tests, benchmarks, tools).

    `extra` adds manifest fields (e.g. `spm_model`, `tokenization`). Returns the manifest.
    """
    if docs_per_shard < 1:
        raise ValueError(f"docs_per_shard must be >= 1, got {docs_per_shard}")
    shards = [write_shard(out_dir, k, docs[start:start + docs_per_shard])
              for k, start in enumerate(range(0, len(docs), docs_per_shard))]
    manifest = {**(extra or {}), "format": FORMAT, "features": list(features),
                "shards": shards, "vocab_sizes": dict(vocab_sizes)}
    write_manifest(out_dir, manifest)
    return manifest
