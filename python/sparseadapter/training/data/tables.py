"""Your own labelled tables: .csv, .tsv or .jsonl files with columns text, text_pair (optional) and
label (optional), read into Examples of a task; and the columns a table file has."""

from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional

from ..tasks import TaskSpec
from .example import DataError, Example, PathLike
from .files import delimited_table, json_objects, table_format
from .labels import convert_label


class TableRow(NamedTuple):
    line: int
    text: str
    text_pair: Optional[str]
    label: object  # raw: str or JSON value; None when the row has no label


def table_rows(path: PathLike) -> List[TableRow]:
    """Rows of a CSV/TSV/JSON-lines table with columns text, text_pair (optional), label (optional)."""
    path = Path(path)
    if table_format(path) == "jsonl":
        rows = list(_json_rows(path))
    else:
        rows = list(_delimited_rows(path, delimited_table(path)))
    if not rows:
        raise DataError("no examples", path)
    # A file is all labelled (training/evaluation data) or all unlabelled (test data); a mix is a mistake.
    labelled = rows[0].label is not None
    for r in rows:
        if (r.label is not None) != labelled:
            what = "no label, but the first row has one" if labelled else "a label, but the first row has none"
            raise DataError(f"has {what}", path, r.line)
    return rows


def _delimited_rows(path: Path, records) -> Iterator[TableRow]:
    header_line, header = next(records, (1, None))
    if header is None:
        return
    columns = [c.strip().lower() for c in header]
    if len(set(columns)) != len(columns):
        raise DataError(f"repeated column names in header {header}", path, header_line)
    if "text" not in columns:
        raise DataError(
            f"no 'text' column; the header has {header} (expected text, and optionally text_pair and label)",
            path,
            header_line,
        )
    it, ip = columns.index("text"), columns.index("text_pair") if "text_pair" in columns else None
    il = columns.index("label") if "label" in columns else None
    for line, fields in records:
        if len(fields) != len(columns):
            raise DataError(f"{len(fields)} fields, but the header has {len(columns)}", path, line)
        text = fields[it]
        if not text.strip():
            raise DataError("empty text", path, line)
        pair = fields[ip] if ip is not None and fields[ip].strip() else None
        label = fields[il].strip() if il is not None and fields[il].strip() else None
        yield TableRow(line, text, pair, label)


def _json_rows(path: Path) -> Iterator[TableRow]:
    for line, obj in json_objects(path):
        text, pair, label = obj.get("text"), obj.get("text_pair"), obj.get("label")
        if text is not None and not isinstance(text, str):
            raise DataError(f"'text' is not a string: {text!r}", path, line)
        if not text or not text.strip():
            raise DataError("missing or empty 'text'", path, line)
        if pair is not None and not isinstance(pair, str):
            raise DataError(f"'text_pair' is not a string: {pair!r}", path, line)
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int, float))):
            raise DataError(f"'label' must be a number or a string, got {label!r}", path, line)
        for field, value in (("text", text), ("text_pair", pair), ("label", label)):
            _check_unicode(value, field, path, line)
        if isinstance(label, str) and not label.strip():
            label = None  # as an empty CSV cell
        yield TableRow(line, text, pair if pair and pair.strip() else None, label)


def _check_unicode(value, field: str, path: Path, line: int) -> None:
    """JSON escapes can spell lone surrogates ("\\ud800"), which are not text: no tokenizer takes them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(
                f"'{field}' holds {value[e.start]!r} at character {e.start + 1}, a lone UTF-16 surrogate: "
                "not valid Unicode text",
                path,
                line,
            ) from None


def read_table(path: PathLike, task: TaskSpec) -> List[Example]:
    """Examples from a .csv, .tsv or .jsonl file with columns text, text_pair (optional), label (optional).

    A file without labels (no label column, or every label empty) gives labels None. Pair tasks need a
    text_pair on every row and single-sentence tasks none, so a column mix-up cannot go unnoticed.
    """
    path = Path(path)
    out = []
    for r in table_rows(path):
        if task.pair and r.text_pair is None:
            raise DataError(f"no text_pair, but task {task.name} takes sentence pairs", path, r.line)
        if not task.pair and r.text_pair is not None:
            raise DataError(f"has a text_pair, but task {task.name} takes single sentences", path, r.line)
        try:
            label = None if r.label is None else convert_label(r.label, task)
        except ValueError as e:
            raise DataError(str(e), path, r.line) from None
        out.append(Example(r.text, r.text_pair, label))
    return out


def table_columns(path: PathLike) -> List[str]:
    """The lower-cased column names of a .csv/.tsv header, or the keys of a .jsonl file's first object."""
    path = Path(path)
    if table_format(path) == "jsonl":
        first = next(json_objects(path), None)
        return [] if first is None else [str(k).lower() for k in first[1]]
    _, header = next(delimited_table(path), (1, None))
    return [c.strip().lower() for c in header or []]
