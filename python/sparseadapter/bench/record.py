"""The result record: one JSON file per benchmark run (benchmarks/results/), what BENCHMARKS.md is
rendered from (scripts/render_benchmarks.py). Reading one validates it; a malformed record is an error
naming the file and the field.

    {
      "format": "sparseadapter-bench-record/1",
      "kind": "linear",                  a `sparseadapter bench` suite, or "manual": a table put together
                                         by hand from runs its section describes
      "command": "sparseadapter bench linear --tokens 4096",   null where it was not recorded
      "meta": {
        "date": "2026-11-27T15:19:54+00:00",     required
        "machine": ..., "cpu": ..., "isa": ..., "torch": ..., "python": ..., "load": ..., "gpu": ...,
                                         strings, null where unknown (gpu: null on a CPU run)
        "threads": 1,                    torch.set_num_threads, null where unknown
        "header": ["date: ...", ...]     the metadata lines the run printed ({{meta}} shows them)
      },
      "tables": [{"title": ..., "columns": [...], "rows": [[...]], "caption": ..., "notes": [...],
                  "align": "lrr"}]       see bench/table.py
    }
"""

import json
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

from . import SUITES
from .table import Table

FORMAT = "sparseadapter-bench-record/1"
KINDS = (*SUITES, "manual")
META_STRINGS = ("machine", "cpu", "isa", "torch", "python", "load", "gpu")
META_FIELDS = ("date", *META_STRINGS, "threads", "header")
TABLE_FIELDS = {"title": True, "columns": True, "rows": True, "caption": False, "notes": False, "align": False}


class RecordError(ValueError):
    """A malformed record: the message names the file and the field."""


@dataclass
class Record:
    kind: str
    command: Optional[str]
    meta: Dict[str, Any]
    tables: List[Table]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "command": self.command,
            "meta": {name: self.meta.get(name) for name in META_FIELDS},
            "tables": [{k: v for k, v in asdict(t).items() if v not in (None, [])} for t in self.tables],
        }


def write_record(path: str, record: Record) -> None:
    """Writes `record` as JSON after checking it reads back (a record that cannot be rendered is not
    written)."""
    data = record.to_dict()
    record_from_dict(data, path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(_dumps(data) + "\n")


def _dumps(data: Dict[str, Any]) -> str:
    """Indented JSON with each table's columns and each row on one line, so a record reads (and diffs)
    like its table."""
    inline: Dict[str, str] = {}

    def mark(value: List[str]) -> str:
        key = f"\0{len(inline)}\0"
        inline[json.dumps(key)] = json.dumps(value, ensure_ascii=False)
        return key

    tables = [dict(t, columns=mark(t["columns"]), rows=[mark(r) for r in t["rows"]]) for t in data["tables"]]
    text = json.dumps(dict(data, tables=tables), indent=1, ensure_ascii=False)
    for key, value in inline.items():
        text = text.replace(key, value)
    return text


def read_record(path: str) -> Record:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}: not JSON: {err}") from None
    return record_from_dict(data, path)


def record_from_dict(data: Any, source: str) -> Record:
    """The validated Record of `data`; `source` (a file name) starts every error message."""

    def fail(where: str, problem: str):
        raise RecordError(f"{source}: {where}: {problem}")

    _expect_keys(data, {"format": True, "kind": True, "command": True, "meta": True, "tables": True}, "record", fail)
    if data["format"] != FORMAT:
        fail("format", f"expected {FORMAT!r}, got {data['format']!r}")
    if data["kind"] not in KINDS:
        fail("kind", f"unknown kind {data['kind']!r}; one of {', '.join(KINDS)}")
    if data["command"] is not None and not isinstance(data["command"], str):
        fail("command", "must be a string or null")
    meta = data["meta"]
    _expect_keys(meta, dict.fromkeys(META_FIELDS, True), "meta", fail)
    if not isinstance(meta["date"], str) or not meta["date"]:
        fail("meta.date", "must be a non-empty string")
    for name in META_STRINGS:
        if meta[name] is not None and not isinstance(meta[name], str):
            fail(f"meta.{name}", "must be a string or null")
    if meta["threads"] is not None and (not isinstance(meta["threads"], int) or isinstance(meta["threads"], bool)):
        fail("meta.threads", "must be an integer or null")
    if not _strings(meta["header"]):
        fail("meta.header", "must be a list of strings")
    if not isinstance(data["tables"], list) or not data["tables"]:
        fail("tables", "must be a non-empty list")
    return Record(
        data["kind"],
        data["command"],
        dict(meta),
        [_table(t, f"tables[{i}]", fail) for i, t in enumerate(data["tables"])],
    )


def _table(data: Any, where: str, fail) -> Table:
    _expect_keys(data, TABLE_FIELDS, where, fail)
    if not isinstance(data["title"], str) or not data["title"]:
        fail(f"{where}.title", "must be a non-empty string")
    if not _strings(data["columns"]):
        fail(f"{where}.columns", "must be a list of strings")
    if not isinstance(data["rows"], list) or not all(_strings(r) for r in data["rows"]):
        fail(f"{where}.rows", "must be a list of lists of strings")
    if not isinstance(data.get("caption"), (str, type(None))):
        fail(f"{where}.caption", "must be a string")
    if not _strings(data.get("notes", [])):
        fail(f"{where}.notes", "must be a list of strings")
    if not isinstance(data.get("align"), (str, type(None))):
        fail(f"{where}.align", "must be a string")
    try:
        return Table(**data)
    except ValueError as err:
        fail(where, str(err))


def _expect_keys(data: Any, fields: Dict[str, bool], where: str, fail) -> None:
    """`data` is an object whose keys are among `fields`, with every required one (True) present."""
    if not isinstance(data, dict):
        fail(where, f"must be an object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        fail(where, f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    missing = [k for k, required in fields.items() if required and k not in data]
    if missing:
        fail(where, f"missing field(s) {', '.join(missing)}")


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
