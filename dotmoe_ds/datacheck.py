"""Read local data files once before anything expensive, so bad data is refused with its place.

For every local file of --data / --eval_data:
- text (.txt/.text/.md): decodes with --encoding / --encoding_errors (an undecodable byte is named by
  its byte offset and line);
- JSON lines (.jsonl, and .json files that are not one JSON document): every line parses, is an
  object and has --text_column (named by line);
- a JSON document (.json starting with '[' or '{'): parses (line and column), its records have the
  column;
- parquet: the schema has the column.

Files are read in 1 MiB pieces (a JSON document excepted: it is parsed whole, as datasets does), so
memory stays flat; the cost is one read of the data per rank before anything else, far below
tokenising it. It returns how many non-empty documents the files hold (text files by --text_unit, approximately for
'paragraph': blocks between blank lines), so that an empty data set is refused here and a single
document can be split by paragraphs. The DataError raised names the file and the fix.
"""
from __future__ import annotations

import codecs
import itertools
import json
from pathlib import Path
from typing import Iterator

ENCODING_ERRORS = ("strict", "replace", "ignore")
_CHUNK = 1 << 20


class DataFileError(ValueError):
    """A data file that cannot be read as its type says; the message names the place and the fix."""


def check_encoding(encoding: str, errors: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataFileError(f"--encoding {encoding!r} is not a known text encoding; use e.g. utf-8, latin-1, "
                            "cp1252") from None
    if errors not in ENCODING_ERRORS:
        raise DataFileError(f"--encoding_errors {errors!r}: use one of {', '.join(ENCODING_ERRORS)}")


def _line_of(path: Path, offset: int) -> int:
    lines, left = 1, offset
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            lines += chunk.count(b"\n")
            left -= len(chunk)
    return lines


def decoded_chunks(path: Path, encoding: str, errors: str) -> Iterator[str]:
    """The file decoded piece by piece (constant memory), or DataFileError naming the first
    undecodable byte by offset and line."""
    decoder = codecs.getincrementaldecoder(encoding)(errors=errors)
    fed = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            pending = decoder.getstate()[0]
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                offset = fed - len(pending) + err.start
                raise DataFileError(
                    f"{path}: byte offset {offset} (line {_line_of(path, offset)}) is not valid {encoding} "
                    f"({err.reason}); pass --encoding with the file's encoding (e.g. latin-1, cp1252), or "
                    "--encoding_errors replace to read undecodable bytes as U+FFFD") from None
            fed += len(chunk)
            if text:
                yield text
            if not chunk:
                return


def _lines(chunks: Iterator[str]) -> Iterator[str]:
    carry = ""
    for chunk in chunks:
        lines = (carry + chunk).split("\n")
        carry = lines.pop()
        yield from lines
    if carry:
        yield carry


def _text_documents(chunks: Iterator[str], unit: str) -> int:
    if unit == "document":
        has_text = False
        for chunk in chunks:                  # read to the end: every byte must decode
            has_text = has_text or bool(chunk.strip())
        return int(has_text)
    count, in_paragraph = 0, False
    for line in _lines(chunks):
        blank = not line.strip()
        if unit == "line":
            count += not blank
        else:                             # paragraph: runs of non-blank lines between blank lines
            count += not blank and not in_paragraph
            in_paragraph = not blank
    return count


def _record_text(record, column: str, where: str):
    if not isinstance(record, dict):
        raise DataFileError(f"{where}: a {type(record).__name__}, not a JSON object with a {column!r} field; "
                            "each record must be an object")
    if column not in record:
        fields = ", ".join(list(record)[:10]) or "none"
        raise DataFileError(f"{where}: no field {column!r} (fields: {fields}); pass --text_column with the field "
                            "that holds the text")
    value = record[column]
    return value if isinstance(value, str) else ""


def _json_documents(path: Path, chunks: Iterator[str], column: str) -> int:
    first = next(chunks, "")
    if path.suffix.lower() == ".json" and first.lstrip()[:1] in ("[", "{"):
        text = first + "".join(chunks)              # one JSON document: datasets reads it whole too
        stripped = text.lstrip()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            if stripped[:1] == "[" or "\n" not in text.strip():
                raise DataFileError(f"{path}: line {err.lineno}, column {err.colno}: malformed JSON ({err.msg}); "
                                    "fix or remove the broken part") from None
            obj = None                                   # '{' on several lines: JSON lines, checked below
        if obj is not None:
            records = obj if isinstance(obj, list) else [obj]
            return sum(1 for i, r in enumerate(records)
                       if _record_text(r, column, f"{path}: record {i + 1}").strip())
        chunks, first = iter([text]), ""
    count = 0
    for n, line in enumerate(_lines(itertools.chain([first], chunks)), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}: line {n}: malformed JSON ({err.msg} at column {err.colno}); every line "
                                "of a JSON-lines file must be one complete JSON object: fix or remove that line"
                                ) from None
        count += bool(_record_text(record, column, f"{path}: line {n}").strip())
    return count


def _parquet_documents(path: Path, column: str) -> int:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except Exception as err:
        raise DataFileError(f"{path}: not a readable parquet file ({type(err).__name__}: {err}); rewrite it or "
                            "remove it from --data") from None
    names = meta.schema.to_arrow_schema().names
    if column not in names:
        raise DataFileError(f"{path}: no column {column!r} (columns: {', '.join(names[:10])}); pass --text_column")
    return meta.num_rows


def count_documents(path: Path, kind: str, *, encoding: str, errors: str, text_column: str, text_unit: str) -> int:
    """Non-empty documents of one local file (`kind`: text | json | parquet), or DataFileError."""
    if kind == "parquet":
        return _parquet_documents(path, text_column)
    chunks = decoded_chunks(path, encoding, errors)
    if kind == "text":
        return _text_documents(chunks, text_unit)
    return _json_documents(path, chunks, text_column)
