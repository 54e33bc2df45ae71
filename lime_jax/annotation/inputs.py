"""Reading input corpora: text files (a document per line) and JSONL files (a `text` field).

Files may be compressed (.gz, .xz). Input must be UTF-8: a bad byte is an error that names the
file, line and byte offset, unless the caller asks for replacement characters explicitly.
"""
from __future__ import annotations

import glob
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
    name = os.path.basename(path)
    for lineno, line in corpus.iter_lines(path, errors):
        yield f"{name}:{lineno}", line


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
