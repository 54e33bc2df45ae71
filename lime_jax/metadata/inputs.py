"""Reading input corpora: text files (a document per line) and JSONL files (a `text` field).

Files may be compressed (.gz, .xz). Input must be UTF-8: a bad byte is an error that names the
file, line and byte offset, unless the caller asks for replacement characters explicitly.
"""
from __future__ import annotations

import glob
import gzip
import lzma
import os
from collections.abc import Iterator, Sequence

from lime_jax import corpus

BUNDLED_PREFIX = "bundled:"


def resolve_inputs(patterns: Sequence[str]) -> list[str]:
    """Expands globs and `bundled:<split>` names into a sorted, de-duplicated file list."""
    paths: list[str] = []
    for pattern in patterns:
        if pattern.startswith(BUNDLED_PREFIX):
            split = pattern[len(BUNDLED_PREFIX):]
            if split not in corpus.BUNDLED:
                raise ValueError(f"unknown bundled split {split!r}; choose one of {sorted(corpus.BUNDLED)}")
            paths.append(str(corpus.BUNDLED[split]))
            continue
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if not os.path.isdir(m)]
        if not matches:
            raise ValueError(f"no input files match {pattern!r}")
        for m in matches:
            if not os.path.exists(m):
                raise ValueError(f"input file {m} does not exist")
        paths.extend(matches)
    return list(dict.fromkeys(paths))


def _iter_text_lines(path: str, errors: str) -> Iterator[tuple[str, str]]:
    offset, line_no = 0, 0
    with corpus.open_binary(path) as f:
        try:
            for line_no, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8", errors=errors)
                except UnicodeDecodeError as e:
                    raise ValueError(
                        f"{path}: line {line_no}: invalid UTF-8 byte 0x{raw[e.start]:02x} at byte "
                        f"offset {offset + e.start} (pass --utf8-errors replace to substitute U+FFFD)"
                    ) from None
                offset += len(raw)
                yield f"{os.path.basename(path)}:{line_no}", line.rstrip("\r\n")
        except (lzma.LZMAError, EOFError, gzip.BadGzipFile) as e:
            raise ValueError(f"{path}: corrupt compressed data after line {line_no}: {e}") from None


def iter_input_documents(patterns: Sequence[str], errors: str = "strict") -> Iterator[tuple[str, str]]:
    """Yields (document id, text) over all inputs in order; empty documents included."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"utf8 error policy must be 'strict' or 'replace', not {errors!r}")
    for path in resolve_inputs(patterns):
        name = path[:-3] if path.endswith((".gz", ".xz")) else path
        if name.endswith(".jsonl"):
            yield from corpus.iter_documents(path, errors=errors)
        else:
            yield from _iter_text_lines(path, errors)
