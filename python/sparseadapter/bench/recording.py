"""--record FILE for every `sparseadapter bench` suite: the run's metadata lines and tables saved as a
result record (bench/record.py), which scripts/render_benchmarks.py renders into BENCHMARKS.md."""

import argparse
import os
import shlex
import sys
from typing import List, Optional

from .machine import meta_from_header
from .record import Record, write_record
from .table import Table


def record_path(text: str) -> str:
    """--record's FILE, checked before the run (a long run must not fail at its end)."""
    folder = os.path.dirname(text) or "."
    if not text.endswith(".json") or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} must be a file name ending in .json")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text!r}: folder {folder} does not exist")
    return text


def add_record_option(parser) -> None:
    parser.add_argument(
        "--record",
        metavar="FILE",
        type=record_path,
        help="also write the run as a JSON result record (e.g. benchmarks/results/<kind>-<date>.json)",
    )


def save_record(path: str, kind: str, argv: Optional[List[str]], header: List[str], tables: List[Table]) -> None:
    """Writes the record of a run of suite `kind` given `argv` (None: this process's arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    meta = meta_from_header(header)
    meta["header"] = list(header)
    write_record(path, Record(kind, shlex.join(["sparseadapter", "bench", kind, *args]), meta, tables))
    print(f"recorded {path}")
