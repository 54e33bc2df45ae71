"""The bundled default corpus (State of the Union speeches) and a reader for JSONL documents.

`BUNDLED` names the two bundled splits; `iter_documents` reads any `.jsonl`, `.jsonl.xz` or
`.jsonl.gz` file of `{"id": ..., "text": ...}` objects (the text field's name is a parameter).
See README.md beside this file for provenance, the split rule and how to rebuild the data.
"""
from __future__ import annotations

import gzip
import json
import lzma
from collections.abc import Iterator
from pathlib import Path

_HERE = Path(__file__).resolve().parent
BUNDLED: dict[str, Path] = {
    "train": _HERE / "sotu_train.jsonl.xz",
    "heldout": _HERE / "sotu_heldout.jsonl.xz",
}


def open_binary(path: str | Path):
    """Opens a file for reading bytes, decompressing `.xz` and `.gz` by their suffix."""
    name = str(path)
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


class Utf8Error(ValueError):
    """Input that is not valid UTF-8 (the message names the file, line and byte offset)."""


class RecordError(ValueError):
    """A record that holds no document: a malformed JSONL line, a missing, null or non-string text
    field (the message names the file and line or row). Readers raise it with `on_error="fail"`;
    with `"skip"` they yield it in place of the text, for the annotation worker to skip and count."""


def iter_lines(path: str | Path, errors: str = "strict") -> Iterator[tuple[int, str]]:
    """Yields (line number, text without the line break) of a (compressed) UTF-8 text file.

    Raises ValueError naming the file and line for invalid UTF-8 (with the byte offset; with
    `errors="replace"` U+FFFD is substituted instead) and for corrupt compressed data.
    """
    with open_binary(path) as f:
        offset = 0  # byte offset of the current line in the (decompressed) file
        lineno = 0
        try:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8", errors=errors)
                except UnicodeDecodeError as e:
                    raise Utf8Error(
                        f"{path}:{lineno}: invalid UTF-8 byte 0x{raw[e.start]:02x} at byte offset "
                        f"{offset + e.start} (byte {e.start} of the line)") from None
                offset += len(raw)
                yield lineno, line.rstrip("\r\n")
        except (lzma.LZMAError, EOFError, gzip.BadGzipFile) as e:
            raise ValueError(f"{path}: corrupt compressed data after line {lineno}: {e}") from e


def iter_documents(path: str | Path, errors: str = "strict", text_field: str = "text",
                   on_error: str = "fail") -> Iterator[tuple[str, str | RecordError]]:
    """Yield (id, text) for each line of a JSONL file (optionally xz- or gzip-compressed).

    Blank lines are skipped; every other line must be a JSON object with a string `text_field`;
    "id" is optional (a string, defaulting to "<file name>:<line number>"); other fields are
    ignored. A line that breaks these rules raises a RecordError naming the file and line, or,
    with `on_error="skip"`, yields ("<file name>:<line number>", that error). See `iter_lines`
    for invalid UTF-8 and corrupt compressed data.
    """
    path = Path(path)
    if not path.name.endswith((".jsonl", ".jsonl.xz", ".jsonl.gz")):
        raise ValueError(f"{path}: expected a .jsonl, .jsonl.xz or .jsonl.gz file")
    for lineno, line in iter_lines(path, errors):
        try:
            doc = _parse_line(path, lineno, line, text_field)
        except RecordError as e:
            if on_error != "skip":
                raise
            doc = f"{path.name}:{lineno}", e
        if doc is not None:
            yield doc


def _parse_line(path: Path, lineno: int, line: str, text_field: str) -> tuple[str, str] | None:
    """(id, text) of one line; None for a blank line."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}:{lineno}: malformed JSON: {e.msg} at column {e.colno}") from e
    if not isinstance(obj, dict):
        raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    if text_field not in obj:
        raise RecordError(f"{path}:{lineno}: no field {text_field!r} (fields: {', '.join(obj):.200})")
    text = obj[text_field]
    if not isinstance(text, str):
        raise RecordError(f"{path}:{lineno}: field {text_field!r} must be a string, got {text!r:.40}")
    doc_id = obj.get("id", f"{path.name}:{lineno}")
    if not isinstance(doc_id, str):
        raise RecordError(f"{path}:{lineno}: field 'id' must be a string, got {doc_id!r:.40}")
    return doc_id, text
