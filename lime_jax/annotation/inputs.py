"""Reading input corpora: text files (a document per line), JSONL files (a text field per line)
and Parquet or Arrow IPC files (a string column of the text field).

Text and JSONL files may be compressed (.gz, .xz). Input must be UTF-8: a bad byte is an error
that names the file, line or row and byte, unless the caller asks for replacement characters
explicitly. Parquet and Arrow files are read one record batch of the text column at
a time, so a file larger than memory streams through.
"""
from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import ipc

from lime_jax import corpus

BUNDLED_PREFIX = "bundled:"
PARQUET_SUFFIX = ".parquet"
ARROW_SUFFIXES = (".arrow", ".arrows", ".feather")  # Arrow IPC (Feather v2): file or stream format
BATCH_ROWS = 256  # rows of a Parquet/Arrow text column decoded at a time
# The command-line help of --input and --text-field (annotate, spm-train).
INPUT_HELP = ("files or globs (.txt: a document per line, .jsonl: a text field per line, optionally "
              ".gz/.xz; .parquet, .arrow/.arrows/.feather: a text column), or bundled:train / "
              "bundled:heldout")
TEXT_FIELD_HELP = "the JSONL field or Parquet/Arrow column that holds the text"


def resolve_inputs(patterns: Sequence[str], text_field: str = "text") -> list[str]:
    """Expands globs and `bundled:<split>` names into a sorted, de-duplicated file list, and
    checks that each Parquet/Arrow file has a string column `text_field` (before any reading)."""
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
    paths = list(dict.fromkeys(paths))
    for path in paths:
        if _is_columnar(_uncompressed(path)):
            _check_text_column(path, text_field)
    return paths


def _uncompressed(path: str) -> str:
    return path[:-3] if path.endswith((".gz", ".xz")) else path


def _is_columnar(path: str) -> bool:
    return path.endswith((PARQUET_SUFFIX, *ARROW_SUFFIXES))


def _iter_text_lines(path: str, errors: str) -> Iterator[tuple[str, str]]:
    name = os.path.basename(path)
    for lineno, line in corpus.iter_lines(path, errors):
        yield f"{name}:{lineno}", line


@contextlib.contextmanager
def _arrow_reader(path: str):
    """An Arrow IPC file or stream reader over the memory-mapped file."""
    with pa.memory_map(path) as source:
        is_file_format = source.read(6) == b"ARROW1"  # the IPC file format's magic
        source.seek(0)
        yield ipc.open_file(source) if is_file_format else ipc.open_stream(source)


def _check_text_column(path: str, field: str) -> None:
    if path.endswith((".gz", ".xz")):
        raise ValueError(f"{path}: Parquet and Arrow inputs are read uncompressed (they compress internally)")
    try:
        if path.endswith(PARQUET_SUFFIX):
            schema = pq.read_schema(path)
        else:
            with _arrow_reader(path) as reader:
                schema = reader.schema
    except (pa.ArrowException, OSError) as e:  # pyarrow's I/O errors are OSErrors
        raise ValueError(f"{path}: not a readable Parquet/Arrow file: {e}") from e
    if field not in schema.names:
        raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}; "
                         "--text-field names another)")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise ValueError(f"{path}: column {field!r} holds {kind}, not strings")


def _text_column(path: str, field: str) -> Iterator[pa.Array]:
    """The column `field` of a Parquet or Arrow file, at most BATCH_ROWS rows at a time."""
    if path.endswith(PARQUET_SUFFIX):
        with pq.ParquetFile(path) as f:
            for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=[field]):
                yield batch.column(field)
        return
    with _arrow_reader(path) as reader:
        batches = reader
        if isinstance(reader, ipc.RecordBatchFileReader):
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        for batch in batches:  # batches as written (memory-mapped): cut into BATCH_ROWS rows
            for start in range(0, batch.num_rows, BATCH_ROWS):
                yield batch.column(field).slice(start, BATCH_ROWS)


def _iter_columnar(path: str, errors: str, field: str,
                   on_error: str) -> Iterator[tuple[str, str | corpus.RecordError]]:
    """(id "<file name>:row <n>", text) per row (n from 0) of a Parquet or Arrow file's `field`.

    A null is a RecordError naming file and row: raised, or yielded in place of the text with
    `on_error="skip"`. Invalid UTF-8 is a corpus.Utf8Error unless `errors="replace"`.
    """
    name = os.path.basename(path)
    row = 0
    try:
        for values in _text_column(path, field):
            # Bytes, decoded here: Arrow does not check that a string column is UTF-8.
            for raw in values.cast(pa.large_binary()).to_pylist():
                if raw is None:
                    text = corpus.RecordError(f"{path}:row {row}: field {field!r} is null")
                    if on_error != "skip":
                        raise text
                else:
                    try:
                        text = raw.decode("utf-8", errors=errors)
                    except UnicodeDecodeError as e:
                        raise corpus.Utf8Error(f"{path}:row {row}: invalid UTF-8 byte 0x{raw[e.start]:02x} "
                                               f"at byte {e.start} of field {field!r}") from None
                yield f"{name}:row {row}", text
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: corrupt data from row {row} on: {e}") from e


def iter_input_documents(patterns: Sequence[str], errors: str = "strict", text_field: str = "text",
                         on_error: str = "fail") -> Iterator[tuple[str, str | corpus.RecordError]]:
    """Yields (document id, text) over all inputs in order; empty documents included.

    `text_field` names the JSONL field and Parquet/Arrow column. A record without a string text
    raises a corpus.RecordError naming file and line (row), or with `on_error="skip"` stands in
    for the text, for the annotation worker to skip and count.
    """
    if errors not in ("strict", "replace"):
        raise ValueError(f"utf8 error policy must be 'strict' or 'replace', not {errors!r}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"record error policy must be 'fail' or 'skip', not {on_error!r}")
    for path in resolve_inputs(patterns, text_field):
        name = _uncompressed(path)
        if name.endswith(".jsonl"):
            yield from corpus.iter_documents(path, errors, text_field, on_error)
        elif _is_columnar(name):
            yield from _iter_columnar(path, errors, text_field, on_error)
        else:
            yield from _iter_text_lines(path, errors)
