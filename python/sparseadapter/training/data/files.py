"""The file formats the readers share: UTF-8 text, delimited records (CSV, GLUE-style TSV) and JSON
lines, each error naming the file and its 1-based line."""

import csv
import io
import json
from pathlib import Path
from typing import Iterator, List, Tuple

from .example import DataError

# The suffixes of a table file and the format each is read as.
TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def read_text(path: Path) -> str:
    """The whole file as text, BOM stripped; a decoding error names its line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte {data[e.start]:#04x})", path, line) from None


def delimited(path: Path, delimiter: str, quoting: int) -> Iterator[Tuple[int, List[str]]]:
    """(first line number, fields) of each non-blank record; line numbers count multi-line quoted fields."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter, quoting=quoting)
    end = 0
    try:
        for fields in reader:
            start, end = end + 1, reader.line_num
            if fields and fields != [""]:
                yield start, fields
    except csv.Error as e:
        raise DataError(str(e), path, reader.line_num) from None


def table_format(path: Path) -> str:
    """The format of a table file by its suffix: "csv", "tsv" or "jsonl"; another suffix is a DataError."""
    try:
        return TABLE_FORMATS[path.suffix.lower()]
    except KeyError:
        raise DataError(f"unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl (JSON lines)", path) from None


def delimited_table(path: Path) -> Iterator[Tuple[int, List[str]]]:
    """The records of a .csv (standard CSV quoting) or .tsv file (read GLUE-style: quotes are ordinary
    characters), as `delimited`."""
    if table_format(path) == "csv":
        return delimited(path, ",", csv.QUOTE_MINIMAL)
    return delimited(path, "\t", csv.QUOTE_NONE)


def json_objects(path: Path) -> Iterator[Tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON-lines file; anything but one JSON object
    per line is a DataError."""
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends unescaped.
    for line, raw in enumerate(read_text(path).split("\n"), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg}); expected one JSON object per line", path, line) from None
        except RecursionError:
            raise DataError("JSON nested too deeply; expected one flat JSON object per line", path, line) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected one JSON object per line (JSON lines), got {type(obj).__name__}", path, line)
        yield line, obj
