"""Generation data in your own files: .csv, .tsv or .jsonl tables with columns source and target. A
generation example is an Example whose text is the source and whose label is the target string (None
when unlabelled); text_pair is unused. Also the lead-sentence split that the news-summarization
baseline takes from a source."""

import re
from pathlib import Path
from typing import List, Optional, Tuple

from .example import DataError, Example, PathLike
from .files import delimited_table, json_objects, table_format
from .tables import table_columns


def is_generation_table(path: PathLike) -> bool:
    """Whether a data file holds source/target columns (a generation task) rather than text/label."""
    return "source" in table_columns(path)


def read_generation_table(path: PathLike) -> List[Example]:
    """Examples from a .csv, .tsv or .jsonl file with columns source and target (optional: test data).

    A file is all labelled or all unlabelled, as read_table; empty sources are errors, and so are empty
    targets in a labelled file (an empty cell in a file that has targets is a broken row, not test data).
    """
    path = Path(path)
    rows: List[Tuple[int, str, Optional[str]]] = []
    if table_format(path) == "jsonl":
        for line, obj in json_objects(path):
            source, target = obj.get("source"), obj.get("target")
            for name, value in (("source", source), ("target", target)):
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{name!r} is not a string: {value!r}", path, line)
            rows.append((line, source or "", target))
    else:
        records = delimited_table(path)
        header_line, header = next(records, (1, None))
        if header is None:
            raise DataError("no examples", path)
        columns = [c.strip().lower() for c in header]
        if "source" not in columns:
            raise DataError(
                f"no 'source' column; the header has {header} (expected source, and target "
                "unless this is unlabelled test data)",
                path,
                header_line,
            )
        i_src, i_tgt = columns.index("source"), columns.index("target") if "target" in columns else None
        for line, fields in records:
            if len(fields) != len(columns):
                raise DataError(f"{len(fields)} fields, but the header has {len(columns)}", path, line)
            rows.append((line, fields[i_src], fields[i_tgt] if i_tgt is not None else None))
    if not rows:
        raise DataError("no examples", path)
    labelled = rows[0][2] is not None and rows[0][2].strip() != ""
    out = []
    for line, source, target in rows:
        if not source.strip():
            raise DataError("missing or empty 'source'", path, line)
        has_target = target is not None and target.strip() != ""
        if has_target != labelled:
            what = "no target, but the first row has one" if labelled else "a target, but the first row has none"
            raise DataError(f"has {what}", path, line)
        out.append(Example(source, None, target if has_target else None))
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)]*\s+(?=[\"'\u201c\u2018(]?[A-Z0-9])")


def lead_sentence(text: str) -> str:
    """The first sentence of `text` (the lead baseline of news summarization): up to the first '.', '!'
    or '?' that is followed by a space and a capital letter or digit; the whole text if there is none."""
    text = " ".join(text.split())
    match = _SENTENCE_END.search(text)
    return text[: match.start()].rstrip() + text[match.start() : match.end()].strip() if match else text
